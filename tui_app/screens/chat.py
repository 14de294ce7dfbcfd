"""The chat screen: conversations, streaming replies, branches and live decoding controls."""
import dataclasses

from textual import on, work
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, Header, Input, Label, ListItem, ListView, Select, Static

from engine.errors import ParleyError
from engine.settings import TEMPLATES, Settings, settings_at
from engine.store import Store
from engine.terminal import printable
from tui_app.screens.arena import ArenaScreen
from tui_app.screens.compare import CompareScreen
from tui_app.screens.conversation import ConversationScreen
from tui_app.screens.inspector import InspectorScreen
from tui_app.screens.models import ModelsScreen
from tui_app.screens.replies import ReplyFinished, RepliesMixin, ReplyToken, Scored, score_in_worker, stream_replies
from tui_app.screens.training import TrainingScreen
from tui_app.screens.tree import TreeScreen
from tui_app.widgets import MessageView, PromptArea, SettingsPanel, StatusLine


BEST_OF = (1, 2, 4, 8)   # what Alt+N cycles through


class ChatScreen(RepliesMixin, Screen):
    BINDINGS = [
        Binding("ctrl+n", "new_conversation", "New", id="new_conversation"),
        Binding("escape", "stop", "Stop", show=False, id="stop"),   # the status line says "Esc stops"
        Binding("ctrl+r", "regenerate", "Regen", id="regenerate"),
        Binding("ctrl+o", "compare", "Compare", id="compare"),
        # the footer shows the keys used most; F1 lists them all, Ctrl+P searches them
        Binding("alt+left", "branch(-1)", "◀ Branch", show=False, id="branch_previous"),
        Binding("alt+right", "branch(1)", "Branch ▶", show=False, id="branch_next"),
        Binding("ctrl+f", "search", "Search", show=False, id="search"),
        Binding("ctrl+t", "template", "Template", show=False, id="template"),
        Binding("f2", "toggle_settings", "Settings", id="toggle_settings"),
        Binding("f3", "edit_last", "Edit", show=False, id="edit_last"),
        Binding("f4", "copy_reply", "Copy", show=False, id="copy_reply"),
        Binding("f5", "archive", "Archive", show=False, id="archive"),
        Binding("f8", "delete", "Delete", show=False, id="delete"),
        Binding("f9", "inspect", "Inspect", id="inspect"),
        Binding("ctrl+l", "models", "Models", id="models"),
        Binding("ctrl+b", "training", "Training", id="training"),
        Binding("ctrl+g", "conversation", "Conversation", show=False, id="conversation"),
        # not F6/F7: the prompt (a TextArea) takes them; Alt+letter reaches the screen from any widget
        Binding("alt+t", "tree", "Tree", id="tree"),
        Binding("alt+a", "toggle_archived", "Archived", show=False, id="toggle_archived"),
        Binding("alt+r", "arena", "Arena", show=False, id="arena"),
        Binding("alt+n", "best_of", "Best of N", show=False, id="best_of"),
    ]
    AUTO_FOCUS = "#prompt"   # from the first frame: keys typed while the app starts go to the prompt
    DEFAULT_CSS = """
    #sidebar { width: 30; border-right: solid $primary; }
    #log { height: 1fr; padding: 0 1; }
    PromptArea { height: 5; }
    #notice { color: $warning; height: auto; }
    #conversations Label { width: 1fr; }
    #list-title { color: $text-muted; }
    """

    def __init__(self):
        super().__init__()
        self.conversation_id: str | None = None
        self.init_replies()
        self.editing: dict | None = None
        self.archived = False   # the sidebar lists the archived conversations (Alt+A) instead
        self.best_of_ids: list[str] | None = None   # the candidates of a best-of-N reply, until scored

    @property
    def store(self) -> Store:
        return self.app.store

    def compose(self):
        yield Header()
        with Horizontal():
            with Vertical(id="sidebar"):
                yield Input(placeholder="search (Ctrl+F)", id="search")
                yield Label("", id="list-title", markup=False)
                yield ListView(id="conversations")
            with Vertical():
                yield VerticalScroll(id="log")
                yield Label("", id="notice", markup=False)
                yield StatusLine("loading model…", id="status", markup=False)
                yield PromptArea(id="prompt")
            yield SettingsPanel(self.app.settings, self.app.presets, id="settings")
        yield Footer()

    async def on_mount(self) -> None:
        await self.refresh_conversations()   # the prompt has the focus already (AUTO_FOCUS)

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
            items = [(c["id"], c["title"] or "untitled") for c in self.store.conversations(archived=self.archived)]
        self.query_one("#list-title", Label).update(
            f"found: {query!r} (an empty search lists all)" if query else
            "archived · F5 restores" if self.archived else "chats · Alt+A: archived")
        for cid, title in items:
            await view.append(ListItem(Label(printable(title), markup=False), name=cid))
        # the list opens on the open conversation (or its first row), never on nothing
        ids = [cid for cid, _ in items]
        view.index = ids.index(self.conversation_id) if self.conversation_id in ids else 0 if ids else None

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
            self.update_header()
            return
        conversation = self.store.conversation(conversation_id)
        if conversation["model"] and conversation["model"] != self.app.model_name:
            self.app.switch_model(conversation["model"])   # each conversation keeps its own model
        self.update_header()
        if conversation["system_prompt"]:
            await log.mount(Static(printable(f"system: {conversation['system_prompt']}"), markup=False, classes="system"))
        for m in self.store.thread(conversation_id):
            await self.show_message(m)
        log.scroll_end(animate=False)

    def update_header(self) -> None:
        """The header names the conversation and the model that will answer its next message."""
        title = (self.store.conversation(self.conversation_id)["title"] or "untitled") if self.conversation_id \
            else "new conversation"
        name = self.app.model_name.rstrip("/").rsplit("/", 1)[-1]   # a directory by its own name
        self.sub_title = printable(f"{title} · {name}{'' if self.app.lm is not None else ' (loading)'} answers")

    async def drop_views_from(self, message_id: str) -> None:
        """Take a message and all after it off the screen (a branch replaces them)."""
        ids = list(self.views)
        for mid in ids[ids.index(message_id):] if message_id in self.views else []:
            await self.views.pop(mid).remove()

    async def show_message(self, message: dict) -> MessageView:
        if message["role"] == "assistant" and self.app.reward_model_name:
            message = {**message, "reward": self.store.scores(self.app.reward_model_name, [message["id"]]).get(
                message["id"])}
        siblings = self.store.siblings(message["id"])
        index = [s["id"] for s in siblings].index(message["id"]) + 1
        view = MessageView(message, (index, len(siblings)))
        self.views[message["id"]] = view
        await self.query_one("#log", VerticalScroll).mount(view)
        return view

    # -- sending and generating ----------------------------------------------------------------------
    @on(PromptArea.Submitted)
    async def send(self, event: PromptArea.Submitted) -> None:
        if self.streaming:
            self.app.notify("a reply is still streaming: Esc stops it", severity="warning")
            return
        text = event.text.strip()
        self.query_one(PromptArea).clear()
        if self.conversation_id is None:
            self.conversation_id = self.store.create_conversation(text[:40], self.app.system_prompt,
                                                                  self.app.model_name)
            await self.refresh_conversations()
            await self.open_conversation(self.conversation_id)
        if self.editing is not None:  # an edit is a sibling of the original, never an overwrite
            user_id = self.store.edit_message(self.editing["id"], text)
            await self.drop_views_from(self.editing["id"])
            self.editing = None
        else:
            user_id = self.store.add_message(self.conversation_id, "user", text)
        await self.show_message(self.store.message(user_id))
        self.start_replies(user_id, self.reply_settings(self.query_one(SettingsPanel).settings))

    def reply_settings(self, settings: Settings) -> list[Settings]:
        """One reply's settings, or with best-of-N (Alt+N) and a reward model N of them: each with its
        own seed (the panel's seed plus its number, or drawn), so the N differ."""
        n = self.app.best_of
        if n > 1 and not self.app.reward_model_name:
            self.app.notify(f"best of {n} needs a reward model (parley app --reward-model DIR, or Ctrl+L): "
                            "one reply instead", severity="warning")
            n = 1
        if n > 1 and settings.num_beams > 1:
            self.app.notify("beam search gives one best sequence: best-of-N samples instead of it, so it is off "
                            "for beams", severity="warning")
            n = 1
        if n == 1:
            return [settings]
        return [dataclasses.replace(settings, seed=None if settings.seed is None else settings.seed + i)
                for i in range(n)]

    def start_replies(self, parent_id: str, settings: list[Settings], continuation: tuple | None = None) -> None:
        self.streaming = True
        self.query_one("#status", StatusLine).update("waiting for the model… (Esc stops)"
                                                     if not self.app.model_ready.is_set() else "generating… (Esc stops)")
        self.query_one("#log", VerticalScroll).scroll_end(animate=False)
        self.generate(self.conversation_id, parent_id, settings, continuation)

    @work(thread=True, exclusive=True, group="generate")
    def generate(self, conversation_id: str, parent_id: str, settings: list[Settings], continuation) -> None:
        stream_replies(self, conversation_id, parent_id, settings, continuation=continuation)

    async def mount_replies(self, replies, messages: list[dict]) -> None:
        if len(messages) > 1:   # best of N: the first streams here; the highest-scored is shown once scored
            self.best_of_ids = list(replies.message_ids)
            messages = messages[:1]
        for m in messages:
            await self.show_message(m)
        if replies.dropped_turns:
            self.query_one("#notice", Label).update(
                f"the {replies.dropped_turns} oldest turns no longer fit the model's context and were left out")

    def after_token(self, message: ReplyToken) -> None:
        self.query_one("#log", VerticalScroll).scroll_end(animate=False)

    def after_finish(self, message: ReplyFinished) -> None:
        t = message.finished.timings
        self.query_one("#status", StatusLine).update(
            f"{t['tokens']} tokens  {t['decode_tokens_per_s']:.1f} tok/s  first token {t['prefill_s']:.2f} s  "
            f"({message.finished.finish_reason})")
        self.query_one("#log", VerticalScroll).scroll_end(animate=False)
        if self.best_of_ids and not self.pending:
            self.streaming = True   # until the best is shown: a message sent now would answer the wrong reply
            self.query_one("#status", StatusLine).update(f"best of {len(self.best_of_ids)}: scoring the replies…")
            self.score_best(self.best_of_ids)

    @work(thread=True, group="scores")
    def score_best(self, message_ids: list[str]) -> None:
        score_in_worker(self, message_ids)

    async def on_scored(self, message: Scored) -> None:
        """Best of N: the highest-scored candidate becomes the reply shown; the others stay its siblings."""
        ids, self.best_of_ids, self.streaming = self.best_of_ids, None, False
        if not ids or set(message.scores) != set(ids):
            if message.error:
                self.app.notify(message.error, severity="error")
                self.query_one("#status", StatusLine).update(f"not scored: {message.error}")
            return
        scored = [i for i in ids if message.scores[i] is not None]
        if not scored:
            self.app.notify("every reply is too long for the reward model: the first is shown", severity="warning")
            return
        best = max(scored, key=lambda i: message.scores[i])
        conversation = self.store.message(best)["conversation_id"]   # the user may have opened another meanwhile
        self.store.set_current_leaf(conversation, best)
        if conversation != self.conversation_id:
            return
        await self.open_conversation(self.conversation_id)
        self.query_one("#status", StatusLine).update(
            f"best of {len(ids)} by the reward model: {message.scores[best]:+.3f} "
            f"(Alt+←/→: the other {len(ids) - 1})")

    def after_failure(self, message) -> None:
        self.query_one("#status", StatusLine).update(f"not generated: {message.error}")

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

    def last(self, *roles: str) -> dict | None | tuple:
        """The thread's last message of each role (one read of the thread)."""
        thread = self.store.thread(self.conversation_id) if self.conversation_id else []
        found = tuple(next((m for m in reversed(thread) if m["role"] == role), None) for role in roles)
        return found[0] if len(roles) == 1 else found

    async def action_regenerate(self) -> None:
        user, reply = self.last("user", "assistant")
        if user is None or self.streaming:
            return
        parent = reply["parent_id"] if reply else user["id"]
        self.store.set_current_leaf(self.conversation_id, parent)
        if reply is not None:
            await self.drop_views_from(reply["id"])
        self.start_replies(parent, self.reply_settings(dataclasses.replace(self.query_one(SettingsPanel).settings,
                                                                           seed=None)))

    def action_best_of(self) -> None:
        """Cycle best-of-N: each message gets N replies in one batched run; the reward model's
        highest-scored is shown and the others are its siblings (remembered)."""
        self.app.best_of = BEST_OF[(BEST_OF.index(self.app.best_of) + 1) % len(BEST_OF)] \
            if self.app.best_of in BEST_OF else 1
        self.store.set_preference("best_of", self.app.best_of)
        n = self.app.best_of
        self.app.notify("one reply per message" if n == 1 else
                        f"best of {n}: {n} replies per message, the reward model's highest-scored shown (Alt+←/→: "
                        "the others)" + ("" if self.app.reward_model_name else "; choose a reward model first (Ctrl+L)"))

    def action_edit_last(self) -> None:
        user = self.last("user")
        if user is not None:
            self.editing = user
            prompt = self.query_one(PromptArea)
            prompt.text = user["content"]
            prompt.focus()
            self.app.notify("editing: Enter sends the edit as a new branch")

    async def action_branch(self, step: int) -> None:
        """Show the previous or next sibling of the focused message (the last one when none has
        focus), with its newest continuation; the sibling keeps the focus."""
        thread = self.store.thread(self.conversation_id) if self.conversation_id else []
        if not thread:
            return
        focused = self.focused_message()
        target = focused or thread[-1]
        siblings = [s["id"] for s in self.store.siblings(target["id"])]
        index = siblings.index(target["id"]) + step
        if 0 <= index < len(siblings):
            await self.show_path_through(siblings[index], focus=focused is not None)

    async def show_path_through(self, message_id: str, focus: bool) -> None:
        """Open the branch through `message_id` (its newest continuation), focusing that message."""
        self.store.set_current_leaf(self.conversation_id, self.store.newest_leaf(message_id))
        await self.open_conversation(self.conversation_id)
        if focus:
            self.views[message_id].select()

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
        # Ctrl+T again cycles the template around the same question, rather than wrapping the
        # previous template's text inside the next one
        if prompt.text != getattr(self, "_templated", None):
            self._question = prompt.text.strip() or "{question}"
        prompt.text = self._templated = TEMPLATES[names[self._template]].replace("{question}", self._question)
        self.app.notify(f"{names[self._template]} template (Ctrl+T again for the next)")

    async def action_archive(self) -> None:
        """F5 archives the open conversation; in the archived list (Alt+A) it restores it."""
        if self.conversation_id:
            self.store.archive_conversation(self.conversation_id, archived=not self.archived)
            self.app.notify("restored" if self.archived else "archived: Alt+A lists the archived conversations")
            await self.open_conversation(None)
            await self.refresh_conversations()

    async def action_toggle_archived(self) -> None:
        self.archived = not self.archived
        await self.refresh_conversations()
        self.query_one("#conversations", ListView).focus()

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
        inside = self.focused is not None and panel in self.focused.ancestors_with_self
        panel.display = not panel.display
        if inside:   # hiding the panel must not leave the focus nowhere
            self.query_one(PromptArea).focus()

    # -- Tab moves between regions: search, conversations, messages, prompt, settings ---------------
    def focus_regions(self) -> list:
        regions = [self.query_one("#search"), self.query_one("#conversations")]
        regions += list(self.views.values())[-1:]   # the last message; ↑/↓ move from there
        regions.append(self.query_one(PromptArea))
        panel = self.query_one(SettingsPanel)
        if panel.display:
            regions.append(panel)
        return regions

    def focus_next(self, selector="*"):
        return self._focus_region(+1)

    def focus_previous(self, selector="*"):
        return self._focus_region(-1)

    def _focus_region(self, step: int):
        """One Tab stop per region, not one per field: within the settings panel ↑/↓ move between
        fields, within the thread between messages."""
        regions, focused = self.focus_regions(), self.focused
        here = next((i for i, r in enumerate(regions) if focused is not None and (
            r in focused.ancestors_with_self or (isinstance(r, MessageView) and isinstance(focused, MessageView)))),
            len(regions) - 1 if step > 0 else 0)
        target = regions[(here + step) % len(regions)]
        if isinstance(target, SettingsPanel):
            target.focus_field(0)
        else:
            target.focus()
        return self.focused

    def action_conversation(self) -> None:
        if self.conversation_id:
            self.app.push_screen(ConversationScreen(self.store.conversation(self.conversation_id)),
                                 callback=self.conversation_changed)

    async def conversation_changed(self, fields: dict | None) -> None:
        if fields:
            await self.refresh_conversations()
            await self.open_conversation(self.conversation_id)

    def action_tree(self) -> None:
        if self.conversation_id:
            focused = self.focused_message()
            self.app.push_screen(TreeScreen(self.store, self.conversation_id, focused and focused["id"]),
                                 callback=self.branch_picked)

    async def branch_picked(self, message_id: str | None) -> None:
        if message_id:   # picked in the tree
            await self.show_path_through(message_id, focus=True)

    def action_training(self) -> None:
        self.app.push_screen(TrainingScreen())

    def action_arena(self) -> None:
        self.app.push_screen(ArenaScreen(), self.use_preset)

    def use_preset(self, best) -> None:
        """The arena's best preset (an engine.arena.Rating) becomes the chat's decoding settings, and
        its model, if it names one, the model (of the open conversation too, as a pick in Ctrl+L is)."""
        if best is None:
            return
        preset = best.preset
        if preset.settings is not None:
            try:
                settings = Settings.from_dict(preset.settings_dict())
            except (ParleyError, TypeError) as e:
                self.app.notify(f"the preset {preset.label} cannot be used: {e}", severity="error")
                return
            panel = self.query_one(SettingsPanel)
            panel.show(settings)
            panel.query_one("#strategy", Select).value = settings.strategy
            self.app.settings = settings
        if preset.model is not None and preset.model != self.app.model_name:
            self.app.switch_model(preset.model)
            self.model_picked(preset.model)
        self.app.notify(f"using {preset.label} (rated {best.rating:.0f})")

    def action_models(self) -> None:
        self.app.push_screen(ModelsScreen(), self.model_picked)

    def model_picked(self, name: str | None) -> None:
        """The pick is the open conversation's model from now on (stored with it), so its next
        message is answered by this model, not switched back to the one it started with."""
        if name and self.conversation_id:
            self.store.update_conversation(self.conversation_id, model=name)

    def action_inspect(self) -> None:
        """The inspector on the focused reply (or the last): any reply, from this session or not."""
        reply = self.focused_message()
        if reply is None or reply["role"] != "assistant":
            reply = self.last("assistant")
        record = self.store.reply_tokens(reply["id"]) if reply else None
        if not record or not record["tokens"]:
            self.app.notify("no token data for this reply (written by hand, imported, or from before Parley "
                            "kept it)" if reply else "no reply to inspect yet", severity="warning")
            return
        message = self.store.message(reply["id"])
        self.app.push_screen(InspectorScreen(record, lambda step: settings_at(message, step)),
                             callback=lambda choice: self.continue_reply(message, choice))

    async def continue_reply(self, reply: dict, choice: tuple[int, int] | None) -> None:
        """A new sibling of `reply` that keeps its tokens before `step`, takes `token_id` there and
        generates on with the settings and seed in force at that step."""
        if choice is None or self.streaming:
            return
        step, token_id = choice
        await self.drop_views_from(reply["id"])
        self.start_replies(reply["parent_id"], [], continuation=(reply["id"], step, token_id))

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
