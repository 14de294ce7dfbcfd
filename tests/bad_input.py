"""The bad-input suite's harness: run a command in-process, then prove it said one line and changed nothing.

A refusal is checked three ways: its exit status, that stderr is a single `parley…: error: …` line with
no traceback that names the problem, and that the store's row counts and the files under the watched
folders are byte-for-byte what they were before.
"""
import contextlib
import hashlib
import io
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from engine.cli import main


@dataclass
class Run:
    rc: int
    out: str
    err: str


def run_cli(*argv, home: Path, monkeypatch, app=None) -> Run:
    """`parley ARGV` with PARLEY_HOME=home, in this process (a subprocess per case would cost a torch
    import); `app` is what `parley app` runs (tui_app.main.run_app for the real one)."""
    monkeypatch.setenv("PARLEY_HOME", str(home))
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main([str(a) for a in argv], app=app)
        except SystemExit as e:    # argparse's own refusals
            rc = e.code if isinstance(e.code, int) else 1
    return Run(rc, out.getvalue(), err.getvalue())


def files_under(*roots: Path) -> dict[str, str]:
    """Every file under the roots with a hash of its bytes (SQLite's -wal/-shm files aside: they are the store's)."""
    state = {}
    for root in roots:
        root = Path(root)
        paths = [root] if root.is_file() else sorted(root.rglob("*")) if root.exists() else []
        for p in paths:
            if p.name.endswith(("-wal", "-shm")):
                continue
            state[str(p)] = hashlib.sha1(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return state


def row_counts(home: Path) -> dict[str, int]:
    db = Path(home) / "parley.db"
    if not db.exists():
        return {}
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return {t: con.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0] for t in tables}
    finally:
        con.close()


def assert_one_line_error(run: Run, *words: str, rc: int = 1) -> None:
    """Exit status `rc`, and stderr one line without a traceback that mentions every word (case-insensitive)."""
    lines = run.err.strip().splitlines()
    assert run.rc == rc, (run.rc, run.err)
    assert len(lines) == 1, run.err
    assert "Traceback" not in run.err and ": error: " in lines[0], run.err
    for word in words:
        assert word.lower() in lines[0].lower(), (word, lines[0])


@contextlib.contextmanager
def unchanged(home: Path, *roots: Path):
    """Assert that the store's row counts and every file under `roots` are the same after the block."""
    rows, files = row_counts(home), files_under(*roots)
    yield
    assert row_counts(home) == rows
    now = files_under(*roots)
    changed = sorted(p for p in set(files) | set(now) if files.get(p) != now.get(p))
    assert not changed, f"changed on disk: {changed}"
