"""Model names the app knows, resolved to directories. A path always works as a name too."""
from pathlib import Path

from engine.errors import ParleyError

ASSETS = Path(__file__).resolve().parent.parent / "assets"
BUILTIN = {"default": ASSETS / "default-model"}


def known_models() -> dict[str, Path]:
    """The shipped models, then the ones the user added in the app (the store's models table)."""
    from engine.paths import database_path
    from engine.store import Store
    known = {name: path for name, path in BUILTIN.items() if (path / "config.json").is_file()}
    if database_path().exists():
        with Store() as store:
            known.update({m["name"]: Path(m["path"]) for m in store.models()})
    return known


def resolve_model(name: str | None) -> Path:
    """A model directory from a path or a known name (None means the default model)."""
    name = name or "default"
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    known = known_models()
    if name in known:
        return known[name]
    names = ", ".join(sorted(known)) or "none yet"
    raise ParleyError(f"no model directory or known model named {name!r}: pass a Hugging Face-format directory, "
                      f"or one of the known names ({names})")


def register(store, out: str | Path) -> None:
    """Make the trained model selectable in the app, under its directory's name."""
    out = Path(out)
    name, n = out.name, 1
    while store.model(name) is not None:
        if Path(store.model(name)["path"]) == out.resolve():
            return
        n += 1
        name = f"{out.name}-{n}"
    store.add_model(name, out.resolve(), kind="trained")
