"""Parley's terminal app: chat, live decoding controls, compare and rank.

The UI is up before the model and before torch: nothing here imports it (settings come from
engine/settings.py), loading starts after the first frame in a worker thread, and a message sent
meanwhile waits for it. Key bindings can be remapped in config.toml in the user config directory
(checked in tui_app/keys.py, applied as Textual's keymap):

    [keys]
    regenerate = "f12"
"""
import threading
import tomllib
from pathlib import Path

from textual.app import App
from textual.binding import Binding

from engine.errors import ParleyError
from engine.paths import config_dir
from engine.settings import PRESETS, Settings
from engine.store import Store
from engine.terminal import printable
from tui_app.keys import check_keymap
from tui_app.screens import ChatScreen

def load_config() -> dict:
    """config.toml, its [keys] checked against every screen's bindings (a bad entry stops the start)."""
    path = config_dir() / "config.toml"
    if not path.is_file():
        return {}
    try:
        text = path.read_text(encoding="utf-8")
        config = tomllib.loads(text)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ParleyError(f"{path} is not valid TOML ({e}): fix or delete it") from None
    if "keys" in config:
        from tui_app.screens import SCREENS
        config["keys"] = check_keymap(config["keys"], SCREENS, ParleyApp, str(path), text)
    return config


def reward_model_key(name: str) -> str:
    """How a reward model is named in the store (its scores, the preference): a directory by its
    absolute path, so the same model is one name whichever directory the app started in."""
    path = Path(name).expanduser()
    return str(path.resolve()) if path.is_dir() else name


class ParleyApp(App):
    TITLE = "Parley"
    BINDINGS = [Binding("f1", "help", "Help", id="help"), Binding("question_mark", "help", "Help", show=False, id="help")]

    def __init__(self, model: str | None = None, store: Store | None = None, device: str | None = None,
                 quantize: str | None = None, reward_model: str | None = None):
        super().__init__()
        self.config = load_config()
        self.owns_store = store is None   # a store handed in (tests, embedding) stays its giver's to close
        self.store = store or Store()
        self.model_name = model or self.store.preference("last_model") or "default"
        self.device = device
        self.quantize = quantize   # "int8" or None: passed through to the engine (engine/quantize.py)
        self.lm = None
        self.other_models = {}   # name: model, for compare panes with a model of their own
        self.model_ready = threading.Event()
        self.settings = Settings()
        self.presets = {**PRESETS, **self.store.preference("presets", {})}   # built in, then the user's
        self.system_prompt = self.config.get("system_prompt", "")
        self.rounds = []   # "train on my rankings" runs of this session (tui_app/rounds.py)
        self.set_keymap(self.config.get("keys", {}))   # binding id (the action's name) -> key
        # the reward model that scores compare panes and picks best-of-N replies: --reward-model, or
        # the one chosen last (a preference); loaded on first use, in a worker
        self.reward_model_name = reward_model_key(reward_model) if reward_model else \
            self.store.preference("reward_model")
        self.rm = None
        self.rm_lock = threading.Lock()
        self.best_of = int(self.store.preference("best_of", 1))   # replies per message in the chat (Alt+N)

    def on_mount(self) -> None:
        self.push_screen(ChatScreen())
        # after the first frame: the load imports torch, which holds the interpreter for a second or more
        self.call_after_refresh(self.load_model)

    def notify(self, message: str, *, title: str = "", markup: bool = False, **kwargs) -> None:
        """Every notification as plain, printable text: they carry errors that quote paths, names
        and model text, which must never be read as markup or reach the terminal as control codes."""
        super().notify(printable(message), title=printable(title), markup=markup, **kwargs)

    def action_help(self) -> None:
        from tui_app.screens.help import HelpScreen
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen(self.screen))

    def get_system_commands(self, screen):
        """The command palette (Ctrl+P) holds every action of the screen, then Textual's own."""
        from tui_app.screens.help import palette_commands
        yield from palette_commands(screen)
        yield from super().get_system_commands(screen)

    def on_unmount(self) -> None:
        # Closing the last connection checkpoints the WAL into parley.db: a clean quit leaves one
        # whole file, not the data in parley.db-wal.
        if self.owns_store:
            self.store.close()

    def load_model(self) -> None:
        from engine.chat import open_model

        def work():
            try:
                self.lm, info = open_model(self.model_name, self.device, quantize=self.quantize)
                self.call_from_thread(self.model_loaded, info)
            except ParleyError as e:
                self.call_from_thread(self.model_failed, str(e))
            finally:
                self.model_ready.set()
        self.run_worker(work, thread=True, group="model")

    def other_model(self, name: str):
        """Another model for a compare pane, loaded once (call it from a worker thread)."""
        from engine.chat import open_model
        if name == self.model_name:
            return self.lm
        if name not in self.other_models:
            self.other_models[name] = open_model(name, self.device, quantize=self.quantize)[0]
        return self.other_models[name]

    def reward_model(self):
        """The chosen reward model, loaded once (call it from a worker thread); None when none is chosen."""
        from engine.chat import open_reward_model
        with self.rm_lock:
            if self.rm is not None or not self.reward_model_name:
                return self.rm
            name, self.rm = self.reward_model_name, open_reward_model(self.reward_model_name, self.device)[0]
            rm = self.rm
        # remembered once it loads: a bad --reward-model is said once, not carried into every later start
        self.call_from_thread(self.store.set_preference, "reward_model", name)
        return rm

    def use_reward_model(self, name: str | None, rm=None) -> None:
        """Score with this reward model from now on (None: none), remembered in the store."""
        with self.rm_lock:
            self.reward_model_name, self.rm = (reward_model_key(name) if name else None), rm
        self.store.set_preference("reward_model", self.reward_model_name)

    def switch_model(self, name: str) -> None:
        """Load another model; messages sent meanwhile wait for it."""
        self.model_ready.clear()
        self.lm, self.model_name = None, name
        self.set_status(f"loading {name}…")
        self.update_headers()
        self.load_model()

    def model_loaded(self, info) -> None:
        self.store.set_preference("last_model", self.model_name)
        self.set_status(f"ready: {info.name} · {info.model_type} {info.parameters / 1e6:.1f}M · {info.device}"
                        f"{' · int8 weights' if self.quantize else ''} · "
                        f"{info.max_context}-token context")
        self.update_headers()

    def update_headers(self) -> None:
        """Every open screen that names the answering model in its header says the current one."""
        for screen in self.screen_stack:
            if hasattr(screen, "update_header"):
                screen.update_header()

    def model_failed(self, message: str) -> None:
        self.notify(message, title="model not loaded", severity="error", timeout=30)
        self.set_status(f"no model: {message}")

    def set_status(self, text: str) -> None:
        """Show text on the status line of every open screen that has one (app.query sees only the
        default screen, not the pushed ones)."""
        for screen in self.screen_stack:
            for status in screen.query("#status"):
                status.update(text)
