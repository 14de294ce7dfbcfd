"""The chat and compare screens. Generation runs in worker threads and reaches the widgets through
`call_from_thread`; the UI thread never waits on the model."""
import dataclasses
import math

from textual import on, work
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen, Screen
from textual.widgets import Footer, Header, Input, Label, ListItem, ListView, Select, Static, TextArea

from engine.chat import Replies
from engine.errors import ParleyError
from engine.sampling import Settings
from engine.store import Store
from tui_app.widgets import MessageView, PromptArea, SettingsPanel, StatusLine

TEMPLATES = {
    "zero-shot": "{question}",
    "few-shot": "Here are some examples:\n\nQ: {example question}\nA: {example answer}\n\nQ: {question}\nA:",
    "chain-of-thought": "{question}\n\nLet's think step by step.",
}
GUIDANCE = ("Rank by what helps the user most: helpful (does what was asked), truthful (no made-up facts), "
            "harmless (nothing unsafe). When unsure, call it a tie.")
FLAGS = [("fails the instruction", "fails_instruction"), ("made-up facts", "made_up_facts"), ("unsafe", "unsafe")]


def stream_replies(screen, conversation_id, parent_id, settings, started, on_event) -> None:
    """In a worker thread: wait for the model, generate, and hand every event to the UI thread.
    `screen.replies` is the running generation (for stop and live settings), None when done."""
    app = screen.app
    app.model_ready.wait()   # a message sent while the model loads waits for it
    if app.lm is None:
        return
    with Store(app.store.path) as store:   # SQLite connections are per thread
        try:
            replies = Replies(app.lm, store, conversation_id, parent_id, settings, app.model_name)
        except ParleyError as e:
            app.call_from_thread(app.notify, str(e), severity="error")
            return
        screen.replies = replies
        try:
            app.call_from_thread(started, replies, [store.message(m) for m in replies.message_ids])
            for event in replies:
                app.call_from_thread(on_event, event)
        finally:
            screen.replies = None


def remap_keys(screen: Screen, keys: dict[str, str]) -> None:
    """Move actions to the keys the user chose in config.toml ([keys] action = "key")."""
    known = {b.action: b for b in screen.BINDINGS}
    for action, key in keys.items():
        if action not in known:
            screen.app.notify(f"config.toml: unknown action {action!r} in [keys]", severity="warning")
            continue
        old = known[action]
        for k in old.key.split(",") + [key]:   # the user's choice wins over a default on that key
            screen._bindings.key_to_bindings.pop(k, None)
        screen._bindings.bind(key, action, old.description)


class ChatScreen(Screen):
    BINDINGS = [
        Binding("ctrl+n", "new_conversation", "New"),
        Binding("escape", "stop", "Stop"),
        Binding("ctrl+r", "regenerate", "Regenerate"),
        Binding("ctrl+o", "compare", "Compare"),
        Binding("alt+left", "branch(-1)", "◀ Branch"),
        Binding("alt+right", "branch(1)", "Branch ▶"),
        Binding("ctrl+f", "search", "Search"),
        Binding("ctrl+t", "template", "Template"),
        Binding("f2", "toggle_settings", "Settings"),
        Binding("f3", "edit_last", "Edit"),
        Binding("f4", "copy_reply", "Copy"),
        Binding("f5", "archive", "Archive"),
        Binding("f8", "delete", "Delete"),
        Binding("f9", "inspect", "Inspect"),
        Binding("ctrl+l", "models", "Models"),
        Binding("ctrl+b", "training", "Training"),
        Binding("ctrl+g", "conversation", "Conversation"),
    ]
    DEFAULT_CSS = """
    #sidebar { width: 30; border-right: solid $primary; }
    #log { height: 1fr; padding: 0 1; }
    PromptArea { height: 5; }
    #notice { color: $warning; height: auto; }
    """

    def __init__(self):
        super().__init__()
        self.conversation_id: str | None = None
        self.replies: Replies | None = None
        self.views: dict[str, MessageView] = {}
        self.editing: dict | None = None

    @property
    def store(self) -> Store:
        return self.app.store

    def compose(self):
        yield Header()
        with Horizontal():
            with Vertical(id="sidebar"):
                yield Input(placeholder="search (Ctrl+F)", id="search")
                yield ListView(id="conversations")
            with Vertical():
                yield VerticalScroll(id="log")
                yield Label("", id="notice", markup=False)
                yield StatusLine("loading model…", id="status", markup=False)
                yield PromptArea(id="prompt")
            yield SettingsPanel(self.app.settings, self.app.presets, id="settings")
        yield Footer()

    async def on_mount(self) -> None:
        remap_keys(self, self.app.keys)
        await self.refresh_conversations()
        self.query_one(PromptArea).focus()

    # -- conversation list ---------------------------------------------------------------------------
    async def refresh_conversations(self, query: str = "") -> None:
        view = self.query_one("#conversations", ListView)
        await view.clear()
        if query:
            seen = {}
            for hit in self.store.search(query):
                seen.setdefault(hit["conversation_id"], hit)
            items = [(cid, f"{hit['conversation_title'] or 'untitled'}: {hit['snippet']}") for cid, hit in seen.items()]
        else:
            items = [(c["id"], c["title"] or "untitled") for c in self.store.conversations()]
        for cid, title in items:
            await view.append(ListItem(Label(title, markup=False), name=cid))

    @on(ListView.Selected, "#conversations")
    async def open_selected(self, event: ListView.Selected) -> None:
        await self.open_conversation(event.item.name)

    @on(Input.Submitted, "#search")
    async def run_search(self, event: Input.Submitted) -> None:
        await self.refresh_conversations(event.value.strip())
        self.query_one("#conversations").focus()

    async def open_conversation(self, conversation_id: str | None) -> None:
        self.conversation_id = conversation_id
        log = self.query_one("#log", VerticalScroll)
        await log.remove_children()
        self.views.clear()
        self.query_one("#notice", Label).update("")
        if conversation_id is None:
            return
        conversation = self.store.conversation(conversation_id)
        self.sub_title = conversation["title"]
        if conversation["model"] and conversation["model"] != self.app.model_name:
            self.app.switch_model(conversation["model"])   # each conversation keeps its own model
        if conversation["system_prompt"]:
            await log.mount(Static(f"system: {conversation['system_prompt']}", markup=False, classes="system"))
        for m in self.store.thread(conversation_id):
            await self.show_message(m)
        log.scroll_end(animate=False)

    async def show_message(self, message: dict) -> MessageView:
        siblings = self.store.siblings(message["id"])
        index = [s["id"] for s in siblings].index(message["id"]) + 1
        view = MessageView(message, (index, len(siblings)))
        self.views[message["id"]] = view
        await self.query_one("#log", VerticalScroll).mount(view)
        return view

    # -- sending and generating ----------------------------------------------------------------------
    @on(PromptArea.Submitted)
    async def send(self, event: PromptArea.Submitted) -> None:
        if self.replies is not None:
            self.app.notify("a reply is still streaming: Esc stops it", severity="warning")
            return
        text = event.text.strip()
        self.query_one(PromptArea).clear()
        if self.conversation_id is None:
            self.conversation_id = self.store.create_conversation(text[:40], self.app.system_prompt,
                                                                  self.app.model_name)
            await self.refresh_conversations()
        if self.editing is not None:  # an edit is a sibling of the original, never an overwrite
            user_id = self.store.edit_message(self.editing["id"], text)
            self.editing = None
        else:
            user_id = self.store.add_message(self.conversation_id, "user", text)
        await self.open_conversation(self.conversation_id)
        self.start_replies(user_id, [self.query_one(SettingsPanel).settings])

    def start_replies(self, parent_id: str, settings: list[Settings]) -> None:
        self.query_one("#status", StatusLine).update("waiting for the model…" if not self.app.model_ready.is_set()
                                                     else "generating…")
        self.generate(self.conversation_id, parent_id, settings)

    @work(thread=True, exclusive=True, group="generate")
    def generate(self, conversation_id: str, parent_id: str, settings: list[Settings]) -> None:
        stream_replies(self, conversation_id, parent_id, settings, self.replies_started, self.reply_event)

    async def replies_started(self, replies: Replies, messages: list[dict]) -> None:
        for m in messages:
            await self.show_message(m)
        if replies.dropped_turns:
            self.query_one("#notice", Label).update(
                f"the {replies.dropped_turns} oldest turns no longer fit the model's context and were left out")

    async def reply_event(self, event) -> None:
        view = self.views.get(event.message_id)
        if view is None:
            return
        if event.token is not None:
            if event.token.text:
                await view.append(event.token.text)
            self.app.last_tokens[event.message_id] = self.app.last_tokens.get(event.message_id, []) + [event.token]
        if event.finished is not None:
            await view.finish(self.store.message(event.message_id))
            t = event.finished.timings
            self.query_one("#status", StatusLine).update(
                f"{t['tokens']} tokens  {t['decode_tokens_per_s']:.1f} tok/s  first token {t['prefill_s']:.2f} s  "
                f"({event.finished.finish_reason})")
        self.query_one("#log", VerticalScroll).scroll_end(animate=False)

    def on_settings_panel_changed(self, event: SettingsPanel.Changed) -> None:
        self.app.settings = event.settings
        if self.replies is not None and event.settings.num_beams == 1:
            try:  # applies from the next token
                self.replies.update(0, dataclasses.replace(event.settings,
                                                           max_new_tokens=self.replies.settings[0].max_new_tokens))
            except ParleyError as e:
                self.app.notify(str(e), severity="warning")

    # -- actions -------------------------------------------------------------------------------------
    def action_stop(self) -> None:
        if self.replies is not None:
            self.replies.cancel()

    async def action_new_conversation(self) -> None:
        await self.open_conversation(None)
        self.query_one(PromptArea).focus()

    def last(self, role: str) -> dict | None:
        thread = self.store.thread(self.conversation_id) if self.conversation_id else []
        return next((m for m in reversed(thread) if m["role"] == role), None)

    async def action_regenerate(self) -> None:
        reply = self.last("assistant")
        user = self.last("user")
        if user is None or self.replies is not None:
            return
        parent = reply["parent_id"] if reply else user["id"]
        self.store.set_current_leaf(self.conversation_id, parent)
        await self.open_conversation(self.conversation_id)
        self.start_replies(parent, [dataclasses.replace(self.query_one(SettingsPanel).settings, seed=None)])

    def action_edit_last(self) -> None:
        user = self.last("user")
        if user is not None:
            self.editing = user
            prompt = self.query_one(PromptArea)
            prompt.text = user["content"]
            prompt.focus()
            self.app.notify("editing: Enter sends the edit as a new branch")

    async def action_branch(self, step: int) -> None:
        """Show the previous or next sibling of the last message, with its newest continuation."""
        thread = self.store.thread(self.conversation_id) if self.conversation_id else []
        if not thread:
            return
        target = self.focused_message() or thread[-1]
        siblings = [s["id"] for s in self.store.siblings(target["id"])]
        index = siblings.index(target["id"]) + step
        if 0 <= index < len(siblings):
            self.store.set_current_leaf(self.conversation_id, self.store.newest_leaf(siblings[index]))
            await self.open_conversation(self.conversation_id)

    def focused_message(self) -> dict | None:
        node = self.app.focused
        while node is not None and not isinstance(node, MessageView):
            node = node.parent
        return node.message if node is not None else None

    def action_copy_reply(self) -> None:
        reply = self.last("assistant")
        if reply:
            self.app.copy_to_clipboard(reply["content"])
            self.app.notify("reply copied")

    def action_search(self) -> None:
        self.query_one("#search", Input).focus()

    def action_template(self) -> None:
        prompt = self.query_one(PromptArea)
        names = list(TEMPLATES)
        current = getattr(self, "_template", -1)
        self._template = (current + 1) % len(names)
        question = prompt.text.strip() or "{question}"
        prompt.text = TEMPLATES[names[self._template]].replace("{question}", question)
        self.app.notify(f"{names[self._template]} template (Ctrl+T again for the next)")

    async def action_archive(self) -> None:
        if self.conversation_id:
            self.store.archive_conversation(self.conversation_id)
            await self.open_conversation(None)
            await self.refresh_conversations()

    async def action_delete(self) -> None:
        if not self.conversation_id:
            return
        if getattr(self, "_confirm_delete", None) != self.conversation_id:
            self._confirm_delete = self.conversation_id
            self.app.notify("press F8 again to delete this conversation for good", severity="warning")
            return
        self._confirm_delete = None
        self.store.delete_conversation(self.conversation_id)
        await self.open_conversation(None)
        await self.refresh_conversations()

    def action_toggle_settings(self) -> None:
        panel = self.query_one(SettingsPanel)
        panel.display = not panel.display

    def action_conversation(self) -> None:
        if self.conversation_id:
            self.app.push_screen(ConversationScreen(self.store.conversation(self.conversation_id)),
                                 callback=self.conversation_changed)

    async def conversation_changed(self, fields: dict | None) -> None:
        if fields:
            await self.refresh_conversations()
            await self.open_conversation(self.conversation_id)

    def action_training(self) -> None:
        self.app.push_screen(TrainingScreen())

    def action_models(self) -> None:
        self.app.push_screen(ModelsScreen())

    def action_inspect(self) -> None:
        reply = self.focused_message() or self.last("assistant")
        tokens = self.app.last_tokens.get(reply["id"]) if reply else None
        if not tokens:
            self.app.notify("the inspector shows replies generated in this session", severity="warning")
            return
        self.app.push_screen(InspectorScreen(tokens, reply.get("settings")))

    def action_compare(self) -> None:
        user = self.last("user")
        if user is None:
            self.app.notify("write a message first: compare answers it", severity="warning")
            return
        self.app.push_screen(CompareScreen(self.conversation_id, user["id"], self.query_one(SettingsPanel).settings),
                             callback=self.compared)

    async def compared(self, chosen: str | None) -> None:
        if chosen:
            self.store.set_current_leaf(self.conversation_id, chosen)
        await self.open_conversation(self.conversation_id)


class CompareScreen(Screen):
    """2-6 candidates for one context, side by side, in one batched run; then rank them."""

    BINDINGS = [
        Binding("escape", "close", "Back"),
        Binding("ctrl+s", "stop", "Stop"),
        Binding("ctrl+up", "more", "+ Pane"),
        Binding("ctrl+down", "fewer", "- Pane"),
        Binding("ctrl+g", "run", "Run"),
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
        self.replies: Replies | None = None
        self.message_ids: list[str] = []
        self.comparison_id: str | None = None

    SPREAD = [0.3, 0.7, 1.0, 1.3, 0.5, 1.6]

    def pane_settings(self) -> list[Settings]:
        """Pane i: the chat's settings with its own temperature, then the pane's own overrides."""
        out = []
        for i in range(self.n):
            s = dataclasses.replace(self.base, temperature=self.SPREAD[i], seed=None, num_beams=1)
            out.append(dataclasses.replace(s, **self.overrides.get(i, {})).validate())
        return out

    @on(Input.Submitted, ".pane-settings")
    async def pane_settings_changed(self, event: Input.Submitted) -> None:
        i = int(event.input.id.removeprefix("pane-settings-"))
        try:
            self.overrides[i] = parse_overrides(event.value)
            self.pane_settings()
        except ParleyError as e:
            self.overrides.pop(i, None)
            self.app.notify(str(e), severity="error")
            return
        await self.action_run()

    def compose(self):
        yield Header()
        yield Horizontal(id="panes")
        yield Static(GUIDANCE, id="guidance", markup=False)
        yield Input(placeholder="rank: pane numbers best first, = for a tie (2 1=3); two panes: a, b, tie, bad",
                    id="rank")
        yield Footer()

    async def on_mount(self) -> None:
        await self.action_run()

    async def action_run(self) -> None:
        if self.replies is not None:
            return
        panes = self.query_one("#panes", Horizontal)
        await panes.remove_children()
        for i, s in enumerate(self.pane_settings()):
            pane = Vertical(Label(f"{chr(65 + i)}  temperature {s.temperature}", markup=False),
                            Input(" ".join(f"{k}={v}" for k, v in self.overrides.get(i, {}).items()),
                                  placeholder="e.g. temperature=0.3 top_k=20 (Enter runs again)",
                                  id=f"pane-settings-{i}", classes="pane-settings"),
                            VerticalScroll(id=f"body-{i}"),
                            Select(FLAGS, prompt="flag…", id=f"flag-{i}"), classes="pane")
            await panes.mount(pane)
        self.run_panes(self.pane_settings())
        self.query_one("#rank", Input).focus()

    @work(thread=True, exclusive=True, group="compare")
    def run_panes(self, settings: list[Settings]) -> None:
        stream_replies(self, self.conversation_id, self.parent_id, settings, self.mount_views, self.pane_event)

    async def mount_views(self, replies: Replies, messages: list[dict]) -> None:
        self.message_ids, self.comparison_id = replies.message_ids, replies.comparison_id
        for i, m in enumerate(messages):
            await self.query_one(f"#body-{i}", VerticalScroll).mount(MessageView(m))

    async def pane_event(self, event) -> None:
        view = self.query_one(f"#body-{event.candidate}", VerticalScroll).query_one(MessageView)
        if event.token is not None and event.token.text:
            await view.append(event.token.text)
        if event.finished is not None:
            await view.finish(self.app.store.message(event.message_id))

    def action_stop(self) -> None:
        if self.replies is not None:
            self.replies.cancel()

    async def action_more(self) -> None:
        await self.resize(+1)

    async def action_fewer(self) -> None:
        await self.resize(-1)

    async def resize(self, step: int) -> None:
        if self.replies is not None:
            self.app.notify("wait for the panes to finish (Ctrl+S stops them)", severity="warning")
        elif 2 <= self.n + step <= 6:
            self.n += step
            await self.action_run()

    def action_close(self) -> None:
        if self.replies is not None:
            self.replies.cancel()
        self.dismiss(None)

    @on(Input.Submitted, "#rank")
    def save_ranking(self, event: Input.Submitted) -> None:
        if self.replies is not None or not self.comparison_id:
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
        self.app.notify("ranking saved")
        self.dismiss(best)

    def record(self, text: str) -> str | None:
        """Save the ranking typed as text; return the candidate that continues the conversation."""
        store, ids = self.app.store, self.message_ids
        if len(ids) == 2 and text in ("a", "b", "tie", "bad"):
            if text in ("a", "b"):
                best = ids[0] if text == "a" else ids[1]
                store.vote(self.comparison_id, "best", best=best)
                return best
            store.vote(self.comparison_id, "tie" if text == "tie" else "both_bad")
            return ids[0]
        groups = [g.split("=") for g in text.split()]
        order = [p for g in groups for p in g]
        if sorted(order) != [str(i + 1) for i in range(len(ids))]:
            raise ParleyError(f"a ranking names every pane 1..{len(ids)} once, best first (= joins ties): "
                              f"got {text!r}")
        ranks = {ids[int(p) - 1]: rank for rank, g in enumerate(groups, 1) for p in g}
        store.rank(self.comparison_id, ranks)
        return ids[int(groups[0][0]) - 1]


def parse_overrides(text: str) -> dict:
    """`temperature=0.3 top_k=20` as Settings fields with their types."""
    from dataclasses import fields
    types = {f.name: f.type for f in fields(Settings)}
    out = {}
    for item in text.split():
        name, _, value = item.partition("=")
        if name not in types or not value:
            raise ParleyError(f"{item!r}: write name=value with a decoding setting ({', '.join(sorted(types))})")
        try:
            out[name] = float(value) if types[name] in (float, "float") else int(value)
        except ValueError:
            raise ParleyError(f"{item!r}: {name} takes a number") from None
    return out


class InspectorScreen(ModalScreen):
    """Each token of a reply; for the selected one, the model's top alternatives before and after
    the reply's own temperature / top-k / top-p / ... filtering: what the settings actually did."""

    BINDINGS = [Binding("escape", "dismiss", "Close")]
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


class ModelsScreen(ModalScreen):
    """The models Parley knows: pick one (it becomes the default), or add a directory."""

    BINDINGS = [Binding("escape", "dismiss", "Close")]
    DEFAULT_CSS = """
    ModelsScreen { align: center middle; }
    #models-box { width: 80%; height: 70%; border: solid $primary; background: $surface; padding: 0 1; }
    """

    def compose(self):
        with Vertical(id="models-box"):
            yield Label("Models: Enter picks one (it becomes the default)")
            yield ListView(id="model-list")
            yield Input(placeholder="add: NAME /path/to/model-directory", id="add-model")

    async def on_mount(self) -> None:
        await self.refresh_models()
        self.query_one("#model-list").focus()

    async def refresh_models(self) -> None:
        from engine.registry import known_models
        view = self.query_one("#model-list", ListView)
        await view.clear()
        for name, path in known_models().items():
            mark = "● " if name == self.app.model_name else "  "
            await view.append(ListItem(Label(f"{mark}{name}  {path}", markup=False), name=name))

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
            open_model(path, device="cpu")   # the engine's own checks: files, type, tensors
        except ParleyError as e:
            self.app.call_from_thread(self.app.notify, str(e), title="not added", severity="error", timeout=20)
            return
        self.app.call_from_thread(self.added, name, path)

    async def added(self, name: str, path: str) -> None:
        try:
            self.app.store.add_model(name, path)
        except ParleyError as e:
            self.app.notify(str(e), severity="error")
            return
        self.query_one("#add-model", Input).value = ""
        self.app.notify(f"added {name}")
        await self.refresh_models()


class TrainingScreen(Screen):
    """Preference data at a glance, every training run with live curves, and runs to start or cancel.
    A run is a separate `parley train ...` process: the app only reads what it writes to the store."""

    BINDINGS = [Binding("escape", "app.pop_screen", "Back"), Binding("f8", "cancel_run", "Cancel run")]
    DEFAULT_CSS = """
    #counts { height: auto; color: $text-muted; }
    #runs { height: 1fr; }
    #curves { height: auto; }
    .curve { height: 3; }
    """

    def __init__(self):
        super().__init__()
        self.selected: str | None = None
        self.processes: dict[str, object] = {}

    def compose(self):
        yield Header()
        yield Static("", id="counts", markup=False)
        yield ListView(id="runs")
        yield Vertical(id="curves")
        yield Input(placeholder="start: train sft --model default --max-steps 100 --out DIR (any `parley train` "
                                "arguments)", id="start-run")
        yield Footer()

    async def on_mount(self) -> None:
        await self.refresh_runs()
        self.set_interval(1.0, self.refresh_runs)

    async def refresh_runs(self) -> None:
        store = self.app.store
        counts = store.counts()
        self.query_one("#counts", Static).update(
            f"{counts['rankings']} rankings · {counts['preference_pairs']} preference pairs · "
            f"{counts['comparisons']} comparisons · {counts['conversations']} conversations · {counts['runs']} runs")
        view = self.query_one("#runs", ListView)
        runs = store.runs()
        rows = [(r["id"], self.run_line(r)) for r in runs]
        if [item.name for item in view.query(ListItem)] != [rid for rid, _ in rows]:
            index = view.index
            await view.clear()
            for rid, line in rows:
                await view.append(ListItem(Label(line, markup=False), name=rid))
            view.index = index if index is not None and index < len(rows) else (0 if rows else None)
        else:
            for item, (_, line) in zip(view.query(ListItem), rows):
                item.query_one(Label).update(line)
        if view.index is not None and rows:
            self.selected = rows[view.index][0]
            await self.show_curves(self.selected)

    def run_line(self, run: dict) -> str:
        metrics = self.app.store.metrics(run["id"])
        steps = max((m["step"] for m in metrics), default=0)
        total = run["config"].get("max_steps", "?")
        last = {m["name"]: m["value"] for m in metrics if m["step"] == steps}
        shown = "  ".join(f"{k} {v:.4g}" for k, v in last.items() if k in ("loss", "eval_loss", "reward", "kl"))
        return (f"{run['kind']:<9}{run['status']:<10}step {steps}/{total}  {shown}  "
                f"{run['base_model'] or ''} → {run['output_model'] or run['config'].get('out', '')}")

    async def show_curves(self, run_id: str) -> None:
        from textual.widgets import Sparkline
        series: dict[str, list[float]] = {}
        for m in self.app.store.metrics(run_id):
            if m["name"] in ("loss", "eval_loss", "reward", "kl", "accuracy"):
                series.setdefault(m["name"], []).append(m["value"])
        box = self.query_one("#curves", Vertical)
        await box.remove_children()
        for name, values in series.items():
            await box.mount(Label(f"{name}: {values[-1]:.4g} (from {values[0]:.4g})", markup=False),
                            Sparkline(values, classes="curve"))

    @on(Input.Submitted, "#start-run")
    def start_run(self, event: Input.Submitted) -> None:
        import shlex
        import subprocess
        import sys
        args = shlex.split(event.value)
        if not args or args[0] != "train":
            self.app.notify("a run starts with `train`, e.g. train sft --model default --out my-model",
                            severity="error")
            return
        log = open(self.app.store.path.parent / "last-run.log", "w")
        process = subprocess.Popen([sys.executable, "-m", "tui_app", *args], stdout=log, stderr=log,
                                   stdin=subprocess.DEVNULL)
        self.processes[str(process.pid)] = process
        event.input.value = ""
        self.app.notify(f"started {' '.join(args[:2])} (pid {process.pid}); its output is in last-run.log")

    def action_cancel_run(self) -> None:
        import os
        import signal
        if not self.selected:
            return
        run = self.app.store.run(self.selected)
        if run["status"] != "running" or not run["pid"]:
            self.app.notify("that run is not running", severity="warning")
            return
        try:
            os.kill(run["pid"], signal.SIGTERM)   # the trainer records the run as cancelled
            self.app.notify(f"cancelling run {run['id']}")
        except ProcessLookupError:
            self.app.store.end_run(run["id"], "failed", error="the process was gone")


class ConversationScreen(ModalScreen):
    """A conversation's title, system prompt and model."""

    BINDINGS = [Binding("escape", "dismiss", "Close"), Binding("ctrl+s", "save", "Save")]
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
