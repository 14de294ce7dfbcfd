"""The token inspector: what a reply's decoding settings did to each next-token distribution."""
import math

from textual import on
from textual.binding import Binding
from textual.containers import Horizontal
from textual.screen import ModalScreen
from textual.widgets import Label, ListItem, ListView, Static


class InspectorScreen(ModalScreen):
    """Each token of a reply; for the selected one, the model's top alternatives before and after
    the reply's own temperature / top-k / top-p / ... filtering: what the settings actually did."""

    BINDINGS = [Binding("escape", "dismiss", "Close", id="dismiss")]
    DEFAULT_CSS = """
    InspectorScreen { align: center middle; }
    #inspector { width: 90%; height: 80%; border: solid $primary; background: $surface; }
    #tokens { width: 40; }
    #alternatives { width: 1fr; padding: 0 1; }
    """

    def __init__(self, tokens: list, settings: dict | None):
        super().__init__()
        self.tokens, self.settings = tokens, settings or {}

    def compose(self):
        with Horizontal(id="inspector"):
            yield ListView(*[ListItem(Label(f"{t.step:>4}  {t.text or repr(t.text)!s:<16} p={math.exp(t.logprob):.3f}",
                                            markup=False)) for t in self.tokens], id="tokens")
            yield Static("", id="alternatives", markup=False)

    def on_mount(self) -> None:
        self.query_one("#tokens", ListView).focus()
        if self.tokens:
            self.show(0)

    @on(ListView.Highlighted, "#tokens")
    def highlighted(self, event: ListView.Highlighted) -> None:
        if event.list_view.index is not None:
            self.show(event.list_view.index)

    def show(self, index: int) -> None:
        self.query_one("#alternatives", Static).update(inspector_text(self.tokens[index], self.settings))

def inspector_text(token, settings: dict) -> str:
    knobs = ", ".join(f"{k} {settings[k]}" for k in ("temperature", "top_k", "top_p", "min_p", "typical_p",
                                                     "repetition_penalty") if k in settings)
    lines = [f"token {token.step}: {token.text!r} (id {token.token_id})",
             f"log p under the model {token.logprob:.4f}; under the filtered distribution "
             f"{token.sampled_logprob:.4f}", f"settings: {knobs}", "",
             f"{'model (before)':<34}{'after the settings':<34}"]
    for before, after in zip(token.top_before, token.top_after):
        lines.append(f"{before.text!r:<20}{before.prob:>10.4f}    {after.text!r:<20}{after.prob:>10.4f}")
    return "\n".join(lines)
