"""Streaming into the chat screen stays linear: UI time per token for a short and a long reply.

    python benchmarks/bench_stream.py [--tokens 2000]

Tokens are posted to the chat screen as the worker posts them (ReplyToken messages), without a
model, and the clock runs until the screen has drawn them all. Linear means the time per token
of a reply of --tokens is about that of a reply a quarter as long (ratio near 1; quadratic work
would give about 4). The reference, measured in the same run: the same tokens shown by
re-rendering the whole reply's Markdown per token, which is quadratic.
"""
import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from textual.widgets import Markdown  # noqa: E402

from engine.store import Store  # noqa: E402
from tui_app.app import ParleyApp  # noqa: E402
from tui_app.screens.replies import ReplyFinished, ReplyToken  # noqa: E402

WORDS = "the model writes a reply of plain words and some punctuation, like this one.".split()


def pieces(n: int) -> list[str]:
    """Word-sized tokens, a new paragraph every 60."""
    return [("\n\n" if i and i % 60 == 0 else " ") + WORDS[i % len(WORDS)] for i in range(n)]


async def stream(n: int, reference: bool) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        app = ParleyApp(model="none", store=Store(Path(tmp) / "parley.db"))
        app.load_model = lambda: None   # no model: the tokens are made up
        async with app.run_test(size=(120, 40)) as pilot:
            screen, store = app.screen, app.store
            conversation = store.create_conversation("bench")
            user = store.add_message(conversation, "user", "hi")
            reply = store.start_reply(conversation, user, "none", None)
            await screen.open_conversation(conversation)
            view = screen.views[reply]
            await pilot.pause()
            start = time.perf_counter()
            if reference:   # re-render the whole reply per token
                text = ""
                for piece in pieces(n):
                    text += piece
                    await view.query_one(Markdown).update(text)
            else:   # as fast as a worker can post them, then the end of the reply
                for piece in pieces(n):
                    screen.post_message(ReplyToken(0, reply, SimpleNamespace(text=piece)))
                timings = {"tokens": n, "decode_tokens_per_s": 0.0, "prefill_s": 0.0}
                screen.post_message(ReplyFinished(0, reply, SimpleNamespace(text="".join(pieces(n)),
                                                                            finish_reason="length", timings=timings)))
                while view.message["status"] != "complete":
                    await asyncio.sleep(0.001)
            await pilot.pause()
            return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2000)
    args = parser.parse_args()
    short, long = args.tokens // 4, args.tokens
    for name, reference in (("chat screen", False), ("re-render per token (ref.)", True)):
        t_short, t_long = asyncio.run(stream(short, reference)), asyncio.run(stream(long, reference))
        per_short, per_long = t_short / short * 1e3, t_long / long * 1e3
        print(f"{name:28} {short:5} tokens {per_short:6.3f} ms/token   {long:5} tokens {per_long:6.3f} ms/token   "
              f"ratio {per_long / per_short:.2f}")


if __name__ == "__main__":
    main()
