"""Key remapping, which every screen applies from config.toml."""
from textual.screen import Screen


def remap_keys(screen: Screen, keys: dict[str, str]) -> None:
    """Move actions to the keys the user chose in config.toml ([keys] action = "key")."""
    known = {b.action: b for b in screen.BINDINGS}
    for action, key in keys.items():
        if action not in known:
            screen.app.notify(f"config.toml: unknown action {action!r} in [keys]", severity="warning")
            continue
        old = known[action]
        for k in old.key.split(",") + [key]:   # the user's choice wins over a default on that key
            screen._bindings.key_to_bindings.pop(k, None)
        screen._bindings.bind(key, action, old.description, show=old.show)
