"""The store at scale: one conversation of 10,000 messages, listed and searched.

    python benchmarks/bench_store.py [--messages 10000]

References, measured in the same run on the same database: listing against a plain indexed
SELECT of the conversation's rows (no tree walk), and full-text search against a LIKE scan.
"""
import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from engine.store import Store  # noqa: E402

WORDS = ("the quick brown fox jumps over lazy dog sea octopus weather tea coffee book story music "
         "river mountain garden city train bicycle").split()


def timed(fn, repeats=5):
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=10_000)
    args = parser.parse_args()
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp, Store(Path(tmp) / "parley.db") as store:
        c = store.create_conversation("long one")
        start = time.perf_counter()
        with store.transaction():
            for i in range(args.messages):
                text = " ".join(rng.choice(WORDS) for _ in range(30)) + (" zebra" if i % 1000 == 7 else "")
                store.add_message(c, "user" if i % 2 == 0 else "assistant", text)
        insert_s = time.perf_counter() - start

        thread_s, thread = timed(lambda: store.thread(c))
        plain_s, plain = timed(lambda: list(store.db.query(
            "SELECT * FROM messages WHERE conversation_id = ? ORDER BY created_at, rowid", [c])))
        search_s, hits = timed(lambda: store.search("zebra", limit=100))
        like_s, like = timed(lambda: list(store.db.query("SELECT id FROM messages WHERE content LIKE '%zebra%'")))
        assert len(thread) == len(plain) == args.messages and len(hits) == len(like)
        print(f"{args.messages} messages in one conversation, inserted in {insert_s:.2f} s")
        print(f"list the thread (tree walk):   {thread_s * 1000:7.1f} ms   vs plain SELECT {plain_s * 1000:6.1f} ms"
              f"   ratio {thread_s / plain_s:.2f}x")
        print(f"full-text search ({len(hits)} hits):  {search_s * 1000:7.2f} ms   vs LIKE scan    "
              f"{like_s * 1000:6.1f} ms   ratio {search_s / like_s:.3f}x")


if __name__ == "__main__":
    main()
