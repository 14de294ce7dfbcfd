"""The models screen: pick the model to chat with, add a directory, or choose the reward model that
scores compare panes and picks best-of-N replies."""
from textual import on, work
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Input, Label, ListItem, ListView

from engine.errors import ParleyError
from engine.terminal import printable


class ModelsScreen(ModalScreen):
    """The models Parley knows: pick one (it becomes the default), or add a directory."""

    BINDINGS = [Binding("escape", "dismiss", "Close", id="dismiss")]
    DEFAULT_CSS = """
    ModelsScreen { align: center middle; }
    #models-box { width: 80%; height: 70%; border: solid $primary; background: $surface; padding: 0 1; }
    """

    def compose(self):
        with Vertical(id="models-box"):
            yield Label("Models: Enter picks one (it becomes the default)")
            yield ListView(id="model-list")
            yield Input(placeholder="add: NAME /path/to/model-directory", id="add-model")
            yield Label(self.reward_line(), id="reward-model-now", markup=False)
            yield Input(placeholder="reward model: a directory or name (Enter loads and uses it; - for none)",
                        id="reward-model")

    def reward_line(self) -> str:
        name = self.app.reward_model_name
        return printable(f"reward model: {name}" if name else "reward model: none (compare panes are not scored)")

    async def on_mount(self) -> None:
        await self.refresh_models()
        self.query_one("#model-list").focus()

    async def refresh_models(self) -> None:
        from engine.registry import BUILTIN, known_models
        view = self.query_one("#model-list", ListView)
        await view.clear()
        names = list(known_models().items())
        for name, path in names:
            mark = "● " if name == self.app.model_name else "  "
            where = "shipped with Parley" if BUILTIN.get(name) == path else str(path)
            line = f"{mark}{name}  {where}{lineage_note(self.app.store, name)}"
            await view.append(ListItem(Label(printable(line), markup=False), name=name))
        # the list opens on the model in use, so Down + Enter picks the next one, not this one again
        current = self.app.model_name
        view.index = next((i for i, (name, path) in enumerate(names) if current in (name, str(path))), 0)

    @on(ListView.Selected, "#model-list")
    def pick(self, event: ListView.Selected) -> None:
        self.app.switch_model(event.item.name)
        self.dismiss(event.item.name)

    @on(Input.Submitted, "#add-model")
    def add(self, event: Input.Submitted) -> None:
        parts = event.value.strip().split(maxsplit=1)
        if len(parts) != 2:
            self.app.notify("type a name, a space, then the model directory", severity="error")
            return
        self.validate_and_add(*parts)

    @work(thread=True, group="models")
    def validate_and_add(self, name: str, path: str) -> None:
        from engine.chat import open_model
        try:
            _, info = open_model(path, device="cpu")   # the engine's own checks: files, type, tensors
        except ParleyError as e:
            self.app.call_from_thread(self.app.notify, str(e), title="not added", severity="error", timeout=20)
            return
        # the directory it resolved to: an org/name from the Hugging Face cache is its snapshot
        self.app.call_from_thread(self.added, name, info.path)

    async def added(self, name: str, path: str) -> None:
        try:
            self.app.store.add_model(name, path)
        except ParleyError as e:
            self.app.notify(str(e), severity="error")
            return
        self.query_one("#add-model", Input).value = ""
        self.app.notify(f"added {name}")
        await self.refresh_models()

    @on(Input.Submitted, "#reward-model")
    def choose_reward_model(self, event: Input.Submitted) -> None:
        name = event.value.strip()
        if name in ("", "-"):
            self.app.use_reward_model(None)
            self.query_one("#reward-model-now", Label).update(self.reward_line())
            self.app.notify("no reward model: compare panes are not scored, best-of-N is off")
            return
        self.app.notify(f"loading the reward model {name}…")
        self.load_reward_model(name)

    @work(thread=True, group="models")
    def load_reward_model(self, name: str) -> None:
        from engine.chat import open_reward_model
        try:
            rm, _ = open_reward_model(name, self.app.device)   # the engine's checks: a reward model's files and head
        except ParleyError as e:
            self.app.call_from_thread(self.app.notify, str(e), title="reward model not used", severity="error",
                                      timeout=20)
            return
        self.app.call_from_thread(self.reward_model_loaded, name, rm)

    def reward_model_loaded(self, name: str, rm) -> None:
        self.app.use_reward_model(name, rm)
        self.query_one("#reward-model", Input).value = ""
        self.query_one("#reward-model-now", Label).update(self.reward_line())
        self.app.notify(f"reward model: {self.app.reward_model_name}")


def lineage_note(store, name: str) -> str:
    """Where a model trained here comes from: the models it was trained from, newest first, and
    the run that trained it."""
    chain = store.lineage(name)
    if len(chain) < 2:
        return ""
    run = chain[0]["run"]
    return "  ← from " + " ← ".join(m["name"] for m in chain[1:]) + (
        f" · by {run['kind']} run {run['id']} ({run['status']})" if run else "")
