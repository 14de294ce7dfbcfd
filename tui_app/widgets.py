"""Widgets of the chat and compare screens. Text from users and models is never read as markup:
Static widgets get markup=False, and replies render as Markdown (which has no Rich markup)."""
from textual import events
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.message import Message
from textual.widgets import Input, Label, Markdown, Select, Static, TextArea

from engine.errors import ParleyError
from engine.settings import FIELDS, PANEL_FIELDS, Settings, parse_value
from engine.terminal import printable


class MessageView(Static):
    """One message: a role line, then the content (Markdown for replies, plain text otherwise).
    Messages take focus (Tab reaches the last, ↑/↓ move between them), so the branch keys and the
    inspector act on any message of the thread, not only the last."""

    can_focus = True
    BINDINGS = [Binding("up", "step(-1)", "Previous message", show=False),
                Binding("down", "step(1)", "Next message", show=False)]
    DEFAULT_CSS = """
    MessageView { height: auto; margin: 0 0 1 0; padding: 0 1; border-left: blank; }
    MessageView.user { background: $boost; }
    MessageView:focus { border-left: thick $accent; }
    MessageView .role { color: $text-muted; }
    """

    def __init__(self, message: dict, branch: tuple[int, int] = (1, 1)):
        super().__init__(classes=message["role"])
        self.message = message
        self.branch = branch
        self.markdown_stream = None

    def compose(self):
        yield Label(self.role_line(), classes="role", markup=False)
        if self.message["role"] == "assistant":
            yield Markdown(printable(self.message["content"]), classes="content")
        else:
            yield Static(printable(self.message["content"]), markup=False, classes="content")

    def role_line(self) -> str:
        m, (index, total) = self.message, self.branch
        parts = [m["role"]]
        if total > 1:
            parts.append(f"‹ {index}/{total} ›")
        if m.get("model"):
            parts.append(printable(m["model"]))
        if m.get("reward") is not None:   # the chosen reward model's score, where it scored this reply
            parts.append(f"reward {m['reward']:+.3f}")
        if m.get("finish_reason") and m["finish_reason"] != "eos":
            parts.append(f"[{m['finish_reason']}]")
        if m.get("status") == "partial":
            parts.append("(partial)")
        return "  ".join(parts)

    def action_step(self, step: int) -> None:
        views = list(self.parent.query_children(MessageView))
        index = views.index(self) + step
        if 0 <= index < len(views):
            views[index].select()

    def select(self) -> None:
        """Focus this message and bring it into view."""
        self.focus()
        self.scroll_visible(animate=False)

    async def append(self, text: str) -> None:
        """Stream more text into a reply: Textual's stream batches what arrives faster than it draws."""
        if self.markdown_stream is None:
            self.markdown_stream = Markdown.get_stream(self.query_one(Markdown))
        await self.markdown_stream.write(printable(text))

    async def show(self, text: str) -> None:
        """Show the reply so far in place of what was shown: a reply filled out of order (a BERT's)."""
        await self.query_one(Markdown).update(printable(text))

    async def finish(self, text: str, finish_reason: str) -> None:
        """The reply is complete: show it whole, as the store now holds it."""
        if self.markdown_stream is not None:
            await self.markdown_stream.stop()
            self.markdown_stream = None
        self.message = {**self.message, "content": text, "finish_reason": finish_reason, "status": "complete"}
        self.query_one(".role", Label).update(self.role_line())
        await self.query_one(Markdown).update(printable(text))


class PromptArea(TextArea):
    """Multi-line prompt: Enter sends, Shift+Enter or Ctrl+J starts a new line."""

    class Submitted(Message):
        def __init__(self, text: str):
            super().__init__()
            self.text = text

    async def _on_key(self, event: events.Key) -> None:
        if event.key == "enter":
            event.stop()
            event.prevent_default()
            if self.text.strip():
                self.post_message(self.Submitted(self.text))
            return
        if event.key in ("shift+enter", "ctrl+j"):
            event.stop()
            event.prevent_default()
            self.insert("\n")
            return
        await super()._on_key(event)


class SettingsPanel(VerticalScroll):
    """Live decoding controls. Every change posts `Changed` with validated settings.
    The panel is one Tab stop; ↑/↓ move between its fields (an open list keeps its own ↑/↓)."""

    BINDINGS = [Binding("up", "field(-1)", "Previous field", show=False, priority=True),
                Binding("down", "field(1)", "Next field", show=False, priority=True)]

    DEFAULT_CSS = """
    SettingsPanel { width: 34; border-left: solid $primary; padding: 0 1; }
    SettingsPanel Input { height: 3; }
    SettingsPanel .error { color: $error; }
    """

    class Changed(Message):
        def __init__(self, settings: Settings):
            super().__init__()
            self.settings = settings

    def __init__(self, settings: Settings, presets: dict[str, dict], **kwargs):
        super().__init__(**kwargs)
        self.settings, self.presets = settings, presets

    def compose(self):
        yield Label("Decoding  (F2 hides)")
        options = [(name, name) for name in self.presets]
        yield Select(options, prompt="preset", id="preset", allow_blank=True)
        yield Select([("sample", "sample"), ("greedy", "greedy"), ("beam", "beam")], value=self.settings.strategy,
                     id="strategy", allow_blank=False)
        for name in PANEL_FIELDS:
            value = getattr(self.settings, name)
            yield Label(name.replace("_", " "))
            yield Input("" if value is None else str(value), id=f"set-{name}", tooltip=FIELDS[name][1].help)
        yield Input(placeholder="save as preset…", id="save-preset")
        yield Label("", id="settings-error", classes="error", markup=False)

    def fields(self) -> list:
        return [w for w in self.query("Select, Input") if w.focusable]

    def focus_field(self, index: int) -> None:
        fields = self.fields()
        if fields:
            fields[index % len(fields)].focus()

    def action_field(self, step: int) -> None:
        from textual.actions import SkipAction
        fields, focused = self.fields(), self.screen.focused
        here = next((i for i, f in enumerate(fields) if focused is f), None)
        if here is None:   # inside an open Select list: its ↑/↓ pick an option
            raise SkipAction()
        self.focus_field(max(0, min(len(fields) - 1, here + step)))

    def show(self, settings: Settings) -> None:
        self.settings = settings
        for name in PANEL_FIELDS:
            value = getattr(settings, name)
            self.query_one(f"#set-{name}", Input).value = "" if value is None else str(value)

    def read(self) -> Settings:
        values = {}
        for name in PANEL_FIELDS:
            text = self.query_one(f"#set-{name}", Input).value.strip()
            values[name] = parse_value(name, text) if text else None if name == "seed" else getattr(Settings(), name)
        strategy = self.query_one("#strategy", Select).value
        if strategy == "greedy":
            values["temperature"] = 0.0
        if strategy != "beam":
            values["num_beams"] = 1
        elif values["num_beams"] < 2:
            values["num_beams"] = 4
        return Settings(**values).validate()

    def on_input_changed(self, event: Input.Changed) -> None:
        if event.input.id != "save-preset":
            self.emit()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id != "save-preset" or not event.value.strip():
            return
        name = event.value.strip()
        saved = {**self.app.store.preference("presets", {}), name: self.settings.to_dict()}
        self.app.store.set_preference("presets", saved)
        self.presets[name] = self.settings.to_dict()
        self.query_one("#preset", Select).set_options([(n, n) for n in self.presets])
        event.input.value = ""
        self.app.notify(f"preset {name!r} saved")

    def on_select_changed(self, event: Select.Changed) -> None:
        if event.select.id == "preset" and event.value in self.presets:
            self.show(Settings(**self.presets[event.value]))
        self.emit()

    def emit(self) -> None:
        error = self.query_one("#settings-error", Label)
        try:
            settings = self.read()
        except ParleyError as e:
            error.update(str(e))
            return
        error.update("")
        self.settings = settings
        self.post_message(self.Changed(settings))


class StatusLine(Static):
    DEFAULT_CSS = "StatusLine { height: 1; background: $panel; color: $text-muted; padding: 0 1; }"
