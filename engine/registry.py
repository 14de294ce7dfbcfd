"""Model names the app knows, resolved to directories. A path always works as a name too, and so does
a Hugging Face model in the local cache, as org/name[@revision] (engine/hub.py)."""
from pathlib import Path

from engine.errors import ParleyError

ASSETS = Path(__file__).resolve().parent.parent / "assets"
BUILTIN = {"default": ASSETS / "default-model"}


def known_models() -> dict[str, Path]:
    """The shipped models, then the ones the user added in the app or pulled (the store's models table).
    A pulled model is looked up in the Hugging Face cache each time, so a newer pull of it is the one used."""
    from engine.paths import database_path
    from engine.store import Store
    known = {name: path for name, path in BUILTIN.items() if (path / "config.json").is_file()}
    if database_path().exists():
        with Store() as store:
            known.update({m["name"]: _hub_path(m) if m["kind"] == "hub" else Path(m["path"]) for m in store.models()})
    return known


def _hub_path(row: dict) -> Path:
    """A pulled model's snapshot in the cache now, or the one it had when pulled if the cache lost it
    (loading that then names the missing directory)."""
    from engine import hub
    try:
        return hub.cached(row["name"])
    except ParleyError:
        return Path(row["path"])


def resolve_model(name: str | None) -> Path:
    """A model directory from a path, a known name, or org/name[@revision] in the Hugging Face cache
    (never over the network), in that order (None means the default model)."""
    name = name or "default"
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    known = known_models()
    if name in known:
        return known[name]
    from engine import hub
    if hub.is_hub_name(name):
        return hub.cached(name)
    if path.exists() or path.is_absolute() or name.startswith((".", "~")):
        return path   # plainly a path: the loader says what is wrong with it (missing, a file, ...)
    names = ", ".join(sorted(known)) or "none yet"
    raise ParleyError(f"no model directory or known model named {name!r}: pass a Hugging Face-format directory, "
                      f"org/name of a Hugging Face model, or one of the known names ({names})")


def register(store, out: str | Path, parent: str | None = None, run_id: str | None = None) -> str:
    """Make the trained model selectable in the app, under its directory's name, with the model it
    was trained from and its run (its lineage); returns the name."""
    out = Path(out)
    name, n = out.name, 1
    while store.model(name) is not None:
        if Path(store.model(name)["path"]) == out.resolve():
            store.set_lineage(name, parent, run_id)   # written again, by this run
            return name
        n += 1
        name = f"{out.name}-{n}"
    store.add_model(name, out.resolve(), kind="trained", parent=parent, run_id=run_id)
    return name


def register_pulled(store, name: str, snapshot: Path) -> bool:
    """Make a pulled model selectable in the app under its name (org/name[@revision]); False if it was already."""
    row = store.model(name)
    if row is None:
        store.add_model(name, Path(snapshot).resolve(), kind="hub")
        return True
    if row["kind"] != "hub":
        raise ParleyError(f"{name} is in the Hugging Face cache now, but the app's model {name!r} is another "
                          f"directory ({row['path']}): pull it as {name.partition('@')[0]}@main to register it under that name")
    return False
