"""Every served request and its replies, kept in the store as a conversation the app can browse and rank.

The conversation's title tags it with the endpoint and the client's `user` field; its messages
are the request's (a completions prompt is one user message), and each choice is an assistant
reply under the last of them, with its settings (seed included), token counts and timings. Several
choices form a comparison, so they can be ranked in the app like a compare view's panes. A reply
cut short by a client that went away is kept, marked cancelled.

Writes happen in a thread of their own with its own connection, so neither the engine's steps nor
the HTTP handlers wait for SQLite.
"""
import queue
import sys
import threading
import traceback

from engine.store import Store

ENDPOINTS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}


class StoreLog:
    def __init__(self, path=None):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._path = path
        self._thread = threading.Thread(target=self._run, name="parley-serve-log", daemon=True)
        self._thread.start()

    def add(self, request, finished: list) -> None:
        """Any thread: keep a request (protocol.Request) and its choices' Finished events."""
        self._queue.put((request, finished))

    def close(self) -> None:
        """Write what is queued, then stop."""
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        with Store(self._path) as store:
            while (item := self._queue.get()) is not None:
                try:
                    record(store, *item)
                except Exception:   # a failed write must not stop the ones after it
                    traceback.print_exc(file=sys.stderr)


def title(request) -> str:
    last_user = next((m["content"] for m in reversed(request.messages) if m["role"] == "user"), "")
    snippet = " ".join(last_user.split())[:60]
    return f"[{ENDPOINTS[request.endpoint]} {request.user or '-'}] {snippet}"


def record(store: Store, request, finished: list) -> str:
    """Write one request with its replies, all at once (the app never sees half of one); returns the
    conversation's id."""
    messages = request.messages
    has_system = bool(messages) and messages[0]["role"] == "system"
    with store.transaction():
        cid = store.create_conversation(title(request), messages[0]["content"] if has_system else "", request.model)
        parent = None
        for m in messages[int(has_system):]:
            parent = store.add_message(cid, m["role"], m["content"], parent)
        ids = [store.add_message(cid, "assistant", f.text, parent, model=request.model, settings=f.settings.to_dict(),
                                 prompt_tokens=len(request.prompt_ids), completion_tokens=len(f.token_ids),
                                 timings=f.timings, finish_reason=f.finish_reason, make_current=f.candidate == 0)
               for f in sorted(finished, key=lambda f: f.candidate)]
        if len(ids) > 1:
            store.create_comparison(cid, parent, ids)
    return cid
