"""The bad-input suite: every bad input a clear one-line error, and nothing deleted, lost or half-written.

One parametrized test per class of bad input, over many cases: the store and `parley import/export`,
the command line (outputs, training arguments, generation limits, terminal output, the app's
config) and model directories. Each refusal is checked by tests/bad_input.py the same way: its exit
status, one line on stderr without a traceback that names the problem, and the store's rows and the
files on disk exactly as they were. The importers also get a property-based fuzz (Hypothesis).
"""
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import time

import pytest
import torch
from bad_input import assert_one_line_error, files_under, row_counts, run_cli, unchanged
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models

from engine import ParleyError, chat_template
from engine import generate as generation
from engine.store import Store, schema
from engine.store import store as store_module
from engine.store.exchange import MAX_DEPTH, export, import_file
from engine.terminal import printable
from tui_app.main import run_app

ROOT = os.geteuid() == 0
AS_ROOT = "root writes through any permission bits: the chmod case is covered by the monkeypatched one"
ESCAPES = "\x1b]0;pwned\x07\x1b[2J\x1b[31mred\x9b1m"   # title, clear screen, colour, a one-byte CSI


# ====================================================================================================
# the store and import/export
# ====================================================================================================
def filled(store):
    c = store.create_conversation("greetings", "Be kind.", "tiny")
    u = store.add_message(c, "user", "Hello there!")
    a = store.add_message(c, "assistant", "Hi!", settings={"temperature": 0.7, "seed": 4})
    b = store.add_message(c, "assistant", "Hey 👋", u, make_current=False)
    store.rank(store.create_comparison(c, u, [a, b]), {a: 2, b: 1})
    return store


@pytest.fixture
def home(tmp_path):
    with Store(tmp_path / "home" / "parley.db") as s:
        filled(s)
    return tmp_path / "home"


def write_lines(path, *lines) -> str:
    path.write_bytes(b"".join((line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n"
                              for line in lines))
    return str(path)


def refused(home, tmp_path, monkeypatch, *argv, words=()):
    with unchanged(home, home, tmp_path / "files"):
        run = run_cli(*argv, home=home, monkeypatch=monkeypatch)
    assert_one_line_error(run, *words)
    return run


# -- every field of a line is checked -----------------------------------------------------------------
def conversation(**fields):
    row = {"id": "c1", "title": "t", "system_prompt": "", "model": "m", "created_at": "2024-05-01T12:00:00+00:00",
           "updated_at": "2024-05-01T12:00:00+00:00", "archived": False, "current_leaf": "m2",
           "messages": [message("m1", None, "user"), message("m2", "m1", "assistant")]}
    row.update(fields)
    return row


def message(mid, parent, role, **fields):
    m = {"id": mid, "parent_id": parent, "role": role, "content": "hi", "model": None, "settings": None,
         "prompt_tokens": None, "completion_tokens": None, "timings": None, "finish_reason": None,
         "status": "complete", "created_at": "2024-05-01T12:00:01+00:00"}
    m.update(fields)
    return m


def with_reply(**fields):
    return conversation(messages=[message("m1", None, "user"), message("m2", "m1", "assistant", **fields)])


BAD_CONVERSATIONS = {
    "title a list": (conversation(title=["a"]), "title must be text"),
    "title null": (conversation(title=None), "title must be text"),
    "created_at an object": (conversation(created_at={"t": 1}), "created_at must be an ISO 8601 time"),
    "created_at not a time": (conversation(created_at="yesterday"), "created_at must be an ISO 8601 time"),
    "model a number": (conversation(model=3), "model must be text or null"),
    "archived a string": (conversation(archived="yes"), "archived must be true or false"),
    "id empty": (conversation(id=""), "id must be non-empty text"),
    "id a list": (conversation(id=["c"]), "id must be non-empty text"),
    "message model a list": (with_reply(model=["x"]), "messages[1].model must be text or null"),
    "finish_reason an object": (with_reply(finish_reason={"a": 1}), "messages[1].finish_reason must be text"),
    "prompt_tokens many": (with_reply(prompt_tokens="many"), "prompt_tokens must be a whole number"),
    "prompt_tokens negative": (with_reply(prompt_tokens=-1), "prompt_tokens must be a whole number"),
    "completion_tokens 2**64": (with_reply(completion_tokens=2**64), "completion_tokens must be a whole number"),
    "completion_tokens true": (with_reply(completion_tokens=True), "completion_tokens must be a whole number"),
    "temperature hot": (with_reply(settings={"temperature": "hot"}), "settings: temperature = 'hot'"),
    "unknown setting": (with_reply(settings={"warmth": 1}), "unknown decoding setting 'warmth'"),
    "settings a list": (with_reply(settings=[1]), "settings must be an object"),
    "timings text": (with_reply(timings="fast"), "timings must be an object of numbers"),
    "timings nested": (with_reply(timings={"a": [1]}), "timings must be an object of numbers"),
    "status done": (with_reply(status="done"), "status must be complete or partial"),
    "message created_at a number": (with_reply(created_at=5), "messages[1].created_at must be an ISO 8601"),
    "duplicate message id": (conversation(messages=[message("m1", None, "user"), message("m1", None, "user")],
                                          current_leaf=None), "the id \"m1\" of an earlier message"),
    "lone surrogate in content": (with_reply(content="\ud800"), "lone surrogate (\\ud800)"),
    "lone surrogate in a key": (with_reply(timings={"\udfff": 1}), "lone surrogate (\\udfff)"),
    "NaN token count": (b'{"id": "c1", "title": "t", "messages": [{"id": "m", "role": "user", "content": "x", '
                        b'"prompt_tokens": NaN}]}', "NaN is not JSON"),
    "Infinity temperature": (b'{"id": "c1", "messages": [{"id": "m", "role": "user", "content": "x", '
                             b'"settings": {"temperature": Infinity}}]}', "Infinity is not JSON"),
    "100 000 nested [": (b"[" * 100_000, f"nested more than {MAX_DEPTH} deep"),
    "deep settings": (with_reply(timings={"a": json.loads("[" * 40 + "]" * 40)}), f"more than {MAX_DEPTH} deep"),
    "messages an object": (conversation(messages={"m1": {}}), "messages must be a list"),
}


@pytest.mark.parametrize("case", list(BAD_CONVERSATIONS))
def test_bad_conversation_line_is_refused_whole(home, tmp_path, monkeypatch, case):
    bad, words = BAD_CONVERSATIONS[case]
    (tmp_path / "files").mkdir()
    good = conversation(id="fine", messages=[message("f1", None, "user")], current_leaf="f1")
    path = write_lines(tmp_path / "files" / "c.jsonl", good, bad)
    refused(home, tmp_path, monkeypatch, "import", "conversations", path, words=(f"{path}:2:", words,
                                                                                  "nothing was imported"))


def pref(**fields):
    row = {"prompt": [{"role": "user", "content": "Hi"}], "chosen": "Hello!", "rejected": "Go away.",
           "chosen_model": "a", "rejected_model": "b", "annotator": "me", "created_at": "2024-05-01T12:00:00+00:00"}
    row.update(fields)
    return row


BAD_PREFS = {
    "annotator a list": (pref(annotator=["me"]), "annotator must be non-empty text or null"),
    "annotator empty": (pref(annotator=""), "annotator must be non-empty text"),
    "annotator a number": (pref(annotator=7), "annotator must be non-empty text"),
    "created_at an object": (pref(created_at={}), "created_at must be an ISO 8601 time"),
    "chosen_model an object": (pref(chosen_model={"n": 1}), "chosen_model must be text or null"),
    "rejected_model true": (pref(rejected_model=True), "rejected_model must be text or null"),
    "lone surrogate in chosen": (pref(chosen="ok \ud800"), "lone surrogate"),
    "lone surrogate in the prompt": (pref(prompt="\udc00"), "lone surrogate"),
    "prompt a number": (pref(prompt=5), "prompt must be a non-empty list"),
    "deep prompt": (b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b', "chosen": "a", "rejected": "b"}',
                    f"nested more than {MAX_DEPTH} deep"),
    "NaN": (b'{"prompt": "hi", "chosen": "a", "rejected": "b", "created_at": NaN}', "NaN is not JSON"),
}


@pytest.mark.parametrize("case", list(BAD_PREFS))
def test_bad_pref_line_is_refused_whole(home, tmp_path, monkeypatch, case):
    bad, words = BAD_PREFS[case]
    (tmp_path / "files").mkdir()
    path = write_lines(tmp_path / "files" / "p.jsonl", pref(), pref(chosen="Howdy"), bad)
    refused(home, tmp_path, monkeypatch, "import", "prefs", path, words=(f"{path}:3:", words))


def ranking(**fields):
    row = {"prompt": [{"role": "user", "content": "Hi"}], "kind": "order", "vote": None, "annotator": "me",
           "created_at": "2024-05-01T12:00:00+00:00",
           "candidates": [{"content": "A", "model": "m", "settings": {"seed": 1}, "rank": 1, "flags": []},
                          {"content": "B", "model": "m", "settings": {"seed": 2}, "rank": 2, "flags": ["unsafe"]}]}
    row.update(fields)
    return row


def candidates(**fields):
    return ranking()["candidates"][:1] + [{**ranking()["candidates"][1], **fields}]


BAD_RANKINGS = {
    "kind best": (ranking(kind="best"), "kind must be order or vote"),
    "vote without kind vote": (ranking(vote="tie"), "vote goes with kind 'vote'"),
    "kind vote without vote": (ranking(kind="vote"), "vote goes with kind 'vote'"),
    "one candidate": (ranking(candidates=candidates()[:1]), "a list of two or more candidates"),
    "rank zero": (ranking(candidates=candidates(rank=0)), "candidates[1].rank must be a whole number from 1"),
    "rank text": (ranking(candidates=candidates(rank="2")), "candidates[1].rank must be a whole number from 1"),
    "unknown flag": (ranking(candidates=candidates(flags=["rude"])), "candidates[1].flags must be a list"),
    "flag twice": (ranking(candidates=candidates(flags=["unsafe", "unsafe"])), "distinct flags"),
    "settings hot": (ranking(candidates=candidates(settings={"temperature": "hot"})), "temperature = 'hot'"),
    "same candidate twice": (ranking(candidates=candidates(settings={"seed": 1}, content="A")),
                             "two candidates are the same reply"),
    "annotator a list": (ranking(annotator=[]), "annotator must be non-empty text"),
}


@pytest.mark.parametrize("case", list(BAD_RANKINGS))
def test_bad_ranking_line_is_refused_whole(home, tmp_path, case):
    # `parley import` does not take rankings yet (engine/cli.py's choices): the importer is called directly
    bad, words = BAD_RANKINGS[case]
    path = write_lines(tmp_path / "r.jsonl", ranking(annotator="other"), bad)
    with Store(home / "parley.db") as store, unchanged(home, home):
        with pytest.raises(ParleyError) as e:
            import_file(store, "rankings", path)
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"{path}:2: ") and words in message, message


# -- ids must be new, across the file and against the store -------------------------------------------
def test_duplicate_message_ids_across_lines_are_refused(home, tmp_path, monkeypatch):
    (tmp_path / "files").mkdir()
    first = conversation(id="a", messages=[message("same", None, "user")], current_leaf=None)
    second = conversation(id="b", messages=[message("same", None, "user")], current_leaf=None)
    path = write_lines(tmp_path / "files" / "c.jsonl", first, second)
    refused(home, tmp_path, monkeypatch, "import", "conversations", path,
            words=(f"{path}:2:", 'message id "same" is also on line 1'))


def test_duplicate_conversation_ids_in_a_file_are_refused(home, tmp_path, monkeypatch):
    (tmp_path / "files").mkdir()
    row = conversation(messages=[], current_leaf=None)
    path = write_lines(tmp_path / "files" / "c.jsonl", row, row)
    refused(home, tmp_path, monkeypatch, "import", "conversations", path,
            words=(f"{path}:2:", 'conversation id "c1" is also on line 1'))


def test_a_message_id_already_in_the_store_is_refused(home, tmp_path, monkeypatch):
    (tmp_path / "files").mkdir()
    with Store(home / "parley.db") as s:
        taken = s.db.execute("SELECT id FROM messages LIMIT 1").fetchone()[0]
    path = write_lines(tmp_path / "files" / "c.jsonl", conversation(id="new", current_leaf=None,
                                                                    messages=[message(taken, None, "user")]))
    refused(home, tmp_path, monkeypatch, "import", "conversations", path,
            words=(f"{path}:1:", f'message id "{taken}" is in the store already'))


# -- the file to read or write ------------------------------------------------------------------------
def test_importing_a_folder_says_it_is_a_folder(home, tmp_path, monkeypatch):
    (tmp_path / "files").mkdir()
    for kind in ("conversations", "prefs"):
        refused(home, tmp_path, monkeypatch, "import", kind, tmp_path / "files", words=("is a folder",))
    refused(home, tmp_path, monkeypatch, "import", "prefs", tmp_path / "files" / "nope.jsonl",
            words=("does not exist",))


@pytest.mark.parametrize("case", ["existing folder", "missing folder", "folder is a file"])
def test_export_refuses_a_folder_or_a_missing_folder(home, tmp_path, monkeypatch, case):
    files = tmp_path / "files"
    (files / "out").mkdir(parents=True)
    (files / "note.txt").write_text("mine")
    out, words = {"existing folder": (files / "out", ("is a folder",)),
                  "missing folder": (files / "typo" / "p.jsonl", (f"folder {files / 'typo'} does not exist",)),
                  "folder is a file": (files / "note.txt" / "p.jsonl", ("is not a folder",))}[case]
    for kind in ("conversations", "prefs", "rankings"):
        refused(home, tmp_path, monkeypatch, "export", kind, out, words=words)
    assert sorted(p.name for p in tmp_path.rglob("*") if "tmp" in p.name) == []   # no temporary file anywhere
    assert not (files / "typo").exists()


def test_export_that_cannot_be_written_is_one_line(home, tmp_path, monkeypatch):
    (tmp_path / "files").mkdir()

    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr("engine.store.exchange.atomic_write_text", no_space)
    refused(home, tmp_path, monkeypatch, "export", "prefs", tmp_path / "files" / "p.jsonl",
            words=("No space left on device", "nothing was written"))


# -- the store itself -------------------------------------------------------------------------------
def test_parley_home_pointing_at_a_file(tmp_path, monkeypatch):
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "home").write_text("not a folder")
    run = run_cli("export", "prefs", "-", home=tmp_path / "files" / "home", monkeypatch=monkeypatch)
    assert_one_line_error(run, "is a file, not a folder", "PARLEY_HOME")
    run = run_cli("export", "prefs", "-", home=tmp_path / "files" / "home" / "below", monkeypatch=monkeypatch)
    assert_one_line_error(run, "part of its path is a file", "PARLEY_HOME")
    assert (tmp_path / "files" / "home").read_text() == "not a folder"


def test_database_that_is_a_folder(tmp_path, monkeypatch):
    (tmp_path / "home" / "parley.db").mkdir(parents=True)
    run = run_cli("export", "prefs", "-", home=tmp_path / "home", monkeypatch=monkeypatch)
    assert_one_line_error(run, "is a folder, not a database")


@pytest.mark.skipif(ROOT, reason=AS_ROOT)
def test_read_only_folder_by_permissions(tmp_path, monkeypatch):
    (tmp_path / "home").mkdir()
    os.chmod(tmp_path / "home", 0o555)
    try:
        run = run_cli("export", "prefs", "-", home=tmp_path / "home", monkeypatch=monkeypatch)
    finally:
        os.chmod(tmp_path / "home", 0o755)
    assert_one_line_error(run, "cannot be written", "PARLEY_HOME")
    assert "not a usable SQLite database" not in run.err


def test_read_only_folder_by_sqlite(tmp_path, monkeypatch):
    """What SQLite answers in a folder it cannot create the file in (as root, chmod cannot make one)."""
    def cannot_open(*args, **kwargs):
        raise sqlite3.OperationalError("unable to open database file")
    monkeypatch.setattr(store_module.sqlite3, "connect", cannot_open)
    run = run_cli("export", "prefs", "-", home=tmp_path / "home", monkeypatch=monkeypatch)
    assert_one_line_error(run, "cannot be opened for writing", "permissions", "PARLEY_HOME")
    assert "not a usable SQLite database" not in run.err


@pytest.mark.skipif(ROOT, reason=AS_ROOT)
def test_read_only_database_by_permissions(home, tmp_path, monkeypatch):
    (tmp_path / "files").mkdir()
    path = write_lines(tmp_path / "files" / "p.jsonl", pref())
    os.chmod(home / "parley.db", 0o444)
    try:
        refused(home, tmp_path, monkeypatch, "import", "prefs", path, words=("cannot be written",))
    finally:
        os.chmod(home / "parley.db", 0o644)


def test_read_only_database_by_sqlite(home, tmp_path, monkeypatch):
    """SQLite's own read-only mode: the same refusal as a file without write permission."""
    (tmp_path / "files").mkdir()
    path = write_lines(tmp_path / "files" / "p.jsonl", pref())
    connect = sqlite3.connect   # the store's connection only: the harness reads the counts with its own

    def read_only(p, **kw):
        return connect(p, **kw) if kw.get("uri") else connect(f"file:{p}?mode=ro", uri=True, **kw)
    monkeypatch.setattr(store_module.sqlite3, "connect", read_only)
    refused(home, tmp_path, monkeypatch, "import", "prefs", path, words=("cannot be written", "read-only"))


def test_database_locked_by_another_process(home, tmp_path, monkeypatch):
    (tmp_path / "files").mkdir()
    path = write_lines(tmp_path / "files" / "p.jsonl", pref())
    monkeypatch.setattr(store_module, "BUSY_TIMEOUT_S", 0.2)   # the real wait is 30 s
    other = sqlite3.connect(home / "parley.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")   # another Parley in the middle of a write
    try:
        refused(home, tmp_path, monkeypatch, "import", "prefs", path,
                words=("locked by another process", "close the other Parley"))
    finally:
        other.execute("ROLLBACK")
        other.close()


def test_full_database_without_a_version(home, tmp_path, monkeypatch):
    con = sqlite3.connect(home / "parley.db")
    con.execute("PRAGMA user_version = 0")
    con.commit()
    con.close()
    with unchanged(home, home):
        run = run_cli("export", "prefs", "-", home=home, monkeypatch=monkeypatch)
    assert_one_line_error(run, "no schema version (user_version 0)", "move it aside")


def test_a_full_disk_during_import_says_so(home, tmp_path, monkeypatch):
    """SQLite's max_page_count stops the file growing, as a full disk would (SQLITE_FULL)."""
    (tmp_path / "files").mkdir()
    path = write_lines(tmp_path / "files" / "p.jsonl",
                       *(pref(chosen=f"{i} " + "long reply " * 400) for i in range(200)))
    real_init = Store.__init__

    def full_disk(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        pages = self.conn.execute("PRAGMA page_count").fetchone()[0]
        self.conn.execute(f"PRAGMA max_page_count = {pages + 8}")
    monkeypatch.setattr(Store, "__init__", full_disk)
    run = refused(home, tmp_path, monkeypatch, "import", "prefs", path,
                  words=("database or disk is full", "free space"))
    assert "cannot rollback" not in run.err


def test_a_full_disk_that_sqlite_rolled_back_itself_says_so(home, tmp_path, monkeypatch):
    """On a full disk SQLite may roll the whole transaction back itself (SQLITE_FULL while it writes
    the WAL): the store must not then try a ROLLBACK of its own ("cannot rollback - no transaction
    is active") and hide the reason."""
    (tmp_path / "files").mkdir()
    path = write_lines(tmp_path / "files" / "p.jsonl", pref(), pref(chosen="Howdy"))

    def full_mid_write(self, *args, **kwargs):
        self.conn.execute("ROLLBACK")   # what SQLite did
        raise sqlite3.OperationalError("database or disk is full")
    monkeypatch.setattr(Store, "rank", full_mid_write)
    run = refused(home, tmp_path, monkeypatch, "import", "prefs", path, words=("database or disk is full",
                                                                               "free space"))
    assert "cannot rollback" not in run.err


# -- idempotent imports -----------------------------------------------------------------------------
@pytest.mark.parametrize("kind, fmt", [("prefs", "jsonl"), ("prefs", "trl"), ("conversations", "jsonl")])
def test_importing_an_export_back_adds_nothing(home, tmp_path, monkeypatch, kind, fmt):
    out = tmp_path / f"{kind}.jsonl"
    assert run_cli("export", kind, out, "--format", fmt, home=home, monkeypatch=monkeypatch).rc == 0
    before = row_counts(home)
    run = run_cli("import", kind, out, home=home, monkeypatch=monkeypatch)
    assert run.rc == 0 and row_counts(home) == before, run.err
    assert f"{len(out.read_text().splitlines())} skipped" in run.err


def test_the_same_pair_twice_in_one_file_is_added_once(home, tmp_path, monkeypatch):
    path = write_lines(tmp_path / "p.jsonl", pref(), pref(), pref(annotator=None), pref(annotator="you"))
    run = run_cli("import", "prefs", path, home=home, monkeypatch=monkeypatch)
    assert run.rc == 0 and "imported 2 pairs, 1 prompts, 2 skipped" in run.err, run.err


def test_rankings_import_back_adds_nothing(home, tmp_path):
    with Store(home / "parley.db") as store:
        export(store, "rankings", "jsonl", str(tmp_path / "r.jsonl"))
        before = store.counts()
        assert import_file(store, "rankings", str(tmp_path / "r.jsonl")) == {"rankings": 0, "skipped": 1}
        assert store.counts() == before
    with Store(tmp_path / "other.db") as other:
        assert import_file(other, "rankings", str(tmp_path / "r.jsonl")) == {"rankings": 1, "skipped": 0}
        export(other, "rankings", "jsonl", str(tmp_path / "again.jsonl"))
    assert (tmp_path / "again.jsonl").read_text() == (tmp_path / "r.jsonl").read_text()


# -- runs whose process is gone ---------------------------------------------------------------------
def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_run_whose_process_is_gone_is_interrupted_and_resumes(tmp_path):
    with Store(tmp_path / "parley.db") as s:
        gone = s.start_run("sft", {}, pid=dead_pid())
        alive = s.start_run("sft", {}, pid=os.getpid())
        elsewhere = s.start_run("sft", {}, pid=dead_pid())
        s.conn.execute("UPDATE runs SET host = 'another-machine' WHERE id = ?", [elsewhere])
    with Store(tmp_path / "parley.db") as s:
        assert [s.run(r)["status"] for r in (gone, alive, elsewhere)] == ["interrupted", "running", "running"]
        s.resume_run(gone, pid=os.getpid())
        assert s.run(gone)["status"] == "running" and s.run(gone)["host"] == socket.gethostname()
        s.end_run(gone, "finished")
    with Store(tmp_path / "parley.db") as s:
        assert s.run(gone)["status"] == "finished"


def test_a_version_4_database_migrates_and_marks_its_dead_runs(tmp_path):
    path = tmp_path / "v4.db"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA foreign_keys = ON")
    schema.migrate(conn, upto=4)
    for rid, status, pid in (("dead", "running", dead_pid()), ("live", "running", os.getpid()),
                             ("done", "finished", None)):
        conn.execute("INSERT INTO runs (id, kind, config, status, started_at, pid) VALUES (?, 'rm', '{}', ?, 't', ?)",
                     (rid, status, pid))
    conn.execute("INSERT INTO metrics VALUES ('dead', 1, 'loss', 0.5, 't')")
    with pytest.raises(sqlite3.IntegrityError):   # version 4 has no such status
        conn.execute("UPDATE runs SET status = 'interrupted' WHERE id = 'done'")
    conn.close()
    with Store(path) as s:
        assert schema.version(s.conn) == schema.LATEST
        assert {r["id"]: r["status"] for r in s.runs()} == {"dead": "interrupted", "live": "running", "done": "finished"}
        assert s.metrics("dead") == [{"step": 1, "name": "loss", "value": 0.5}]   # the rebuilt table kept them
        assert s.conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        s.conn.execute("DELETE FROM runs WHERE id = 'dead'")
        assert s.metrics("dead") == []   # and metrics still belong to their run


# -- any JSON value in any field: imported exactly, or refused whole ------------------------------------
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
                    | st.text(max_size=8), lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=6)


def _fields():
    base = [("conversations", conversation(), path) for path in
            [(k,) for k in conversation() if k != "messages"] + [("messages", 1, k) for k in message("x", None, "u")]]
    base += [("prefs", pref(), (k,)) for k in pref()]
    base += [("rankings", ranking(), (k,)) for k in ranking() if k != "candidates"]
    base += [("rankings", ranking(), ("candidates", 1, k)) for k in ranking()["candidates"][1]]
    return base


FIELDS = _fields()


def _put(row, path, value):
    target = row
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value


def _get(row, path):
    for key in path:
        row = row[key]
    return row


def _exported(store, kind, tmp_path):
    export(store, kind, "jsonl", str(tmp_path / "out.jsonl"))
    return [json.loads(line) for line in (tmp_path / "out.jsonl").read_text(encoding="utf-8").split("\n") if line]


@pytest.mark.parametrize("kind", ["conversations", "prefs", "rankings"])
@settings(max_examples=90, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), value=JSON | st.text() | st.text(st.characters(categories=["Cs"]), min_size=1))
def test_any_value_in_any_field_is_imported_exactly_or_refused_whole(tmp_path_factory, kind, data, value):
    """Each of an importer's fields gets a dozen or more values (any JSON, any text, lone surrogates)."""
    _, base, path = data.draw(st.sampled_from([f for f in FIELDS if f[0] == kind]), label="field")
    row = json.loads(json.dumps(base))
    _put(row, path, value)
    tmp = tmp_path_factory.mktemp("prop")
    file = tmp / "in.jsonl"
    file.write_text(json.dumps(row) + "\n")   # ensure_ascii: a lone surrogate is written as its \u escape
    with Store(tmp / "parley.db") as store:
        before = store.counts()
        try:
            import_file(store, kind, str(file))
        except ParleyError as e:
            assert str(e).startswith(f"{file}:1: ") and "\n" not in str(e)
            assert store.counts() == before
            return
        got = _exported(store, kind, tmp)
    assert len(got) == 1
    given_back = _get(got[0], path) if kind != "conversations" or path[0] != "messages" else \
        next(m for m in got[0]["messages"] if m["id"] == row["messages"][1]["id"])[path[2]]
    value = json.loads(json.dumps(value))   # what the line says: JSON reads "\ud800\udc00" as one character
    if path == ("prompt",) and isinstance(value, str):
        value = [{"role": "user", "content": value}]
    if path[-1] == "flags":
        value = sorted(value)
    if path[-1] in ("annotator", "created_at") and value is None and kind != "conversations":
        return   # a line without them gets the import's annotator and time
    assert given_back == value


# ====================================================================================================
# the command line
# ====================================================================================================
@pytest.fixture(scope="module")
def model(checkpoints):
    return checkpoints("qwen2")[0]


@pytest.fixture(scope="module")
def escaping_model(tmp_path_factory):
    """A real n-gram model counted on text full of terminal escapes: greedy decoding writes them."""
    from engine.train.ngram import train_ngram
    from engine.train.tokenizer import train_tokenizer
    root = tmp_path_factory.mktemp("escaping")
    corpus = root / "corpus.txt"
    corpus.write_text("".join(f"line {i} says {ESCAPES} and stops\n" for i in range(200)), encoding="utf-8")
    train_tokenizer([corpus.read_text()], 300).save(root / "tok")
    lm = train_ngram(str(root / "tok"), str(corpus), 4, "mle")
    lm.save(root / "ngram")
    return root / "ngram"


# -- outputs: never into a directory of someone else's files -------------------------------------------
REQUIRED = {
    "tokenizer": [],
    "ngram": ["--tokenizer", "TOK"],
    "pretrain": ["--preset", "chat-6m", "--tokenizer", "TOK"],
    "sft": ["--model", "MODEL"],
    "rm": ["--base", "MODEL", "--prefs", "store"],
    "dpo": ["--policy", "MODEL", "--prefs", "store"],
    "ppo": ["--policy", "MODEL", "--reward-model", "MODEL"],
    "rloo": ["--policy", "MODEL", "--reward-model", "MODEL"],
    "grpo": ["--policy", "MODEL", "--reward-model", "MODEL"],
}


def train_args(mode, model, out, *extra):
    args = [str(model) if a in ("MODEL", "TOK") else a for a in REQUIRED[mode]]
    return ["train", mode, *args, "--out", out, *extra]


@pytest.mark.parametrize("mode", REQUIRED)
def test_an_out_holding_foreign_files_is_refused_untouched(mode, model, home, tmp_path, monkeypatch):
    out = tmp_path / "data"
    (out / "notes").mkdir(parents=True)
    (out / "corpus.txt").write_text("my training corpus")
    (out / "notes" / "todo.md").write_text("keep me")
    with unchanged(home, tmp_path):
        run = run_cli(*train_args(mode, model, out), home=home, monkeypatch=monkeypatch)
    assert_one_line_error(run, str(out), "did not write", "corpus.txt", "new or empty directory")


@pytest.mark.parametrize("mode", ["tokenizer", "ngram", "sft", "dpo", "grpo"])
def test_an_out_that_is_a_file_is_refused_before_any_work(mode, model, home, tmp_path, monkeypatch):
    out = tmp_path / "model.safetensors"
    out.write_bytes(b"not a directory")
    with unchanged(home, tmp_path):
        run = run_cli(*train_args(mode, model, out), home=home, monkeypatch=monkeypatch)
    assert_one_line_error(run, str(out), "is a file")


def test_a_second_tokenizer_goes_beside_the_files_it_did_not_write(home, tmp_path, monkeypatch):
    """Parley's own output, with the person's notes added, is written again: the notes stay."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"sentence number {i} is here\n" for i in range(60)))
    out = tmp_path / "tok"
    for vocab in (300, 320):
        run = run_cli("train", "tokenizer", "--data", corpus, "--vocab-size", vocab, "--out", out,
                      home=home, monkeypatch=monkeypatch)
        assert run.rc == 0, run.err
        (out / "notes.md").write_text("why this tokenizer")
    assert json.loads((out / "tokenizer.json").read_text())["model"]["vocab"].__len__() == 320
    assert (out / "notes.md").read_text() == "why this tokenizer" and corpus.exists()


def test_a_marker_cannot_make_parley_remove_files_elsewhere(home, tmp_path, monkeypatch):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"sentence number {i} is here\n" for i in range(60)))
    out = tmp_path / "tok"
    assert run_cli("train", "tokenizer", "--data", corpus, "--vocab-size", 300, "--out", out,
                   home=home, monkeypatch=monkeypatch).rc == 0
    (out / ".parley-output").write_text(json.dumps({"files": ["../corpus.txt", "/etc/hostname", "tokenizer.json"]}))
    assert run_cli("train", "tokenizer", "--data", corpus, "--vocab-size", 300, "--out", out,
                   home=home, monkeypatch=monkeypatch).rc == 0
    assert corpus.exists() and (out / "tokenizer.json").exists()


# -- training arguments: checked before any work ----------------------------------------------------
BAD_TRAINING = [
    ("pretrain", ["--batch-size", 0], "--batch-size 0", "1 or more"),
    ("pretrain", ["--seq-len", 0], "--seq-len 0", "1 or more"),
    ("pretrain", ["--lr", -1], "--lr -1", "greater than 0"),
    ("pretrain", ["--lr", "nan"], "--lr nan", "greater than 0"),
    ("sft", ["--lr", "inf"], "--lr inf", "greater than 0"),
    ("sft", ["--max-steps", 0], "--max-steps 0", "1 or more"),
    ("sft", ["--warmup-steps", -1], "--warmup-steps -1", "0 or more"),
    ("sft", ["--min-lr-ratio", 1.5], "--min-lr-ratio 1.5", "between 0 and 1"),
    ("sft", ["--seed", -1], "--seed -1", "2**63"),
    ("sft", ["--seed", 2**63], "--seed", "2**63"),
    ("dpo", ["--beta", 0], "--beta 0", "greater than 0"),
    ("rm", ["--max-len", 0], "--max-len 0", "1 or more"),
    ("ppo", ["--gamma", 2], "--gamma 2", "between 0 and 1"),
    ("ppo", ["--lam", -0.5], "--lam -0.5", "between 0 and 1"),
    ("ppo", ["--ema", 1.0], "--ema 1.0", "both excluded"),
    ("ppo", ["--beta", -0.1], "--beta -0.1", "0 or more"),
    ("ppo", ["--clip", 0], "--clip 0", "greater than 0"),
    ("rloo", ["--replies", 1], "--replies 1", "2 or more"),
    ("grpo", ["--temperature", 0], "--temperature 0", "greater than 0"),
    ("grpo", ["--max-new-tokens", 0], "--max-new-tokens 0", "1 or more"),
    ("tokenizer", ["--vocab-size", 0], "--vocab-size 0", "1 or more"),
    ("ngram", ["--order", 0], "--order 0", "1 or more"),
]


@pytest.mark.parametrize("mode, extra, named, rule", BAD_TRAINING, ids=lambda v: str(v))
def test_a_bad_training_number_is_refused_before_any_work(mode, extra, named, rule, model, home, tmp_path,
                                                          monkeypatch):
    out = tmp_path / "out"
    with unchanged(home, tmp_path):
        run = run_cli(*train_args(mode, model, out, *extra), home=home, monkeypatch=monkeypatch)
    assert_one_line_error(run, named, rule)
    assert not out.exists()


def test_a_full_disk_at_a_checkpoint_is_one_line_and_resume_goes_on(escaping_model, home, tmp_path, monkeypatch):
    """The disk fills while the step-4 checkpoint is written: one line, the step-2 checkpoint whole,
    nothing half-written left, and --resume (with space again) finishes the run."""
    from safetensors import SafetensorError

    from engine.train import resume
    real = resume.save_file

    def full_disk(tensors, path, *args, **kwargs):
        if "step-000004" in str(path):
            raise SafetensorError("Error while serializing: No space left on device (os error 28)")
        return real(tensors, path, *args, **kwargs)
    root, out = escaping_model.parent, tmp_path / "m"
    args = ["train", "pretrain", "--preset", "tiny", "--tokenizer", root / "tok", "--data", root / "corpus.txt",
            "--seq-len", 16, "--batch-size", 4, "--max-steps", 6, "--save-every", 2, "--eval-every", 6,
            "--eval-batches", 1, "--warmup-steps", 1, "--device", "cpu", "--out", out]
    monkeypatch.setattr(resume, "save_file", full_disk)
    run = run_cli(*args, home=home, monkeypatch=monkeypatch)
    # the steps before it printed their progress: the error is the last line, and the only one of its kind
    assert run.rc == 1 and "Traceback" not in run.err and run.err.count("error:") == 1
    last = run.err.strip().splitlines()[-1]
    assert all(w in last for w in ("error: could not write the checkpoint of step 4", "No space left", "--resume"))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002"]
    assert sorted(p.name for p in out.iterdir()) == [".parley-output", "checkpoints"]   # no model half-written
    with Store(home / "parley.db") as store:
        failed = next(r for r in store.runs() if r["kind"] == "pretrain")
        assert failed["status"] == "failed" and "No space left" in failed["error"]
    monkeypatch.setattr(resume, "save_file", real)
    assert run_cli(*args, "--resume", home=home, monkeypatch=monkeypatch).rc == 0
    assert (out / "config.json").exists() and sorted(p.name for p in (out / "checkpoints").iterdir())[-1] == "step-000006"


@pytest.mark.parametrize("extra, named", [(["--lr", "fast"], "--lr"), (["--batch-size", "4.5"], "--batch-size"),
                                          (["--autocast", "fp8"], "--autocast"), (["--bogus", "1"], "--bogus")])
def test_an_unreadable_flag_gets_one_line_from_argparse(extra, named, model, home, tmp_path, monkeypatch):
    with unchanged(home, tmp_path):
        run = run_cli(*train_args("sft", model, tmp_path / "out", *extra), home=home, monkeypatch=monkeypatch)
    assert_one_line_error(run, named, "--help", rc=2)


# -- generation: limits, seeds, text -----------------------------------------------------------------------
def generate_args(model, *extra):
    return ["generate", "--model", model, "--prompt", "hi", "--max-new-tokens", 3, "--device", "cpu", *extra]


BAD_GENERATE = [
    (["--n", 0], ["--n 0", "between 1 and"]),
    (["--n", 1_000_000_000], ["--n 1000000000", "between 1 and"]),
    (["--n", 100_000], ["--n 100000"]),
    (["--num-beams", 1_000_000], ["1000000 rows", "fewer candidates or beams"]),
    (["--num-beams", 600, "--n", 2], ["1200 rows"]),
    (["--seed", 2**63 - 1, "--n", 2], ["--seed", "2**63 - 1", "smaller --seed"]),
    (["--seed", -1], ["seed = -1", "2**63 - 1"]),
    (["--temperature", -1], ["temperature = -1", "between 0"]),
    (["--top-p", 0], ["top_p = 0", "(0, 1]"]),
    (["--min-new-tokens", 9], ["min_new_tokens", "max_new_tokens (3)"]),
    (["--stop", ""], ["stop", "non-empty"]),
]


@pytest.mark.parametrize("extra, words", BAD_GENERATE, ids=lambda v: str(v))
def test_a_bad_generation_request_is_refused(extra, words, model, home, tmp_path, monkeypatch):
    with unchanged(home, tmp_path):
        run = run_cli(*generate_args(model, *extra), home=home, monkeypatch=monkeypatch)
    assert_one_line_error(run, *words)
    assert run.out == ""


def test_rows_that_do_not_fit_in_memory_are_refused_before_allocating(model, home, tmp_path, monkeypatch):
    monkeypatch.setattr(generation, "available_memory", lambda device: 2**20)   # a machine with 1 MiB free
    with unchanged(home, tmp_path):
        run = run_cli(*generate_args(model, "--n", 64), home=home, monkeypatch=monkeypatch)
    assert_one_line_error(run, "64 rows", "GiB free", "fewer candidates")


@pytest.mark.parametrize("flag", ["--prompt", "--system"])
def test_a_prompt_that_is_not_utf8_is_refused(flag, model, home, tmp_path, monkeypatch):
    text = b"caf\xff".decode("utf-8", "surrogateescape")   # how Python hands over a non-UTF-8 argument
    args = generate_args(model, "--system", text) if flag == "--system" else \
        ["generate", "--model", model, "--prompt", text, "--max-new-tokens", 3, "--device", "cpu"]
    with unchanged(home, tmp_path):
        run = run_cli(*args, home=home, monkeypatch=monkeypatch)
    assert_one_line_error(run, flag, "not valid UTF-8", "0xff")


@pytest.mark.parametrize("extra", [[], ["--n", 2], ["--temperature", 0, "--n", 2, "--seed", 1]])
def test_model_text_reaches_the_terminal_with_its_escapes_visible(extra, escaping_model, home, monkeypatch):
    run = run_cli("generate", "--model", escaping_model, "--prompt", "line 7 says", "--raw", "--temperature", 0,
                  "--max-new-tokens", 40, "--device", "cpu", *extra, home=home, monkeypatch=monkeypatch)
    assert run.rc == 0, run.err
    assert not any(c in run.out for c in "\x1b\x07\x9b")
    assert printable(ESCAPES) in run.out


def test_json_keeps_the_exact_text(escaping_model, home, monkeypatch):
    run = run_cli("generate", "--model", escaping_model, "--prompt", "line 7 says", "--raw", "--temperature", 0,
                  "--max-new-tokens", 40, "--device", "cpu", "--json", home=home, monkeypatch=monkeypatch)
    assert run.rc == 0 and "\x1b" not in run.out   # JSON escapes control characters itself
    assert ESCAPES in json.loads(run.out)["text"]


def test_printable_escapes_every_control_character_but_newline_and_tab():
    assert printable("a\tb\nc\x00\x1b\x7f\x85\x9f\u200bé") == "a\tb\nc\\x00\\x1b\\x7f\\x85\\x9f\u200bé"


def test_an_error_that_quotes_escapes_shows_them_as_text(home, tmp_path, monkeypatch):
    missing = tmp_path / "evil\x1b]0;title\x07dir"
    run = run_cli("inspect", missing, home=home, monkeypatch=monkeypatch)
    assert_one_line_error(run, "\\x1b]0;title\\x07dir", "does not exist")
    assert "\x1b" not in run.err


# -- the app's config: a bad config.toml stops the start with one line --------------------------------------
BAD_CONFIG = [
    ('keys = "ctrl+g"\n', ["[keys] must be a table"]),
    ('[keys]\nregenerate = 5\n', ["line 2", "not a string"]),
    ('[keys]\nregenerate = ""\n', ["line 2", "not a key name"]),
    ('[keys]\nregenerate = "ctrl+nosuchkey"\n', ["line 2", "not a key name"]),
    ('[keys]\nfly_away = "f12"\n', ["line 2", "'fly_away' is not an action"]),
    ('[keys]\nregenerate = "f12"\nnew_conversation = "f12"\n', ['"f12" is already the key of']),
    ('[keys\nregenerate = "f12"\n', ["not valid TOML"]),
]


@pytest.mark.parametrize("text, words", BAD_CONFIG, ids=lambda v: str(v)[:30])
def test_a_bad_config_stops_the_app_with_one_line(text, words, home, monkeypatch):
    (home / "config.toml").write_text(text)
    with unchanged(home, home):
        run = run_cli("app", home=home, monkeypatch=monkeypatch, app=run_app)
    assert_one_line_error(run, "config.toml", *words)


def test_a_config_that_is_not_utf8_stops_the_app_with_one_line(home, monkeypatch):
    (home / "config.toml").write_bytes(b'system_prompt = "caf\xff"\n')
    before = files_under(home)
    run = run_cli("app", home=home, monkeypatch=monkeypatch, app=run_app)
    assert_one_line_error(run, "config.toml", "not valid TOML")
    assert files_under(home) == before


# ====================================================================================================
# model directories
# ====================================================================================================
@pytest.fixture
def model_dir(checkpoints, tmp_path):
    path, _ = checkpoints("llama_gqa_untied")
    shutil.copytree(path, tmp_path / "m")
    return tmp_path / "m"


def edit_json(name, **changes):
    def edit(path):
        data = json.loads((path / name).read_text()) if (path / name).exists() else {}
        data.update(changes)
        (path / name).write_text(json.dumps(data))
    return edit


def drop_key(name, key):
    def edit(path):
        data = json.loads((path / name).read_text())
        del data[key]
        (path / name).write_text(json.dumps(data))
    return edit


def write(name, text):
    return lambda path: (path / name).write_text(text)


def edit_tensors(fn):
    def edit(path):
        tensors = load_file(path / "model.safetensors")
        fn(tensors)
        save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return edit


def set_template(text):
    # transformers saves the template in chat_template.jinja, which wins over tokenizer_config.json's
    return write("chat_template.jinja", text)


def set_tensor(name, value):
    return edit_tensors(lambda t: t.update({name: value(t[name])}))


def refuse(model_dir, tmp_path, monkeypatch, words, *command):
    """Run the command on the broken directory and check the refusal; `command` defaults to inspect."""
    home = tmp_path / "home"
    argv = command or ("inspect", model_dir, "--device", "cpu")
    with unchanged(home, tmp_path):   # the model, any file it points at, and the store
        run = run_cli(*argv, home=home, monkeypatch=monkeypatch)
    assert_one_line_error(run, *words)
    return run


# -- the directory and its files as files ---------------------------------------------------------
def truncate(name, keep):
    return lambda path: (path / name).write_bytes((path / name).read_bytes()[:keep])


FILES = {
    "missing directory": (lambda p: shutil.rmtree(p), ["does not exist"]),
    "directory is a file": (lambda p: (shutil.rmtree(p), p.write_text("x")), ["is a file, not a model directory"]),
    "config.json missing": (lambda p: (p / "config.json").unlink(), ["config.json"]),
    "config.json not JSON": (write("config.json", "{not json"), ["config.json", "not valid JSON"]),
    "config.json an array": (write("config.json", "[1, 2]"), ["config.json", "JSON object"]),
    "config.json not UTF-8": (lambda p: (p / "config.json").write_bytes(b"\xff\xfe{}"), ["config.json"]),
    "weights missing": (lambda p: (p / "model.safetensors").unlink(), ["model.safetensors"]),
    "weights empty": (write("model.safetensors", ""), ["model.safetensors", "not a readable safetensors"]),
    "weights truncated": (truncate("model.safetensors", 3000), ["model.safetensors", "not a readable safetensors"]),
    "weights header only": (truncate("model.safetensors", 8), ["model.safetensors", "not a readable safetensors"]),
    "weights garbage": (write("model.safetensors", "\x00garbage"), ["not a readable safetensors"]),
    "tokenizer.json missing": (lambda p: (p / "tokenizer.json").unlink(), ["tokenizer.json"]),
    "tokenizer.json not JSON": (write("tokenizer.json", "{nope"), ["tokenizer.json", "cannot be read"]),
    "tokenizer.json wrong shape": (write("tokenizer.json", '{"model": 3}'), ["tokenizer.json", "cannot be read"]),
    "tokenizer_config.json an array": (write("tokenizer_config.json", "[]"), ["tokenizer_config.json"]),
    "generation_config.json not JSON": (write("generation_config.json", "{"), ["generation_config.json"]),
    "generation_config.json an array": (write("generation_config.json", "[2]"), ["generation_config.json"]),
}


@pytest.mark.parametrize("case", list(FILES))
def test_unreadable_files(model_dir, tmp_path, monkeypatch, case):
    break_it, words = FILES[case]
    break_it(model_dir)
    refuse(model_dir, tmp_path, monkeypatch, words)


# -- weights: kinds, values, where the shards are -------------------------------------------------
def shard_index(target):
    """An index whose every tensor lives in `target(path)`, with a real copy of the weights there."""
    def edit(path):
        where = target(path)
        (path.parent / "base").mkdir()
        shutil.copy(path / "model.safetensors", path.parent / "base" / "model.safetensors")
        names = load_file(path / "model.safetensors").keys()
        (path / "model.safetensors").unlink()
        (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {n: where for n in names}}))
    return edit


def big_values(t):
    return torch.full_like(t, 1e6)   # finite in float32, infinite once cast to float16


WEIGHTS = {
    "int64 weight": (set_tensor("model.norm.weight", lambda t: t.long()), ["'model.norm.weight'", "int64"]),
    "int8 weight": (set_tensor("lm_head.weight", lambda t: t.to(torch.int8)), ["'lm_head.weight'", "int8"]),
    "bool weight": (set_tensor("model.norm.weight", lambda t: t > 0), ["'model.norm.weight'", "bool"]),
    "NaN weight": (set_tensor("model.layers.1.mlp.up_proj.weight", lambda t: t.index_fill(0, torch.tensor([3]),
                   float("nan"))), ["'model.layers.1.mlp.up_proj.weight'", "NaN"]),
    "inf weight": (set_tensor("model.embed_tokens.weight", lambda t: t.index_fill(1, torch.tensor([0]),
                   float("-inf"))), ["'model.embed_tokens.weight'", "infinite"]),
    "NaN in float16 weight": (set_tensor("model.norm.weight", lambda t: torch.full_like(t, float("nan")).half()),
                              ["'model.norm.weight'", "NaN"]),
    "shard outside, relative": (shard_index(lambda p: "../base/model.safetensors"),
                                ["../base/model.safetensors", "outside the model directory"]),
    "shard outside, absolute": (shard_index(lambda p: str(p.parent / "base" / "model.safetensors")),
                                ["outside the model directory"]),
    "shard outside, nested ..": (shard_index(lambda p: "sub/../../base/model.safetensors"),
                                 ["outside the model directory"]),
    "index without weight_map": (write("model.safetensors.index.json", '{"weight_map": ["a"]}'), ["weight_map"]),
    "index shard missing": (write("model.safetensors.index.json", '{"weight_map": {"a": "x.safetensors"}}'),
                            ["'x.safetensors'", "missing"]),
}


@pytest.mark.parametrize("case", list(WEIGHTS))
def test_bad_weights(model_dir, tmp_path, monkeypatch, case):
    break_it, words = WEIGHTS[case]
    break_it(model_dir)
    refuse(model_dir, tmp_path, monkeypatch, words)


def test_weights_that_overflow_float16_say_so(model_dir, tmp_path, monkeypatch):
    set_tensor("model.norm.weight", big_values)(model_dir)
    refuse(model_dir, tmp_path, monkeypatch, ["'model.norm.weight'", "too large for float16", "--dtype"],
           "inspect", model_dir, "--device", "cpu", "--dtype", "float16")


# -- weights that do not fit config.json, and what Parley does not run -----------------------------
def pickled_only(path):
    (path / "model.safetensors").unlink()
    (path / "pytorch_model.bin").write_bytes(b"\x80\x04 pickled, never opened")


MISMATCH = {
    "pickled weights only": (pickled_only, ["only pickled PyTorch weights (pytorch_model.bin)", "never unpickles",
                                            "safe_serialization=True"]),
    "unsupported model type": (edit_json("config.json", model_type="bert"),
                               ["model_type 'bert' is not supported: use one of gemma2, gemma3_text, gpt2, llama, mistral, "
                                "phi3, qwen2, qwen3, smollm3"]),
    "config missing a field": (drop_key("config.json", "hidden_size"), ["config.json", "lacks 'hidden_size'"]),
    "unknown tensor name": (edit_tensors(lambda t: t.update({"model.layers.0.mlp.gate.weight":
                                                               t.pop("model.layers.0.mlp.gate_proj.weight")})),
                            ["tensor 'model.layers.0.mlp.gate.weight' is not part of the model"]),
    "wrong tensor shape": (edit_tensors(lambda t: t.update({"model.norm.weight": torch.ones(65)})),
                           ["tensor 'model.norm.weight' has shape [65] but config.json implies [64]"]),
    "missing tensor": (edit_tensors(lambda t: t.pop("model.layers.1.self_attn.k_proj.weight")),
                       ["tensor 'model.layers.1.self_attn.k_proj.weight' is missing"]),
    "unsupported rope": (edit_json("config.json", rope_scaling={"rope_type": "yarn", "factor": 2.0}),
                         ["rope scaling type 'yarn' is not supported: use one of default, linear, llama3"]),
}


@pytest.mark.parametrize("case", list(MISMATCH))
def test_weights_or_config_parley_cannot_run(model_dir, tmp_path, monkeypatch, case):
    break_it, words = MISMATCH[case]
    break_it(model_dir)
    refuse(model_dir, tmp_path, monkeypatch, words)


# -- config.json's fields ----------------------------------------------------------------------
CONFIG = {
    "max_position_embeddings text": ({"max_position_embeddings": "abc"}, ["max_position_embeddings", "'abc'"]),
    "max_position_embeddings negative": ({"max_position_embeddings": -1}, ["max_position_embeddings", "-1"]),
    "hidden_size zero": ({"hidden_size": 0}, ["hidden_size", "1 or more"]),
    "hidden_size a float": ({"hidden_size": 64.0}, ["hidden_size", "64.0", "whole number"]),
    "hidden_size a bool": ({"hidden_size": True}, ["hidden_size", "whole number"]),
    "vocab_size text": ({"vocab_size": "x"}, ["vocab_size", "'x'"]),
    "num_hidden_layers a list": ({"num_hidden_layers": [2]}, ["num_hidden_layers"]),
    "heads do not divide width": ({"num_attention_heads": 3, "num_key_value_heads": 1, "head_dim": None},
                                  ["num_attention_heads 3 does not divide hidden_size 64"]),
    "kv heads do not divide heads": ({"num_key_value_heads": 3}, ["num_key_value_heads 3 does not divide"]),
    "num_attention_heads zero": ({"num_attention_heads": 0}, ["num_attention_heads", "1 or more"]),
    "rms_norm_eps text": ({"rms_norm_eps": "small"}, ["rms_norm_eps", "finite number"]),
    "rope_theta infinite": ({"rope_theta": 1e400}, ["rope_theta", "finite number"]),
    "tie_word_embeddings text": ({"tie_word_embeddings": "yes"}, ["tie_word_embeddings", "true or false"]),
    "rope_scaling text": ({"rope_scaling": "linear"}, ["rope_scaling", "JSON object"]),
    "model_type a number": ({"model_type": 7}, ["model_type"]),
}


@pytest.mark.parametrize("case", list(CONFIG))
def test_bad_config_fields(model_dir, tmp_path, monkeypatch, case):
    changes, words = CONFIG[case]
    if case == "rope_theta infinite":   # json.dumps writes Infinity, which Python's JSON reads back as inf
        changes = {"rope_theta": float("inf")}
    edit_json("config.json", **changes)(model_dir)
    refuse(model_dir, tmp_path, monkeypatch, ["config.json", *words])


# -- generation_config.json and config.json's end-of-reply ids ------------------------------------
EOS = {
    "text": ("generation_config.json", "two"),
    "out of vocab": ("generation_config.json", 999999),
    "negative": ("generation_config.json", -1),
    "a bool": ("generation_config.json", True),
    "list with text": ("generation_config.json", [2, "x"]),
    "float": ("generation_config.json", 2.0),
    "config.json out of vocab": ("config.json", 999999),
}


@pytest.mark.parametrize("case", list(EOS))
def test_bad_eos_ids(model_dir, tmp_path, monkeypatch, case):
    file, value = EOS[case]
    edit_json(file, eos_token_id=value)(model_dir)
    refuse(model_dir, tmp_path, monkeypatch, [file, "eos_token_id", "not a token id"])


# -- tokenizer against model ----------------------------------------------------------------------
def bigger_tokenizer(path):
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    tok.add_tokens([f"<extra_{i}>" for i in range(5)])
    tok.save(str(path / "tokenizer.json"))


def one_token_tokenizer(path):
    Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")).save(str(path / "tokenizer.json"))


TOKENIZER = {
    "ids past the model's vocab": (bigger_tokenizer, ["tokenizer.json", "embeds only ids 0 to"]),
    "a one-token tokenizer": (one_token_tokenizer, ["tokenizer.json", "1 token", "at least two"]),
    "eos token not in vocab": (edit_json("tokenizer_config.json", eos_token="<|nope|>"),
                               ["tokenizer_config.json", "'<|nope|>'"]),
    "eos token a number": (edit_json("tokenizer_config.json", eos_token=5), ["tokenizer_config.json", "eos_token"]),
    "chat template a number": (lambda p: ((p / "chat_template.jinja").unlink(),
                                          edit_json("tokenizer_config.json", chat_template=5)(p)), ["chat_template"]),
}


@pytest.mark.parametrize("case", list(TOKENIZER))
def test_tokenizer_that_does_not_fit(model_dir, tmp_path, monkeypatch, case):
    break_it, words = TOKENIZER[case]
    break_it(model_dir)
    refuse(model_dir, tmp_path, monkeypatch, words)


# -- chat templates -------------------------------------------------------------------------------
TEMPLATES = {
    "division by zero": ("{{ (1/0) }}", ["ZeroDivisionError"]),
    "huge range": ("{% for i in range(10**9) %}{% endfor %}", ["builds a value", "limit"]),
    "endless recursion": ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", ["RecursionError"]),
    "huge repeat": ("{{ 'ab ' * 30000000 }}", ["builds a value", "characters", "limit"]),
    "huge repeat, int first": ("{{ 30000000 * 'ab ' }}", ["builds a value", "characters", "limit"]),
    "doubling with ~": ("{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}"
                        "{% endfor %}{{ ns.s }}", ["builds a string", "characters", "limit"]),
    "doubling with +": ("{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}"
                        "{% endfor %}{{ ns.s }}", ["builds a value", "characters", "limit"]),
    "huge width filter": ("{{ 'a'|center(1000000000) }}", ["builds a value", "characters", "limit"]),
    "huge width format": ("{{ '%099999999999d' % 1 }}", ["builds a value", "characters", "limit"]),
    "huge width str.format": ("{{ '{:>999999999}'.format(1) }}", ["builds a value", "characters", "limit"]),
    "huge width format filter": ("{{ '%099999999999d'|format(1) }}", ["builds a value", "characters", "limit"]),
    "huge power": ("{{ 2 ** 100000000 }}", ["builds a number", "limit"]),
    "huge output": ("{% for i in range(100000) %}{{ 'x' * 100 }}{% endfor %}", ["builds a prompt", "limit"]),
    "syntax error": ("{% for %}", ["syntax error"]),
    "raise_exception with newlines": ("{{ raise_exception('no\nsystem\nrole') }}", ["refused", "no system role"]),
    "sandbox escape": ("{{ ''.__class__.__mro__[1].__subclasses__() }}", ["chat template", "sandbox forbids"]),
}


@pytest.mark.parametrize("case", list(TEMPLATES))
def test_chat_template_that_fails(model_dir, tmp_path, monkeypatch, case):
    template, words = TEMPLATES[case]
    set_template(template)(model_dir)
    start = time.monotonic()
    refuse(model_dir, tmp_path, monkeypatch, ["chat template", *words],
           "generate", "--model", model_dir, "--prompt", "hi", "--max-new-tokens", "2", "--device", "cpu")
    assert time.monotonic() - start < 10   # refused well before building it (it once ran 42 s, then aborted)


def test_chat_template_that_runs_too_long_stops_at_the_limit(model_dir, tmp_path, monkeypatch):
    # Nested loops that build nothing and call nothing: only the clock stops them (each loop start checks it).
    monkeypatch.setattr(chat_template, "MAX_RENDER_SECONDS", 0.3)
    set_template("{% set s = 'x' * 100000 %}{% for a in s %}{% for b in s %}"
              "{% endfor %}{% endfor %}")(model_dir)
    start = time.monotonic()
    refuse(model_dir, tmp_path, monkeypatch, ["chat template", "longer than 0.3 s"],
           "generate", "--model", model_dir, "--prompt", "hi", "--max-new-tokens", "2", "--device", "cpu")
    assert time.monotonic() - start < 5


def test_exponential_macro_stops_at_the_limit(model_dir, tmp_path, monkeypatch):
    # No loop at all: each macro call checks the clock.
    monkeypatch.setattr(chat_template, "MAX_RENDER_SECONDS", 0.3)
    set_template("{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}"
              "{% endif %}{% endmacro %}{{ f(40) }}")(model_dir)
    refuse(model_dir, tmp_path, monkeypatch, ["chat template", "longer than 0.3 s"],
           "generate", "--model", model_dir, "--prompt", "hi", "--max-new-tokens", "2", "--device", "cpu")


# -- what must still load -------------------------------------------------------------------------
def padded_embeddings(path):
    """A model whose embedding has 64 rows more than its tokenizer, as many real checkpoints do."""
    config = json.loads((path / "config.json").read_text())
    edit_json("config.json", vocab_size=config["vocab_size"] + 64)(path)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        set_tensor(name, lambda t: torch.cat([t, torch.zeros(64, t.shape[1])]))(path)


def symlinked_shard(path):
    """A Hugging Face cache snapshot: the index names a plain file, which is a symlink out of the directory."""
    (path.parent / "blobs").mkdir()
    shutil.move(path / "model.safetensors", path.parent / "blobs" / "abc123")
    (path / "model-00001-of-00001.safetensors").symlink_to(path.parent / "blobs" / "abc123")
    names = load_file(path / "model-00001-of-00001.safetensors").keys()
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {n: "model-00001-of-00001.safetensors" for n in names}}))


GOOD = {
    "as saved": lambda p: None,
    "padded embeddings": padded_embeddings,
    "symlinked shard": symlinked_shard,
    "head_dim that need not divide": edit_json("config.json", num_attention_heads=3, num_key_value_heads=1,
                                               head_dim=16),
    "eos ids as a list": edit_json("generation_config.json", eos_token_id=[2, 3]),
    "eos id null": edit_json("generation_config.json", eos_token_id=None),
    "rope_theta an int": edit_json("config.json", rope_theta=10000),
}


@pytest.mark.parametrize("case", list(GOOD))
def test_sound_directories_still_load_and_generate(model_dir, tmp_path, monkeypatch, case):
    if case == "head_dim that need not divide":   # 3 heads of 16 on a width of 64: attention weights to match
        tensors = load_file(model_dir / "model.safetensors")
        for layer in range(2):
            a = f"model.layers.{layer}.self_attn."
            tensors[a + "q_proj.weight"] = torch.randn(48, 64) * 0.1
            tensors[a + "k_proj.weight"] = torch.randn(16, 64) * 0.1
            tensors[a + "v_proj.weight"] = torch.randn(16, 64) * 0.1
            tensors[a + "o_proj.weight"] = torch.randn(64, 48) * 0.1
        save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})
    GOOD[case](model_dir)
    run = run_cli("generate", "--model", model_dir, "--prompt", "hi", "--max-new-tokens", "2", "--device", "cpu",
                  "--seed", "0", home=tmp_path / "home", monkeypatch=monkeypatch)
    assert run.rc == 0, run.err


@pytest.mark.parametrize("config", ["config.json", "adapter_config.json"])
def test_an_output_is_published_with_the_file_that_makes_it_a_model_last(tmp_path, monkeypatch, config):
    """A crash while an output's files are renamed into place never leaves a new config beside old weights."""
    from engine import files
    source = tmp_path / "src"
    source.mkdir()
    for name in ("a.safetensors", config, "z.txt"):
        (source / name).write_text(name)
    out = tmp_path / "out"
    out.mkdir()
    moved = []
    real = os.replace
    monkeypatch.setattr(files.os, "replace", lambda a, b: (moved.append(os.path.basename(b)), real(a, b)))
    files._publish(out, source)
    renamed = [m for m in moved if m != files.MARKER and not m.startswith(".")]
    assert renamed[-1] == config and sorted(renamed) == sorted(["a.safetensors", config, "z.txt"])
