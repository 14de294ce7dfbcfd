"""The store: trees, rankings and pairs, migrations, crash safety, concurrency, import and export."""
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap

import pytest

from engine import ParleyError
from engine.store import Store, schema
from engine.store.exchange import export, import_file


@pytest.fixture
def store(tmp_path):
    with Store(tmp_path / "parley.db") as s:
        yield s


def chat(store, system="Be kind."):
    c = store.create_conversation("greetings", system, "tiny")
    u = store.add_message(c, "user", "Hello there!")
    a = store.add_message(c, "assistant", "Hi! How can I help?", settings={"temperature": 0.7, "seed": 4})
    return c, u, a


def test_database_is_wal_with_foreign_keys(store):
    assert store.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert schema.version(store.conn) == schema.LATEST


def test_parley_home_moves_the_database(tmp_path, monkeypatch):
    monkeypatch.setenv("PARLEY_HOME", str(tmp_path / "home"))
    with Store() as s:
        assert s.path == tmp_path / "home" / "parley.db"


def test_regenerate_and_edit_make_siblings_never_overwrite(store):
    c, u, a = chat(store)
    regenerated = store.add_message(c, "assistant", "Hello! What's up?", u)
    assert [m["id"] for m in store.siblings(a)] == [a, regenerated]
    assert store.message(a)["content"] == "Hi! How can I help?"
    edited = store.edit_message(u, "Hello there, friend!")
    assert [m["content"] for m in store.siblings(u)] == ["Hello there!", "Hello there, friend!"]
    assert store.conversation(c)["current_leaf"] == edited
    reply = store.add_message(c, "assistant", "Hi, friend.")
    assert [m["content"] for m in store.thread(c)] == ["Hello there, friend!", "Hi, friend."]
    # Moving back to the first user message shows its newest branch.
    store.set_current_leaf(c, store.newest_leaf(u))
    assert [m["id"] for m in store.thread(c)] == [u, regenerated]
    assert store.newest_leaf(edited) == reply
    assert store.message(a)["settings"] == {"temperature": 0.7, "seed": 4}


def test_partial_and_cancelled_replies_are_kept(tmp_path):
    path = tmp_path / "parley.db"
    with Store(path) as s:
        c, u, _ = chat(s)
        cut = s.start_reply(c, u, "tiny", {"temperature": 0.9, "seed": 1})
        s.save_partial(cut, "I was say")            # the app dies here
        stopped = s.start_reply(c, u, "tiny", {"temperature": 0.9, "seed": 2})
        s.finish_reply(stopped, "Stopped half", "cancelled", completion_tokens=3, timings={"decode_s": 0.1})
    with Store(path) as s:
        assert (s.message(cut)["status"], s.message(cut)["content"]) == ("partial", "I was say")
        assert (s.message(stopped)["status"], s.message(stopped)["finish_reason"]) == ("complete", "cancelled")
        assert s.message(stopped)["settings"]["seed"] == 2


def test_conversation_list_rename_archive_delete(store):
    c, _, _ = chat(store)
    other = store.create_conversation("other")
    store.update_conversation(c, title="renamed")
    assert [x["id"] for x in store.conversations()] == [c, other]  # most recently updated first
    store.archive_conversation(other)
    assert [x["id"] for x in store.conversations()] == [c]
    assert [x["id"] for x in store.conversations(archived=True)] == [other]
    store.delete_conversation(c)
    assert store.db["messages"].count == 0
    with pytest.raises(ParleyError, match="no conversation matches"):
        store.conversation(c)


def test_full_text_search(store):
    c, _, _ = chat(store)
    store.add_message(c, "user", "Tell me about octopus intelligence")
    hits = store.search("octopus")
    assert [h["content"] for h in hits] == ["Tell me about octopus intelligence"]
    assert hits[0]["conversation_title"] == "greetings" and "[octopus]" in hits[0]["snippet"]
    assert store.search('help AND "') == []           # FTS syntax in user text is just text
    assert len(store.search("hello")) == 1
    store.delete_conversation(c)
    assert store.search("octopus") == []


def test_ranking_of_four_with_a_tie_gives_five_pairs(store):
    c, u, a = chat(store)
    b, d, e = (store.add_message(c, "assistant", text, u, make_current=False) for text in ("B", "D", "E"))
    comparison = store.create_comparison(c, u, [a, b, d, e])
    store.rank(comparison, {a: 1, b: 2, d: 2, e: 3})
    pairs = {(p["chosen_id"], p["rejected_id"]) for p in store.preference_pairs()}
    assert pairs == {(a, b), (a, d), (a, e), (b, e), (d, e)}   # C(4,2) = 6, minus the tie b = d
    groups = store.pairs_by_prompt()
    assert len(groups) == 1 and len(groups[0]["pairs"]) == 5
    assert groups[0]["prompt"] == [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hello there!"}]


def test_rankings_grouped_by_prompt(store):
    c, u, a = chat(store)
    b = store.add_message(c, "assistant", "B", u, make_current=False)
    store.rank(store.create_comparison(c, u, [a, b]), {a: 1, b: 2})
    store.rank(store.create_comparison(c, u, [b, a]), {a: 1, b: 1}, annotator="friend")
    other_user = store.add_message(c, "user", "And you?", a)
    d = store.add_message(c, "assistant", "D", other_user)
    e = store.add_message(c, "assistant", "E", other_user)
    store.vote(store.create_comparison(c, other_user, [d, e]), "best", best=e)
    groups = store.rankings_by_prompt()
    assert [len(g["rankings"]) for g in groups] == [2, 1]
    assert groups[0]["prompt"][-1] == {"role": "user", "content": "Hello there!"}
    assert [(x["content"], x["rank"]) for x in groups[1]["rankings"][0]["candidates"]] == [("D", 2), ("E", 1)]
    assert groups[0]["rankings"][1]["annotator"] == "friend"


def test_votes_and_flags(store):
    c, u, a = chat(store)
    b = store.add_message(c, "assistant", "B", u, make_current=False)
    comparison = store.create_comparison(c, u, [a, b])
    store.vote(comparison, "best", best=b)
    store.vote(comparison, "tie")
    store.vote(comparison, "both_bad")
    assert [(p["chosen_id"], p["rejected_id"]) for p in store.preference_pairs()] == [(b, a)]
    assert store.flags(a) == ["both_bad"]
    store.flag(a, "made_up_facts")
    assert store.flags(a) == ["both_bad", "made_up_facts"]
    with pytest.raises(ParleyError, match="flag 'rude' is not one of"):
        store.flag(a, "rude")
    with pytest.raises(ParleyError, match="must give a rank to every candidate"):
        store.rank(comparison, {a: 1})


def test_runs_and_metrics(store):
    run = store.start_run("rm", {"lr": 1e-5}, base_model="tiny", pid=os.getpid())
    store.log_metrics(run, 1, {"loss": 0.7, "accuracy": 0.5})
    store.log_metrics(run, 1, {"loss": 0.6})   # a resumed run logs step 1 again
    store.log_metrics(run, 2, {"loss": 0.5})
    assert [(m["step"], m["value"]) for m in store.metrics(run, "loss")] == [(1, 0.6), (2, 0.5)]
    store.end_run(run, "finished", output_model="tiny-rm")
    assert store.run(run)["status"] == "finished" and store.run(run)["config"] == {"lr": 1e-5}


OLD_CONVERSATION = "INSERT INTO conversations (id, title, created_at, updated_at) VALUES ('c1', 'old', 't', 't')"


def database_at(path, version: int, *statements: str):
    """A database as the Parley of schema `version` left it, holding what `statements` write."""
    conn = sqlite3.connect(path, isolation_level=None)
    schema.migrate(conn, upto=version)
    for statement in statements:
        conn.execute(statement)
    conn.close()
    return path


def test_migration_from_a_version_1_database(tmp_path):
    path = database_at(tmp_path / "old.db", 1, OLD_CONVERSATION,
                       "INSERT INTO messages (id, conversation_id, role, content, created_at) "
                       "VALUES ('m1', 'c1', 'user', 'written by version one', 't')")
    with Store(path) as s:
        assert schema.version(s.conn) == schema.LATEST
        assert [h["id"] for h in s.search("version")] == ["m1"]
        s.flag("m1", "unsafe")


def test_migration_from_a_version_3_database(tmp_path):
    """A database of the Parley before reply tokens: its replies open without tokens or segments,
    their settings as they were, and take tokens from then on."""
    path = database_at(tmp_path / "v3.db", 3, OLD_CONVERSATION,
                       "INSERT INTO messages (id, conversation_id, role, content, created_at) "
                       "VALUES ('u', 'c1', 'user', 'hi', 't')",
                       "INSERT INTO messages (id, conversation_id, parent_id, role, content, settings, created_at) "
                       "VALUES ('a', 'c1', 'u', 'assistant', 'an old reply', '{\"seed\": 7}', 't')")
    with Store(path) as s:
        assert schema.version(s.conn) == schema.LATEST
        old = s.message("a")
        assert (old["settings"], old["segments"], s.reply_tokens("a")) == ({"seed": 7}, None, None)
        s.save_reply_tokens("a", [{"token_id": 3, "piece": "an", "text": "an"}])
        assert s.reply_tokens("a")["tokens"][0]["token_id"] == 3
        assert [h["id"] for h in s.search("old")] == ["a"]
        s.delete_conversation("c1")
        assert s.db["reply_tokens"].count == 0


def token(i: int, piece: str, rng) -> dict:
    """A token as a reply keeps it: 5 alternatives each side, probabilities with many digits."""
    def alternatives():
        return [{"token_id": rng.randrange(150_000), "piece": piece, "prob": 10 ** rng.uniform(-6, 0)}
                for _ in range(5)]
    return {"step": i, "token_id": rng.randrange(150_000), "piece": piece, "text": piece,
            "logprob": -rng.uniform(0, 12), "sampled_logprob": -rng.uniform(0, 12), "before": alternatives(),
            "after": alternatives()}


def test_reply_tokens_are_kept_compact_and_come_back(store):
    import random
    rng = random.Random(0)
    c, u, a = chat(store)
    tokens = [token(i, "Hi" if i else "<|im_end|>", rng) for i in range(3)]
    tokens[2]["sampled_logprob"] = float("-inf")    # JSON has no infinity: no probability to keep
    store.save_reply_tokens(a, tokens, forced=1)
    back = store.reply_tokens(a)
    assert back["forced"] == 1 and [t["step"] for t in back["tokens"]] == [0, 1, 2]
    for got, given in zip(back["tokens"], tokens):
        assert set(got) == set(given)
        assert (got["token_id"], got["piece"], got["text"]) == (given["token_id"], given["piece"], given["text"])
        assert got["logprob"] == pytest.approx(given["logprob"], rel=1e-3) and got["logprob"] != given["logprob"]
        for side in ("before", "after"):
            assert [x["token_id"] for x in got[side]] == [x["token_id"] for x in given[side]]
            assert [x["prob"] for x in got[side]] == pytest.approx([x["prob"] for x in given[side]], rel=1e-3)
    assert back["tokens"][2]["sampled_logprob"] is None
    store.save_reply_tokens(a, tokens[:1])                   # saved again: replaced
    assert len(store.reply_tokens(a)["tokens"]) == 1
    with pytest.raises(ParleyError, match="forced = 2 is out of range: a reply of 1 tokens forces 0 to 1"):
        store.save_reply_tokens(a, tokens[:1], forced=2)
    store.save_reply_tokens("gone", tokens)                  # a reply discarded while it streamed: nothing to keep
    assert store.reply_tokens("gone") is None and store.reply_tokens(u) is None


# Bytes one token takes in reply_tokens.tokens at 5 alternatives each side, pieces of 6 characters
# (longer than most of a 50k-vocabulary's), ids of a 150k vocabulary, probabilities down to 1e-6:
# measured 305 a token; README's store section states this budget.
TOKEN_BUDGET = 320


def test_a_200_token_reply_stays_within_the_size_budget(store):
    import random
    rng = random.Random(1)
    c, u, a = chat(store)
    store.save_reply_tokens(a, [token(i, " piece", rng) for i in range(200)])
    size = store.conn.execute("SELECT length(CAST(tokens AS BLOB)) FROM reply_tokens").fetchone()[0]
    assert size <= 200 * TOKEN_BUDGET, size / 200


def test_an_unranked_comparison_is_discarded_with_what_follows(store):
    c, u, a = chat(store)
    b, d = (store.add_message(c, "assistant", text, u, make_current=False) for text in ("B", "D"))
    store.save_reply_tokens(b, [{"token_id": 1}])
    follow = store.add_message(c, "user", "go on", b)
    below = store.add_message(c, "assistant", "going on", follow)
    comparison = store.create_comparison(c, u, [b, d])
    store.set_current_leaf(c, below)
    assert sorted(store.discard_comparison(comparison)) == sorted([b, d, follow, below])
    assert [m["id"] for m in store.children(c, u)] == [a]        # the reply from before stays
    assert store.reply_tokens(b) is None and store.db["comparison_candidates"].count == 0
    assert store.conversation(c)["current_leaf"] == a             # the newest branch left
    with pytest.raises(ParleyError, match="no comparison matches"):
        store.discard_comparison(comparison)


def test_a_ranked_comparison_is_not_discarded(store):
    c, u, a = chat(store)
    b = store.add_message(c, "assistant", "B", u, make_current=False)
    ranked = store.create_comparison(c, u, [a, b])
    store.vote(ranked, "best", best=b)
    with pytest.raises(ParleyError, match=f"comparison '{ranked}' cannot be discarded: it has a ranking or vote"):
        store.discard_comparison(ranked)
    d = store.add_message(c, "assistant", "D", u, make_current=False)
    e = store.add_message(c, "assistant", "E", u, make_current=False)
    above = store.create_comparison(c, u, [d, e])
    follow = store.add_message(c, "user", "and?", d)
    f, g = (store.add_message(c, "assistant", text, follow) for text in ("F", "G"))
    store.rank(store.create_comparison(c, follow, [f, g]), {f: 1, g: 2})
    with pytest.raises(ParleyError, match="below its candidates, has a ranking or vote"):
        store.discard_comparison(above)
    assert store.counts()["messages"] == 8 and len(store.preference_pairs()) == 2


V2_TRIGGERS = {"messages_fts_insert", "messages_fts_delete", "messages_fts_update"}   # written by hand
SQLITE_UTILS_TRIGGERS = {"messages_ai", "messages_ad", "messages_au"}                  # enable_fts's


def triggers(conn) -> set[str]:
    return {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'")}


def assert_index_matches_messages(conn):
    # FTS5's integrity check with rank 1 also compares the index with its content table, row by row.
    conn.execute("INSERT INTO messages_fts(messages_fts, rank) VALUES ('integrity-check', 1)")


def test_migration_from_a_version_2_database_keeps_search(tmp_path):
    """A database of the Parley before version 3 (hand-written search triggers) opens with its rows
    and their search, gets sqlite-utils' triggers, and searches what is written afterwards."""
    path = tmp_path / "v2.db"
    conn = sqlite3.connect(path, isolation_level=None)
    schema.migrate(conn, upto=2)  # migrations are never edited: this is the earlier Parley's database
    assert triggers(conn) == V2_TRIGGERS
    conn.execute("INSERT INTO conversations (id, title, created_at, updated_at) VALUES ('c1', 'old', 't', 't')")
    for mid, parent, role, content in [("m1", None, "user", "does the octopus 🐙 sing?"),
                                       ("m2", "m1", "assistant", "only about the sea 海"),
                                       ("m3", "m1", "assistant", "a draft reply"),
                                       ("m4", "m1", "assistant", "a deleted zebra")]:
        conn.execute("INSERT INTO messages (id, conversation_id, parent_id, role, content, created_at) "
                     "VALUES (?, 'c1', ?, ?, ?, 't')", (mid, parent, role, content))
    conn.execute("UPDATE messages SET content = 'the finished walrus reply' WHERE id = 'm3'")
    conn.execute("DELETE FROM messages WHERE id = 'm4'")
    conn.execute("UPDATE conversations SET current_leaf = 'm2' WHERE id = 'c1'")
    conn.close()

    with Store(path) as s:
        assert schema.version(s.conn) == schema.LATEST
        assert triggers(s.conn) == SQLITE_UTILS_TRIGGERS
        assert_index_matches_messages(s.conn)
        assert [m["content"] for m in s.thread("c1")] == ["does the octopus 🐙 sing?", "only about the sea 海"]
        assert [h["id"] for h in s.search("octopus")] == ["m1"]
        assert [h["id"] for h in s.search("海")] == ["m2"]
        assert [h["id"] for h in s.search("walrus")] == ["m3"]
        assert s.search("draft") == [] and s.search("zebra") == []
        # New writes keep the index in step: insert, the reply's update, delete.
        reply = s.start_reply("c1", "m2", "tiny", None)
        s.finish_reply(reply, "a new narwhal reply", "eos")
        assert [h["id"] for h in s.search("narwhal")] == [reply]
        s.flag("m1", "unsafe")
        assert_index_matches_messages(s.conn)
        s.delete_conversation("c1")
        assert s.search("octopus") == [] and s.search("narwhal") == []
        assert_index_matches_messages(s.conn)


def test_a_new_database_has_only_the_sqlite_utils_triggers(store):
    assert triggers(store.conn) == SQLITE_UTILS_TRIGGERS
    chat(store)
    assert_index_matches_messages(store.conn)


def test_newer_database_is_refused(tmp_path):
    path = tmp_path / "new.db"
    with Store(path) as s:
        s.conn.execute(f"PRAGMA user_version = {schema.LATEST + 1}")
    with pytest.raises(ParleyError, match="written by a newer Parley"):
        Store(path)


WRITER = textwrap.dedent("""
    import sys
    from engine.store import Store
    s = Store(sys.argv[1])
    for i in range(1000):
        with s.transaction():
            c = s.create_conversation(f"c{i}")
            for j in range(100):
                s.add_message(c, "user", f"message {j}")
                if j == 50:
                    print("inside", i, flush=True)
        print("committed", i, flush=True)
""")


def test_sigkill_mid_transaction_loses_nothing_committed(tmp_path):
    path = tmp_path / "parley.db"
    Store(path).close()
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    committed = -1
    for line in writer.stdout:
        kind, i = line.split()
        if kind == "committed":
            committed = int(i)
        elif int(i) == 3:
            writer.send_signal(signal.SIGKILL)   # in the middle of transaction 3
            break
    writer.wait()
    assert committed == 2
    with Store(path) as s:
        assert s.conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        per_conversation = [r["n"] for r in s.db.query(
            "SELECT COUNT(*) AS n FROM messages GROUP BY conversation_id ORDER BY conversation_id")]
        assert per_conversation == [100, 100, 100]   # every committed one whole, the cut one gone
        assert len(s.search("message")) == 50          # the search index agrees (LIMIT 50)


TRAINER = textwrap.dedent("""
    import sys
    from engine.store import Store
    s = Store(sys.argv[1])
    run = s.start_run("ppo", {})
    print(run, flush=True)
    for step in range(400):
        s.log_metrics(run, step, {"reward": step * 0.1, "kl": 0.01})
    s.end_run(run, "finished")
""")


def test_app_reader_and_trainer_writer_work_at_once(tmp_path):
    path = tmp_path / "parley.db"
    with Store(path) as app:
        c, u, _ = chat(app)
        trainer = subprocess.Popen([sys.executable, "-c", TRAINER, str(path)], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        run = trainer.stdout.readline().strip()
        seen = 0
        while trainer.poll() is None:
            seen = max(seen, len(app.metrics(run)))          # the dashboard polls
            app.add_message(c, "user", f"typing while training {seen}")   # and the user chats
        assert trainer.returncode == 0, trainer.stderr.read()
        assert len(app.metrics(run)) == 800 and app.run(run)["status"] == "finished"


# -- import and export -------------------------------------------------------------------------------
def filled(store):
    c, u, a = chat(store)
    b = store.add_message(c, "assistant", "Hey 👋 — 你好", u, make_current=False)
    comparison = store.create_comparison(c, u, [a, b])
    store.rank(comparison, {a: 2, b: 1})
    store.add_message(c, "user", "Thanks!")
    store.create_conversation("empty one")
    return store


@pytest.mark.parametrize("kind, fmt", [("conversations", "jsonl"), ("conversations", "trl"),
                                       ("prefs", "jsonl"), ("prefs", "trl")])
def test_export_import_export_is_identity(tmp_path, kind, fmt):
    with Store(tmp_path / "a.db") as a:
        filled(a)
        export(a, kind, fmt, str(tmp_path / "first.jsonl"))
    with Store(tmp_path / "b.db") as b:
        import_file(b, kind, str(tmp_path / "first.jsonl"))
        export(b, kind, fmt, str(tmp_path / "second.jsonl"))
    first = (tmp_path / "first.jsonl").read_text()
    assert first and first == (tmp_path / "second.jsonl").read_text()


def test_trl_prefs_format(store, tmp_path):
    filled(store)
    export(store, "prefs", "trl", str(tmp_path / "p.jsonl"))
    row = json.loads((tmp_path / "p.jsonl").read_text())
    assert row == {"prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hello there!"}],
                   "chosen": [{"role": "assistant", "content": "Hey 👋 — 你好"}],
                   "rejected": [{"role": "assistant", "content": "Hi! How can I help?"}]}


def test_rankings_export(store, tmp_path):
    filled(store)
    export(store, "rankings", "jsonl", str(tmp_path / "r.jsonl"))
    row = json.loads((tmp_path / "r.jsonl").read_text())
    assert [(c["content"], c["rank"]) for c in row["candidates"]] == [("Hi! How can I help?", 2), ("Hey 👋 — 你好", 1)]
    assert row["candidates"][0]["settings"] == {"temperature": 0.7, "seed": 4}


def test_imported_pairs_with_one_prompt_group_together(store, tmp_path):
    lines = [{"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."},
             {"prompt": [{"role": "user", "content": "Hi"}], "chosen": "Hello!", "rejected": "What?"},
             {"prompt": "Bye", "chosen": [{"role": "assistant", "content": "See you!"}], "rejected": "No."}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert import_file(store, "prefs", str(tmp_path / "p.jsonl")) == {"pairs": 3, "prompts": 2, "skipped": 0}
    groups = store.pairs_by_prompt()
    assert [len(g["pairs"]) for g in groups] == [2, 1]


BAD_LINES = {
    "truncated JSON": (b'{"prompt": "hi", "chosen": "a", "rejec', r"invalid JSON \(.*\): each line must be one JSON"),
    "wrong role": (b'{"prompt": [{"role": "robot", "content": "hi"}], "chosen": "a", "rejected": "b"}',
                   r"prompt\[0\] has role 'robot': use one of system, user, assistant"),
    "empty chosen": (b'{"prompt": "hi", "chosen": "  ", "rejected": "b"}', r"chosen is empty"),
    "chosen not assistant": (b'{"prompt": "hi", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}',
                             r"chosen must be a text or a list of one assistant message"),
    "same replies": (b'{"prompt": "hi", "chosen": "a", "rejected": "a"}', r"chosen and rejected are the same text"),
    "missing field": (b'{"prompt": "hi", "chosen": "a"}', r"missing 'rejected'"),
    "not an object": (b'["hi", "a", "b"]', r"each line must be a JSON object"),
    "non-UTF-8": (b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}', r"not valid UTF-8 \(byte 0xe9 at column 16\)"),
    "empty prompt": (b'{"prompt": [], "chosen": "a", "rejected": "b"}', r"prompt must be a non-empty list"),
}


@pytest.mark.parametrize("case", list(BAD_LINES))
def test_bad_prefs_file_is_refused_whole(store, tmp_path, case):
    bad, message = BAD_LINES[case]
    good = b'{"prompt": "hi", "chosen": "a", "rejected": "b"}\n'
    path = tmp_path / "prefs.jsonl"
    path.write_bytes(good + good + bad + b"\n" + good)
    before = store.counts()
    with pytest.raises(ParleyError, match=rf"^{path}:3: {message}") as e:
        import_file(store, "prefs", str(path))
    assert "\n" not in str(e.value) and str(e.value).endswith("nothing was imported")
    assert store.counts() == before


def test_fifty_megabyte_line_is_refused(store, tmp_path):
    path = tmp_path / "huge.jsonl"
    with open(path, "wb") as f:
        f.write(b'{"prompt": "hi", "chosen": "a", "rejected": "b"}\n')
        f.write(b'{"prompt": "' + b"x" * (50 * 2**20) + b'", "chosen": "a", "rejected": "b"}\n')
    with pytest.raises(ParleyError, match=rf"{path}:2: line is longer than 16 MiB"):
        import_file(store, "prefs", str(path))
    assert store.counts()["rankings"] == 0


@pytest.mark.parametrize("line, message", [
    ({"id": "c", "messages": [{"id": "m2", "parent_id": "m1", "role": "user", "content": "x"}]},
     r"messages\[0\] has parent_id .m1., which is not an earlier message"),
    ({"id": "c", "messages": [{"id": "m1", "role": "user", "content": 5}]}, r"messages\[0\] needs content as text"),
    ({"id": "c", "messages": [], "current_leaf": "zz"}, "current_leaf 'zz' is not one of"),
    ({"messages": [{"role": "narrator", "content": "x"}]}, r"messages\[0\] has role .narrator."),
])
def test_bad_conversations_file_is_refused_whole(store, tmp_path, line, message):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "fine"}]}) + "\n" + json.dumps(line) + "\n")
    with pytest.raises(ParleyError, match=f"c.jsonl:2: {message}"):
        import_file(store, "conversations", str(path))
    assert store.counts()["conversations"] == 0


def test_cli_export_and_import(tmp_path):
    env = {**os.environ, "PARLEY_HOME": str(tmp_path / "home")}
    with Store(tmp_path / "home" / "parley.db") as s:
        filled(s)

    def parley(*args):
        return subprocess.run([sys.executable, "-c", "from tui_app.main import main; main()", *args],
                              capture_output=True, text=True, env=env)
    out = tmp_path / "prefs.jsonl"
    assert parley("export", "prefs", str(out), "--format", "trl").returncode == 0
    assert parley("import", "prefs", str(out)).returncode == 0
    (tmp_path / "bad.jsonl").write_text("{nope\n")
    bad = parley("import", "prefs", str(tmp_path / "bad.jsonl"))
    assert bad.returncode == 1 and bad.stderr.startswith(f"parley: error: {tmp_path / 'bad.jsonl'}:1: invalid JSON")


def test_processes_opening_a_new_database_at_once_migrate_it_once(tmp_path):
    # torchrun's processes all open the store at start-up; each must find it whole, none may fail
    script = textwrap.dedent("""
        import sys, time
        from engine.store import Store
        while time.time() < float(sys.argv[2]):
            pass
        Store(sys.argv[1]).close()
    """)
    for attempt in range(3):
        path = tmp_path / f"parley-{attempt}.db"
        start = f"{__import__('time').time() + 2.0}"
        procs = [subprocess.Popen([sys.executable, "-c", script, str(path), start], stderr=subprocess.PIPE, text=True)
                 for _ in range(4)]
        for proc in procs:
            assert proc.wait() == 0, proc.stderr.read()
        with Store(path) as store:
            assert schema.version(store.conn) == schema.LATEST


def test_migration_from_a_version_5_database_adds_lineage(tmp_path):
    """Models and replies written before lineage open with none (NULL), and take it from then on."""
    path = database_at(tmp_path / "v5.db", 5,
                       "INSERT INTO models (name, path, kind, added_at) VALUES ('old', '/m/old', 'trained', 't')",
                       OLD_CONVERSATION,
                       "INSERT INTO messages (id, conversation_id, role, content, model, created_at) "
                       "VALUES ('a', 'c1', 'assistant', 'an old reply', 'old', 't')")
    with Store(path) as s:
        assert schema.version(s.conn) == schema.LATEST
        assert (s.model("old")["parent"], s.model("old")["run_id"], s.message("a")["run_id"]) == (None, None, None)
        run = s.start_run("dpo", {"out": "/m/old"}, base_model="default")
        s.set_lineage("old", "default", run)
        assert [m["name"] for m in s.lineage("old")] == ["old", "default"]
        assert s.lineage("old")[0]["run"]["id"] == run


def test_a_trained_model_keeps_its_parent_and_run_and_its_replies_keep_the_run(tmp_path):
    from engine.registry import register
    with Store(tmp_path / "p.db") as s:
        first = s.start_run("dpo", {}, base_model="default")
        name = register(s, tmp_path / "round1", parent="default", run_id=first)
        second = s.start_run("dpo", {}, base_model=name)
        register(s, tmp_path / "round2", parent=name, run_id=second)
        assert (s.model("round2")["parent"], s.model("round2")["run_id"]) == ("round1", second)
        chain = s.lineage("round2")
        assert [(m["name"], m["run"]["id"] if m["run"] else None) for m in chain] == [
            ("round2", second), ("round1", first), ("default", None)]
        c = s.create_conversation()
        u = s.add_message(c, "user", "hi")
        by_name = s.start_reply(c, u, "round1", None)
        by_path = s.start_reply(c, u, str(tmp_path / "round2"), None)   # opened by its directory
        untrained = s.start_reply(c, u, "default", None)
        assert [s.message(m)["run_id"] for m in (by_name, by_path, untrained)] == [first, second, None]
        third = s.start_run("dpo", {}, base_model="default")
        assert register(s, tmp_path / "round1", parent="default", run_id=third) == "round1"   # written again
        assert s.model("round1")["run_id"] == third and len(s.models()) == 2
