"""Model names the app knows, resolved to directories. A path always works as a name too."""
from pathlib import Path

from engine.errors import ParleyError

ASSETS = Path(__file__).resolve().parent.parent / "assets"
BUILTIN = {"default": ASSETS / "default-model"}


def known_models() -> dict[str, Path]:
    return {name: path for name, path in BUILTIN.items() if (path / "config.json").is_file()}


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
