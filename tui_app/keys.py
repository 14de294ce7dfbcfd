"""The user's key remaps from config.toml (`[keys]` then `action = "key"`), checked before the app starts.

Remapping itself is Textual's keymap (App.set_keymap over the bindings' ids, which are the action
names). Textual takes any string and, on a clash, silently drops the other binding; so every entry
is checked first, against every screen's bindings, and a bad one stops the start with one line that
names the config line and the fix.
"""
import unicodedata

from textual.binding import Binding
from textual.keys import Keys
from textual.widgets import Input, TextArea

from engine.errors import ParleyError

MODIFIERS = {"ctrl", "shift", "alt", "meta", "super", "hyper"}
NAMED_KEYS = {k.value.split("+")[-1] for k in Keys} | {"space", "enter", "tab", "minus", "plus", "slash"}


def is_key(key: str) -> bool:
    """Whether `key` is a key Textual can report: modifiers then one key, e.g. "ctrl+g", "f6", "?"."""
    *modifiers, base = key.split("+") if key != "+" else ["+"]
    if not base or not set(modifiers) <= MODIFIERS:
        return False
    if len(base) == 1 and base.isprintable():
        return True
    if base in NAMED_KEYS:
        return True
    try:   # a character by its Unicode name, as Textual spells them: question_mark, full_stop, ...
        unicodedata.lookup(base.replace("_", " "))
        return True
    except KeyError:
        return False


def config_line(text: str, action: str) -> str:
    """Where `action` is set in the config text, as "line N" (or "[keys]" if it cannot be found)."""
    for number, line in enumerate(text.splitlines(), 1):
        if line.split("=")[0].strip().strip('"') == action:
            return f"line {number}"
    return "[keys]"


def check_keymap(keys, screens: list[type], app: type, where: str, text: str) -> dict[str, str]:
    """The `[keys]` table as Textual's keymap {binding id: key}; raises ParleyError on an entry that
    is not a string, not a key, not an action of any screen, or takes a key another action of the
    same screen (or the app, whose keys work on every screen) keeps."""
    if not isinstance(keys, dict):
        raise ParleyError(f"{where}: [keys] must be a table of action = \"key\" lines")
    # the text boxes' own keys too: a screen key they take never reaches the screen while one has focus
    bindings = {cls: declared(cls) + declared(app) + declared(TextArea) + declared(Input) for cls in screens}
    actions = {b.id for bs in bindings.values() for b in bs if b.id}
    for action, key in keys.items():
        line = f"{where} {config_line(text, action)}"
        if not isinstance(key, str):
            raise ParleyError(f"{line}: {action} = {key!r} is not a string: write it in quotes, e.g. "
                              f'{action} = "ctrl+k"')
        if action not in actions:
            raise ParleyError(f"{line}: {action!r} is not an action: the actions are {', '.join(sorted(actions))}")
        if not is_key(key):
            raise ParleyError(f'{line}: "{key}" is not a key name: write modifiers and a key, e.g. "ctrl+k", '
                              '"alt+r", "f6"')
    for bs in bindings.values():
        ids = {b.id for b in bs}
        for action, key in ((a, k) for a, k in keys.items() if a in ids):   # the actions this screen has
            clash = next((b for b in bs if b.id != action and key in keys.get(b.id, b.key).split(",")), None)
            if clash is not None:
                name = clash.id or clash.description or clash.action   # Textual's own (ctrl+q, tab) have no id
                raise ParleyError(f'{where} {config_line(text, action)}: "{key}" is already the key of '
                                  f"{name}: pick another key (or move {name} too)")
    return dict(keys)


def declared(cls: type) -> list[Binding]:
    """The bindings of `cls` and its bases, as Textual merges them."""
    return [b for klass in cls.__mro__ for b in vars(klass).get("BINDINGS", []) if isinstance(b, Binding)]
