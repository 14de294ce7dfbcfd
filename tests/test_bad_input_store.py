"""Bad input to the store and to `parley import/export`: each refusal is one line naming the problem,
exit status 1, and the store and the files as they were (tests/bad_input.py checks all three)."""
import json
import os
import socket
import sqlite3
import subprocess
import sys

import pytest
from bad_input import assert_one_line_error, row_counts, run_cli, unchanged
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import ParleyError
from engine.store import Store, schema
from engine.store import store as store_module
from engine.store.exchange import MAX_DEPTH, export, import_file

ROOT = os.geteuid() == 0
AS_ROOT = "root writes through any permission bits: the chmod case is covered by the monkeypatched one"


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
