"""A conversation's title, system prompt and model."""
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Input, Label, TextArea


class ConversationScreen(ModalScreen):
    """A conversation's title, system prompt and model."""

    BINDINGS = [Binding("escape", "dismiss", "Close", id="dismiss"), Binding("ctrl+s", "save", "Save", id="save")]
    DEFAULT_CSS = """
    ConversationScreen { align: center middle; }
    #conversation-box { width: 80%; height: auto; border: solid $primary; background: $surface; padding: 0 1; }
    #system-prompt { height: 6; }
    """

    def __init__(self, conversation: dict):
        super().__init__()
        self.conversation = conversation

    def compose(self):
        with Vertical(id="conversation-box"):
            yield Label("title")
            yield Input(self.conversation["title"], id="title")
            yield Label("system prompt")
            yield TextArea(self.conversation["system_prompt"], id="system-prompt")
            yield Label("model (a known name or a directory)")
            yield Input(self.conversation["model"] or "", id="conversation-model")
            yield Label("Ctrl+S saves, Esc closes")

    def action_save(self) -> None:
        fields = {"title": self.query_one("#title", Input).value.strip(),
                  "system_prompt": self.query_one("#system-prompt", TextArea).text.strip(),
                  "model": self.query_one("#conversation-model", Input).value.strip() or None}
        self.app.store.update_conversation(self.conversation["id"], **fields)
        self.dismiss(fields)
