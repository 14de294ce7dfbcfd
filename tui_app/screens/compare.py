"""Compare: 2-6 candidates side by side in one batched run, then rank and flag them.

Blind mode (Alt+B, remembered in the store) is FastChat's anonymous battle: the panes' settings and
models are hidden, and shuffled among the panes, until the comparison is ranked; the ranking is
stored as any other, and then the labels show which pane ran what."""
import dataclasses
import random

from textual import on, work
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, Header, Input, Label, Select, Static

from engine.errors import ParleyError
from engine.terminal import printable
from engine.settings import COMPARE_TEMPERATURES, FIELDS, Settings, parse_value
from tui_app.screens.replies import RepliesMixin, Scored, reward_text, score_in_worker, stream_replies
from tui_app.widgets import MessageView


GUIDANCE = ("Rank by what helps the user most: helpful (does what was asked), truthful (no made-up facts), "
            "harmless (nothing unsafe). When unsure, call it a tie.")

FLAGS = [("fails the instruction", "fails_instruction"), ("made-up facts", "made_up_facts"), ("unsafe", "unsafe")]

class CompareScreen(RepliesMixin, Screen):
    """2-6 candidates for one context, side by side, in one batched run; then rank them."""

    BINDINGS = [
        Binding("escape", "close", "Back", id="close"),
        Binding("ctrl+s", "stop", "Stop", id="stop"),
        Binding("ctrl+up", "more", "+ Pane", id="more"),
        Binding("ctrl+down", "fewer", "- Pane", id="fewer"),
        Binding("ctrl+g", "run", "Run", id="run"),
        Binding("alt+b", "toggle_blind", "Blind", id="toggle_blind"),
    ]
    DEFAULT_CSS = """
    #panes { height: 1fr; }
    .pane { width: 1fr; border: solid $primary; padding: 0 1; }
    #guidance { color: $text-muted; height: auto; }
    """

    def __init__(self, conversation_id: str, parent_id: str, base: Settings, panes: int = 2):
        super().__init__()
        self.conversation_id, self.parent_id, self.base = conversation_id, parent_id, base
        self.n = panes
        self.overrides: dict[int, dict] = {}
        self.models: dict[int, str] = {}   # panes with a model of their own
        self.init_replies()
        self.message_ids: list[str] = []
        self.comparison_id: str | None = None
        self.blind = False           # read from the store on mount
        self.rng = random.Random()   # which pane runs which settings, in blind mode
        self.titles: list[str] = []  # each pane's full title: its letter, model and temperature
        self.pane_models: list[str] = []   # the model each pane runs
        self.ranked: str | None = None   # the best candidate, once a blind comparison is ranked
        self.scores: dict[str, float | None] = {}   # the reward model's, of each finished candidate

    def pane_settings(self) -> list[Settings]:
        """Pane i: the chat's settings with its own temperature, then the pane's own overrides."""
        out = []
        for i in range(self.n):
            s = dataclasses.replace(self.base, temperature=COMPARE_TEMPERATURES[i], seed=None, num_beams=1)
            out.append(dataclasses.replace(s, **self.overrides.get(i, {})).validate())
        return out

    @on(Input.Submitted, ".pane-settings")
    async def pane_settings_changed(self, event: Input.Submitted) -> None:
        i = int(event.input.id.removeprefix("pane-settings-"))
        try:
            self.overrides[i], model = parse_overrides(event.value)
            self.pane_settings()
            if model:
                self.models[i] = model
            else:
                self.models.pop(i, None)
        except ParleyError as e:
            self.overrides.pop(i, None)
            self.app.notify(str(e), severity="error")
            return
        await self.action_run()

    def compose(self):
        yield Header()
        yield Horizontal(id="panes")
        yield Static(GUIDANCE, id="guidance", markup=False)
        yield Input(placeholder="rank: pane letters best first, = for a tie (b a=c); one letter: the best; "
                                "tie; bad", id="rank")
        yield Footer()

    async def on_mount(self) -> None:
        self.blind = bool(self.app.store.preference("blind_compare", False))
        await self.action_run()

    async def action_run(self) -> None:
        if self.streaming:
            return
        if self.ranked is not None:
            self.app.notify("this comparison is ranked: Esc goes back (the best candidate continues)",
                            severity="warning")
            return
        if self.comparison_id:
            # a rerun (more panes, new overrides) replaces the candidates not ranked yet, rather than
            # leaving them as branches of the conversation
            self.app.store.discard_comparison(self.comparison_id)
            self.comparison_id, self.message_ids = None, []
        panes = self.query_one("#panes", Horizontal)
        await panes.remove_children()
        settings = self.pane_settings()
        # pane i runs slot order[i]: the settings (and model) typed for that slot; blind mode shuffles
        # them, so a pane's place says nothing of what it runs
        order = self.rng.sample(range(self.n), self.n) if self.blind else list(range(self.n))
        self.titles, self.pane_models = [], []
        for i, slot in enumerate(order):
            model = self.models.get(slot, self.app.model_name)
            typed = " ".join([f"{k}={v}" for k, v in self.overrides.get(slot, {}).items()]
                             + ([f"model={self.models[slot]}"] if slot in self.models else []))
            self.pane_models.append(model)
            self.titles.append(pane_title(i, model, settings[slot]))
            pane = Vertical(Label("", markup=False, classes="pane-title"),
                            Label("", markup=False, classes="pane-score"),
                            Input(typed,
                                  placeholder="e.g. temperature=0.3 top_k=20 model=NAME (Enter runs again)",
                                  id=f"pane-settings-{slot}", classes="pane-settings"),
                            VerticalScroll(id=f"body-{i}"),
                            Select(FLAGS, prompt="flag…", id=f"flag-{i}"), classes="pane")
            await panes.mount(pane)
        self.scores = {}
        self.show_labels()
        self.streaming = True
        self.views.clear()
        self.run_panes([settings[slot] for slot in order],
                       {i: self.models[slot] for i, slot in enumerate(order) if slot in self.models})
        self.query_one("#rank", Input).focus()

    def show_labels(self) -> None:
        """Each pane's settings and model, or in blind mode before the ranking only its letter."""
        hidden = self.blind and self.ranked is None
        for i, (label, box) in enumerate(zip(self.query(".pane-title").results(Label),
                                             self.query(".pane-settings").results(Input))):
            label.update(f"{pane_letter(i).upper()}  (blind: shown once ranked)" if hidden else self.titles[i])
            box.display = not hidden
        # blind mode hides the scores too: a ranking made while seeing them would measure nothing
        # of the reward model's agreement with the user (the arena's number)
        for i, label in enumerate(self.query(".pane-score").results(Label)):
            mid = self.message_ids[i] if i < len(self.message_ids) else None
            known = mid in self.scores
            label.update("" if not known else "reward: shown once ranked" if hidden else reward_text(self.scores[mid]))
        self.sub_title = "blind: settings and models hidden until ranked (Alt+B)" if hidden else ""

    async def action_toggle_blind(self) -> None:
        self.blind = not self.blind
        self.app.store.set_preference("blind_compare", self.blind)
        if self.blind and self.ranked is None and not self.streaming:
            await self.action_run()   # a fresh, shuffled run: the panes seen so far are no blind battle
        else:
            self.show_labels()

    @work(thread=True, exclusive=True, group="compare")
    def run_panes(self, settings: list[Settings], models: dict[int, str]) -> None:
        stream_replies(self, self.conversation_id, self.parent_id, settings, models)

    async def mount_replies(self, replies, messages: list[dict]) -> None:
        self.message_ids, self.comparison_id = replies.message_ids, replies.comparison_id
        # a BERT pane fills masks rather than writing left to right: its title says so, and what it ignores
        for i, line in replies.notes.items():
            self.titles[i] = pane_title(i, self.pane_models[i], replies.settings[i], line)
        self.show_labels()
        for i, m in enumerate(messages):
            self.views[m["id"]] = MessageView(m)
            await self.query_one(f"#body-{i}", VerticalScroll).mount(self.views[m["id"]])

    def after_finish(self, message) -> None:
        if not self.pending and self.app.reward_model_name:
            self.score_panes(list(self.message_ids))

    @work(thread=True, group="scores")
    def score_panes(self, message_ids: list[str]) -> None:
        score_in_worker(self, message_ids)

    def on_scored(self, message: Scored) -> None:
        if message.error:
            self.app.notify(message.error, severity="error")
        if set(message.scores) == set(self.message_ids):   # not the scores of panes since run again
            self.scores = message.scores
            self.show_labels()

    def action_stop(self) -> None:
        if self.replies is not None:
            self.replies.cancel()

    async def action_more(self) -> None:
        await self.resize(+1)

    async def action_fewer(self) -> None:
        await self.resize(-1)

    async def resize(self, step: int) -> None:
        if self.streaming:
            self.app.notify("wait for the panes to finish (Ctrl+S stops them)", severity="warning")
        elif 2 <= self.n + step <= 6:
            self.n += step
            await self.action_run()

    def action_close(self) -> None:
        if self.replies is not None:
            self.replies.cancel()
        self.dismiss(self.ranked)

    @on(Input.Submitted, "#rank")
    def save_ranking(self, event: Input.Submitted) -> None:
        if self.ranked is not None:
            self.app.notify("this comparison is ranked already: Esc goes back", severity="warning")
            return
        if self.streaming or not self.comparison_id:
            self.app.notify("wait for every pane to finish (Ctrl+S stops them)", severity="warning")
            return
        try:
            best = self.record(event.value.strip().lower())
        except ParleyError as e:
            self.app.notify(str(e), severity="error")
            return
        store = self.app.store
        for i, mid in enumerate(self.message_ids):
            flag = self.query_one(f"#flag-{i}", Select).value
            if isinstance(flag, str):
                store.flag(mid, flag)
        if self.blind:   # the reveal: which pane ran what, before going back
            self.ranked = best
            self.show_labels()
            self.app.notify("ranking saved: each pane now shows its settings and model; Esc goes back")
            return
        self.app.notify("ranking saved")
        self.dismiss(best)

    def record(self, text: str) -> str | None:
        """Save the ranking typed as text; return the candidate that continues the conversation.
        Panes are named by the letters on their titles, for any number of panes."""
        store, ids = self.app.store, self.message_ids
        if text in ("tie", "bad"):
            store.vote(self.comparison_id, "tie" if text == "tie" else "both_bad")
            return ids[0]
        letters = [pane_letter(i) for i in range(len(ids))]
        groups = [g.split("=") for g in text.split()]
        named = [p for g in groups for p in g]
        if len(named) == 1 and named[0] in letters:   # just the best one: a quick vote
            best = ids[letters.index(named[0])]
            store.vote(self.comparison_id, "best", best=best)
            return best
        if sorted(named) != letters:
            raise ParleyError(f"a ranking names every pane {letters[0]}..{letters[-1]} once, best first (= joins "
                              f"ties), or just the best pane, or tie, or bad: got {text!r}")
        ranks = {ids[letters.index(p)]: rank for rank, g in enumerate(groups, 1) for p in g}
        store.rank(self.comparison_id, ranks)
        return ids[letters.index(groups[0][0])]


def pane_letter(i: int) -> str:
    return chr(ord("a") + i)


def pane_title(i: int, model: str, settings: Settings, note: str | None = None) -> str:
    """A pane's letter, model and temperature; `note` for a model that does not write left to right."""
    how = f"{note}, temperature" if note else "temperature"
    return printable(f"{pane_letter(i).upper()}  {model}  {how} {settings.temperature}")


# what a pane override can set: the numbers, and sampler_order (no spaces, so one word)
NUMBERS = [name for name, (kind, _) in FIELDS.items() if kind is not None]


def parse_overrides(text: str) -> tuple[dict, str | None]:
    """`temperature=0.3 top_k=20 model=NAME` as typed Settings fields, and the model."""
    out, model = {}, None
    for item in text.split():
        name, _, value = item.partition("=")
        if name == "model" and value:
            model = value
            continue
        if name not in NUMBERS or not value:
            raise ParleyError(f"{item!r}: write name=value with a decoding setting ({', '.join(NUMBERS)}) "
                              "or model=NAME")
        out[name] = parse_value(name, value)
    return out, model
