"""What the screens share: streaming replies from a worker thread, and key remapping."""
from textual.css.query import NoMatches
from textual.screen import Screen

from engine.chat import Replies
from engine.errors import ParleyError
from engine.store import Store


def stream_replies(screen, conversation_id, parent_id, settings, started, on_event, models=None) -> None:
    """In a worker thread: wait for the model, generate, and hand every event to the UI thread.
    `models` ({candidate: model name}) gives candidates another model than the chat's.
    `screen.replies` is the running generation (for stop and live settings), None when done."""
    app = screen.app
    app.model_ready.wait()   # a message sent while the model loads waits for it
    if app.lm is None:
        return
    with Store(app.store.path) as store:   # SQLite connections are per thread
        try:
            own = [(app.other_model(models[i]), models[i]) if models and models.get(i) else None
                   for i in range(len(settings))]
            replies = Replies(app.lm, store, conversation_id, parent_id, settings, app.model_name, own)
        except ParleyError as e:
            app.call_from_thread(app.notify, str(e), severity="error")
            return
        screen.replies = replies
        try:
            app.call_from_thread(on_screen, screen, started, replies, [store.message(m) for m in replies.message_ids])
            for event in replies:
                app.call_from_thread(on_screen, screen, on_event, event)
        finally:
            screen.replies = None


async def on_screen(screen: Screen, handler, *args) -> None:
    """Run a screen's handler for a reply event. The user can quit mid-reply: the screen's widgets
    are then gone while the last events land. The store already holds the reply, so those events
    have nowhere to go; a missing widget on a screen still shown is a bug and is raised."""
    try:
        await handler(*args)
    except NoMatches:
        if screen.is_attached:
            raise


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
