"""The token inspector: what a reply's decoding settings did to each next-token distribution, for
any reply ever generated (the store keeps every reply's tokens), and a branch from any alternative."""
import math

from rich.text import Text
from textual import on
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import DataTable, Label, ListItem, ListView, Static


class InspectorScreen(ModalScreen):
    """Each token of a reply; for the selected one, the model's top alternatives before and after
    the settings in force at that token (temperature, top-k, top-p, ...). Enter on an alternative
    dismisses with (step, token id): a new branch takes that token there and generates on."""

    BINDINGS = [Binding("escape", "dismiss", "Close", id="dismiss")]
    DEFAULT_CSS = """
    InspectorScreen { align: center middle; }
    #inspector { width: 90%; height: 80%; border: solid $primary; background: $surface; }
    #tokens { width: 40; }
    #token-side { width: 1fr; padding: 0 1; }
    #token-info { height: auto; }
    #alternatives { height: 1fr; }
    """

    def __init__(self, record: dict, settings_at):
        """`record`: the store's reply_tokens; `settings_at(step)`: the settings that token was drawn with."""
        super().__init__()
        self.tokens, self.forced, self.settings_at = record["tokens"], record["forced"], settings_at
        self.step = 0

    def compose(self):
        with Horizontal(id="inspector"):
            yield ListView(*[ListItem(Label(token_line(t, t["step"] < self.forced), markup=False))
                             for t in self.tokens], id="tokens")
            with Vertical(id="token-side"):
                yield Static("", id="token-info", markup=False)
                table = DataTable(id="alternatives", cursor_type="row")
                table.add_columns("token", "model p", "after the settings")
                yield table
                yield Label("Tab: the alternatives; Enter on one: a new branch that takes it here and goes on",
                            markup=False)

    def on_mount(self) -> None:
        self.query_one("#tokens", ListView).focus()
        if self.tokens:
            self.show(0)

    @on(ListView.Highlighted, "#tokens")
    def highlighted(self, event: ListView.Highlighted) -> None:
        if event.list_view.index is not None:
            self.show(event.list_view.index)

    def show(self, index: int) -> None:
        self.step = index
        token = self.tokens[index]
        self.query_one("#token-info", Static).update(info_text(token, self.settings_at(index)))
        table = self.query_one("#alternatives", DataTable)
        table.clear()
        for token_id, piece, before, after in alternative_rows(token):
            table.add_row(Text(repr(piece)), prob_text(before), prob_text(after), key=str(token_id))

    @on(DataTable.RowSelected, "#alternatives")
    def continue_here(self, event: DataTable.RowSelected) -> None:
        self.dismiss((self.step, int(event.row_key.value)))


def token_line(token: dict, forced: bool) -> str:
    p = "" if token["logprob"] is None else f"p={math.exp(token['logprob']):.3f}"
    return f"{token['step']:>4}{'*' if forced else ' '} {token['piece']!r:<16} {p}"


def prob_text(p: float | None) -> str:
    return "—" if p is None else f"{p:.4f}"   # — : filtered out (or not among the top)


def alternative_rows(token: dict) -> list[tuple[int, str, float | None, float | None]]:
    """(id, piece, p before, p after) for the model's top tokens, then any the settings raised into
    their own top; a token the settings filtered out has no "after"."""
    before = {a["token_id"]: a for a in token["before"]}
    after = {a["token_id"]: a for a in token["after"]}
    order = list(before) + [t for t in after if t not in before]
    return [(t, (before.get(t) or after[t])["piece"], before[t]["prob"] if t in before else None,
             after[t]["prob"] if t in after else None) for t in order]


def info_text(token: dict, settings: dict) -> str:
    knobs = ", ".join(f"{k} {settings[k]}" for k in ("temperature", "top_k", "top_p", "min_p", "typical_p",
                                                     "repetition_penalty") if k in settings)

    def lp(value):
        return "?" if value is None else f"{value:.4f}"
    return (f"token {token['step']}: {token['piece']!r} (id {token['token_id']})\n"
            f"log p under the model {lp(token['logprob'])}; under the filtered distribution "
            f"{lp(token['sampled_logprob'])}\nsettings at this token: {knobs}")
