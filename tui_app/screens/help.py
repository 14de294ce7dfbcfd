"""The help screen (F1, or ? outside a text box): every key of the screen it opened over, with its
action, read from the live bindings, so the user's remaps in config.toml show as they are."""
import functools

from textual.binding import Binding
from textual.screen import ModalScreen, Screen
from textual.widgets import DataTable, Label


def key_bindings(screen: Screen) -> list[tuple[str, str, str, str]]:
    """(key as shown, what it does, action, name in config.toml) for every binding of `screen` and
    then of the app, remaps included; each action once, on its first key."""
    rows, seen = [], set()
    for node in (screen, screen.app):
        live = node._bindings.copy()
        live.apply_keymap(screen.app._keymap)   # as Textual does when it dispatches a key
        for key, bindings in live.key_to_bindings.items():
            for b in bindings:
                if (node, b.action) in seen or b.system:
                    continue
                seen.add((node, b.action))
                rows.append((screen.app.get_key_display(b), b.description or b.action, b.action, b.id or ""))
    return rows


def palette_commands(screen: Screen):
    """What the command palette lists for `screen`: each of its actions, run as its key would."""
    from textual.app import SystemCommand
    for key, description, action, _ in key_bindings(screen):
        if action != "command_palette":
            yield SystemCommand(description, f"{key}", functools.partial(screen.run_action, action))


class HelpScreen(ModalScreen):
    BINDINGS = [Binding("escape", "dismiss", "Close", id="dismiss")]
    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    #help { width: 80; height: 80%; border: solid $primary; background: $surface; }
    """

    def __init__(self, under: Screen):
        super().__init__()
        self.rows = key_bindings(under)

    def compose(self):
        yield Label("Keys (remap them in config.toml, [keys] action = \"key\"; Ctrl+P searches them)", markup=False)
        table = DataTable(id="help", cursor_type="row", zebra_stripes=True)
        table.add_columns("key", "does", "config.toml name")
        for key, description, _, name in self.rows:
            table.add_row(key, description, name)
        yield table
