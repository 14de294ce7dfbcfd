"""One reply pipeline for every screen that streams replies (chat and compare).

A worker thread runs the engine's `Replies` and posts Textual Messages to the screen: `ReplyStarted`
(with the new assistant rows), then `ReplyToken` and `ReplyFinished` per candidate, or `ReplyFailed`. Posting
never blocks the worker, and the worker touches no widget and no screen attribute: the screen's
handlers (`RepliesMixin`) do all of that on the UI thread. A screen that has closed no longer
takes messages, so events of a reply the user walked away from are dropped; the store holds
the reply either way.
"""
import functools

from textual.css.query import NoMatches
from textual.message import Message
from textual.screen import Screen

from engine.errors import ParleyError
from engine.store import Store
from tui_app.widgets import MessageView


class ReplyStarted(Message):
    def __init__(self, replies, messages: list[dict]):
        super().__init__()
        self.replies, self.messages = replies, messages   # the engine's handle (cancel, update) and the new rows


class ReplyToken(Message):
    def __init__(self, candidate: int, message_id: str, token):
        super().__init__()
        self.candidate, self.message_id, self.token = candidate, message_id, token


class ReplyFinished(Message):
    def __init__(self, candidate: int, message_id: str, finished):
        super().__init__()
        self.candidate, self.message_id, self.finished = candidate, message_id, finished


class ReplyFailed(Message):
    def __init__(self, error: str):
        super().__init__()
        self.error = error


class Scored(Message):
    def __init__(self, scores: dict[str, float | None], error: str | None = None):
        super().__init__()
        self.scores, self.error = scores, error   # message id: the reward model's score (None: too long)


def score_in_worker(screen: Screen, message_ids: list[str]) -> None:
    """In a worker thread: the app's reward model scores these replies (recorded in the store) and
    `Scored` takes the scores to `screen`."""
    from engine.chat import score_replies   # imports torch
    app = screen.app
    try:
        rm = app.reward_model()
        if rm is None:
            return
        with Store(app.store.path) as store:   # SQLite connections are per thread
            scores = score_replies(rm, store, app.reward_model_name, message_ids)
    except ParleyError as e:
        screen.post_message(Scored({}, f"reward model {app.reward_model_name}: {e}"))
        return
    screen.post_message(Scored(scores))


def reward_text(score: float | None) -> str:
    return "reward: too long to score" if score is None else f"reward {score:+.3f}"


def stream_replies(screen: Screen, conversation_id: str, parent_id: str, settings: list, models=None,
                   continuation: tuple | None = None) -> None:
    """In a worker thread: wait for the model, generate, and post every event to `screen`.
    `models` ({candidate: model name}) gives candidates another model than the chat's;
    `continuation` (reply id, step, token id) makes one reply that takes that token there instead."""
    from engine.chat import Replies, continue_from   # imports torch: only once a reply is asked for
    app = screen.app
    app.model_ready.wait()   # a message sent while the model loads waits for it
    if app.lm is None:
        screen.post_message(ReplyFailed("no model is loaded: pick one with Ctrl+L"))
        return
    with Store(app.store.path) as store:   # SQLite connections are per thread
        try:
            forced = {}
            if continuation:
                c = continue_from(store, *continuation)
                parent_id, settings, forced = c.parent_id, [c.settings], dict(forced=c.forced, forced_tokens=c.tokens)
            own = [(app.other_model(models[i]), models[i]) if models and models.get(i) else None
                   for i in range(len(settings))]
            replies = Replies(app.lm, store, conversation_id, parent_id, settings, app.model_name, own, **forced)
        except ParleyError as e:
            screen.post_message(ReplyFailed(str(e)))
            return
        screen.post_message(ReplyStarted(replies, [store.message(m) for m in replies.message_ids]))
        for event in replies:
            if event.finished is not None:
                screen.post_message(ReplyFinished(event.candidate, event.message_id, event.finished))
            else:
                screen.post_message(ReplyToken(event.candidate, event.message_id, event.token))


def while_shown(handler):
    """The user can quit mid-reply: the screen's widgets are then torn down while a handler runs.
    The store already holds the reply, so the event has nowhere to go; a missing widget on a
    screen still shown is a bug and is raised."""
    @functools.wraps(handler)
    async def run(screen, message):
        try:
            await handler(screen, message)
        except NoMatches:
            if screen.is_attached:
                raise
    return run


class RepliesMixin:
    """What a screen needs to stream replies: `views` (message id -> MessageView), `replies` (the
    running generation, None when none runs) and the handlers of the pipeline's messages. A screen
    places the new views (`mount_replies`) and may react to tokens and the end (`after_token`,
    `after_finish`, `after_failure`)."""

    def init_replies(self) -> None:
        self.views: dict[str, MessageView] = {}
        self.replies = None
        self.streaming = False   # from the request on, before the model may even be loaded
        self.pending: set[str] = set()

    @while_shown
    async def on_reply_started(self, message: ReplyStarted) -> None:
        self.replies = message.replies
        self.pending = set(message.replies.message_ids)
        await self.mount_replies(message.replies, message.messages)

    @while_shown
    async def on_reply_token(self, message: ReplyToken) -> None:
        view = self.views.get(message.message_id)
        if view is not None and message.token.snapshot is not None:
            await view.show(message.token.snapshot)
        elif view is not None and message.token.text:
            await view.append(message.token.text)
        self.after_token(message)

    @while_shown
    async def on_reply_finished(self, message: ReplyFinished) -> None:
        view = self.views.get(message.message_id)
        if view is not None:
            await view.finish(message.finished.text, message.finished.finish_reason)
        self.pending.discard(message.message_id)
        if not self.pending:
            self.replies, self.streaming = None, False
        self.after_finish(message)

    @while_shown
    async def on_reply_failed(self, message: ReplyFailed) -> None:
        self.replies, self.streaming, self.pending = None, False, set()
        self.app.notify(message.error, severity="error")
        self.after_failure(message)

    async def mount_replies(self, replies, messages: list[dict]) -> None:
        raise NotImplementedError

    def after_token(self, message: ReplyToken) -> None:
        pass

    def after_finish(self, message: ReplyFinished) -> None:
        pass

    def after_failure(self, message: ReplyFailed) -> None:
        pass
