"""The arena: the presets the compare view's rankings pit against each other, rated (engine/arena.py),
as a table and a plot of each rating with its 95% interval; one key uses the best preset. With a
reward model chosen, how often it orders the user's held-out ranked pairs as the user did."""
from rich.text import Text
from textual import work
from textual.binding import Binding
from textual.message import Message
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Static
from textual_plotext import PlotextPlot

from engine.arena import BY, Agreement, ArenaConfig, Rating, ratings
from engine.errors import ParleyError
from engine.store import Store
from engine.terminal import printable

EMPTY = ("no battles yet: rank the panes of a comparison (Ctrl+O in the chat) whose settings or models differ, "
         "and their presets are rated here")


class Rated(Message):
    def __init__(self, rows: list[Rating], by: str, error: str | None = None):
        super().__init__()
        self.rows, self.by, self.error = rows, by, error


class Agreed(Message):
    def __init__(self, agreement: Agreement | None, error: str | None = None):
        super().__init__()
        self.agreement, self.error = agreement, error


class ArenaScreen(Screen):
    """The ratings table and plot. The fit and its bootstrap run in a worker (a second or so on a
    large store); the screen dismisses with the best preset when the user asks to use it."""

    BINDINGS = [Binding("escape", "close", "Back", id="close"),
                Binding("u", "use_best", "Use best preset", id="use_best"),
                Binding("b", "cycle_by", "Presets by…", id="cycle_by"),
                Binding("t", "train_dpo", "Train on my rankings", id="train_dpo"),
                Binding("r", "train_rm", "Reward model on my rankings", id="train_rm")]
    DEFAULT_CSS = """
    #arena-note { height: auto; color: $text-muted; padding: 0 1; }
    #arena-agreement { height: auto; padding: 0 1; }
    #arena-table { height: auto; max-height: 50%; }
    #arena-plot { height: 1fr; min-height: 10; }
    """

    def __init__(self, by: str = ArenaConfig.by):
        super().__init__()
        self.by = by
        self.rows: list[Rating] = []

    def compose(self):
        yield Header()
        yield Static("rating the presets…", id="arena-note", markup=False)
        yield Static("", id="arena-agreement", markup=False)
        yield DataTable(id="arena-table", cursor_type="row", zebra_stripes=True)
        yield PlotextPlot(id="arena-plot")
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = f"presets by {self.by}"
        self.query_one(DataTable).add_columns("rank", "preset", "rating", "95% CI", "battles", "win rate")
        self.rate(self.by)
        if self.app.reward_model_name:
            self.query_one("#arena-agreement", Static).update("scoring the ranked candidates with the reward model…")
            self.agree()

    @work(thread=True, group="agreement")
    def agree(self) -> None:
        """The reward model's held-out agreement with the user's rankings (it scores every candidate)."""
        from engine.rlhf.reward_model import agreement_of   # imports torch
        try:
            rm = self.app.reward_model()
            with Store(self.app.store.path) as store:
                self.post_message(Agreed(agreement_of(rm, store)))
        except ParleyError as e:
            self.post_message(Agreed(None, f"reward model {self.app.reward_model_name}: {e}"))

    def on_agreed(self, message: Agreed) -> None:
        self.query_one("#arena-agreement", Static).update(message.error or message.agreement.line)

    @work(thread=True, exclusive=True, group="arena")
    def rate(self, by: str) -> None:
        try:
            with Store(self.app.store.path) as store:   # SQLite connections are per thread
                rows = ratings(store, ArenaConfig(by=by))
        except ParleyError as e:
            self.post_message(Rated([], by, str(e)))
            return
        self.post_message(Rated(rows, by))

    def on_rated(self, message: Rated) -> None:
        if message.by != self.by:   # the user switched again meanwhile: a newer worker is on its way
            return
        self.rows = message.rows
        note = self.query_one("#arena-note", Static)
        table = self.query_one(DataTable)
        table.clear()
        if message.error:
            note.update(message.error)
        elif not self.rows:
            note.update(EMPTY)
        else:
            battles = sum(r.battles for r in self.rows) // 2
            note.update(f"{battles} battles · Bradley–Terry, ties half a win · 95% bootstrap intervals · mean "
                        f"rating 1000 · presets by {self.by} (b switches) · u uses the best")
        for r in self.rows:
            # cells as Text: a preset's label (stop strings, model paths) is never read as markup
            table.add_row(*(Text(printable(cell)) for cell in (
                str(r.rank), r.preset.label, f"{r.rating:.0f}", f"{r.low:.0f} to {r.high:.0f}", str(r.battles),
                f"{100 * r.win_rate:.0f}%")))
        self.draw_plot()

    def draw_plot(self) -> None:
        """Each preset at its rank: a point at its rating and a bar over its 95% interval (plotext's
        own error bars are symmetric; these intervals are not)."""
        plot = self.query_one(PlotextPlot)
        plt = plot.plt
        plt.clear_figure()
        if self.rows:
            ranks = [r.rank for r in self.rows]
            for r in self.rows:
                plt.plot([r.rank, r.rank], [r.low, r.high], color="blue")
            plt.scatter(ranks, [r.rating for r in self.rows], marker="●", color="red")
            plt.xticks(ranks, [str(k) for k in ranks])
            plt.xlim(0.5, len(ranks) + 0.5)
            plt.title("rating (●) and 95% interval, by rank")
        plot.refresh()

    def action_cycle_by(self) -> None:
        self.by = BY[(BY.index(self.by) + 1) % len(BY)]
        self.sub_title = f"presets by {self.by}"
        self.query_one("#arena-note", Static).update("rating the presets…")
        self.rate(self.by)

    def action_use_best(self) -> None:
        if not self.rows:
            self.app.notify("no rated preset yet: rank some comparisons first", severity="warning")
            return
        self.dismiss(self.rows[0])

    def action_close(self) -> None:
        self.dismiss(None)

    def action_train_dpo(self) -> None:
        self.train_on_rankings("dpo")

    def action_train_rm(self) -> None:
        self.train_on_rankings("rm")

    def train_on_rankings(self, kind: str) -> None:
        """Start a round (tui_app/rounds.py) and show its progress on the dashboard."""
        from tui_app.rounds import train_on_my_rankings
        from tui_app.screens.training import TrainingScreen
        if train_on_my_rankings(self.app, kind) is not None:
            self.app.push_screen(TrainingScreen())
