"""The real `parley` command in a real terminal: tmux types the keys, and the test reads the
screens tmux captures and the database the app writes. The Pilot tests in test_app.py drive the
app from inside; this one catches what only a terminal shows (escape sequences for Alt and Ctrl
keys, the console script, a clean exit)."""
import functools
import json
import os
import re
import shlex
import shutil
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GREETING = "Hello there!"

def tmux_cannot_start() -> str:
    """Why tmux cannot run a session here ("" when it can): not installed, or its server will not start."""
    if shutil.which("tmux") is None:
        return "tmux is not installed (.ci/run installs it with apt-get where it can)"
    name = f"parley-probe-{uuid.uuid4().hex[:8]}"
    probe = subprocess.run(["tmux", "-L", name, "-f", "/dev/null", "new-session", "-d", "-x", "20", "-y", "5",
                            "sleep 1"], capture_output=True, text=True)
    subprocess.run(["tmux", "-L", name, "kill-server"], capture_output=True)
    return "" if probe.returncode == 0 else f"tmux cannot start a server here: {probe.stderr.strip()}"


WHY_NOT = tmux_cannot_start()
pytestmark = pytest.mark.skipif(bool(WHY_NOT), reason=WHY_NOT)


def parley_command() -> list[str]:
    """The venv's console script when there is one (what a user runs), else the module."""
    script = Path(sys.executable).with_name("parley")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "tui_app"]


class Terminal:
    """A 160x45 tmux pane running one command, on a tmux server of its own (its own -L socket and
    no config file), so a user's tmux is never touched."""

    def __init__(self, command: list[str], env: dict, folder: Path):
        self.socket = f"parley-test-{uuid.uuid4().hex[:12]}"
        self.folder = folder
        self.log = folder / "terminal.log"   # every byte the command wrote, escape sequences and all
        self.last_screen = ""
        # The command waits for `go`, so that the log has its output from the first byte, and its
        # exit status is written by the shell: tmux can miss the SIGCHLD and leave it a zombie.
        wrapped = ["sh", "-c", 'while [ ! -e "$0/go" ]; do sleep 0.05; done; "$@"; echo $? > "$0/status"',
                   str(folder), *command]
        self.tmux("new-session", "-d", "-s", "parley", "-x", "160", "-y", "45", shlex.join(wrapped), env=env)
        self.tmux("set-option", "-w", "-t", "parley", "remain-on-exit", "on")   # the last screen stays
        self.tmux("pipe-pane", "-t", "parley", "-o", f"cat >> {shlex.quote(str(self.log))}")
        (folder / "go").touch()

    def tmux(self, *args: str, env: dict | None = None) -> str:
        return subprocess.run(["tmux", "-L", self.socket, "-f", os.devnull, *args], capture_output=True,
                              text=True, check=True, timeout=10, env=env).stdout

    def type(self, text: str) -> None:
        self.tmux("send-keys", "-t", "parley", "-l", text)

    def press(self, *keys: str) -> None:
        self.tmux("send-keys", "-t", "parley", *keys)

    def screen(self) -> str:
        self.last_screen = self.tmux("capture-pane", "-p", "-t", "parley")
        return self.last_screen

    def exit_status(self) -> int | None:
        """The command's exit status once it has ended."""
        status = self.folder / "status"
        text = status.read_text() if status.exists() else ""
        return int(text) if text.endswith("\n") else None

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True, timeout=10)


def wait_for(terminal: Terminal, what: str, condition, timeout: float = 20.0, db: Path | None = None):
    """Poll `condition` until it returns something truthy; on time-out, fail showing the last screen
    (and what the database holds)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(0.1)
    terminal.screen()
    held = (f"; the database holds replies {[status for _, _, status in replies(db)]} and comparisons of "
            f"{comparison_sizes(db)}" if db else "")
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}{held}; the screen was:\n"
                         f"{terminal.last_screen}")


def query(db: Path, sql: str, *params) -> list[tuple]:
    """Read the app's database without writing to it (it is in WAL mode, so reading never blocks it)."""
    if not db.exists():
        return []
    connection = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=2)
    try:
        return connection.execute(sql, params).fetchall()
    except sqlite3.OperationalError as e:
        if "no such table" in str(e):   # the schema is still being created
            return []
        raise
    finally:
        connection.close()


def replies(db: Path) -> list[tuple]:
    return query(db, "SELECT id, content, status FROM messages WHERE role = 'assistant' ORDER BY created_at, rowid")


def comparison_sizes(db: Path) -> list[int]:
    return [n for (n,) in query(db, "SELECT count(*) FROM comparison_candidates GROUP BY comparison_id")]


def all_complete(db: Path, count: int) -> bool:
    rows = replies(db)
    return len(rows) == count and all(status == "complete" for _, _, status in rows)


def chat_column(screen: str) -> str:
    """The chat's column of a captured chat screen (between the conversation list and the
    decoding controls), without the greeting, so that only the reply's words are left."""
    parts = [line.split("│")[1] for line in screen.splitlines() if line.count("│") >= 2]
    return "\n".join(parts).replace(GREETING, "")


def shows_reply(screen: str, reply: str) -> bool:
    """Most of the reply's words are on screen (a tiny random model writes noise, and Markdown
    may fold a long run of it, so not necessarily all of them)."""
    words = re.findall(r"[A-Za-z0-9]{3,}", reply)
    if not words:   # a reply of only symbols: its status line stands in for it
        return "tok/s" in screen
    column = chat_column(screen)
    return 2 * sum(word in column for word in words) >= len(words)


def press_until(wait, terminal: Terminal, key: str, what: str, condition, tries: int = 5) -> None:
    """Press `key` until `condition` holds. The compare view refuses a new pane or a ranking until
    its panes are done, which the database shows a moment before the view knows; a refused press
    only warns, and an accepted one starts a run that refuses the next press until the rows this
    waits for exist, so no press is counted twice."""
    for _ in range(tries - 1):
        terminal.press(key)
        try:
            return wait(what, condition, 3)
        except AssertionError:
            pass
    terminal.press(key)
    wait(what, condition, 3)


def test_a_conversation_in_a_real_terminal(checkpoints, tmp_path):
    model, _ = checkpoints("qwen2")
    home = tmp_path / "home"
    db = home / "parley.db"
    env = {**os.environ, "PARLEY_HOME": str(home), "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}   # the tree under test, not an install
    # one thread for a 0.1M-parameter model: on a busy machine spinning OpenMP threads slow it tenfold
    env["OMP_NUM_THREADS"] = "1"
    env.pop("TMUX", None)
    terminal = Terminal([*parley_command(), "app", "--model", str(model), "--device", "cpu"], env, tmp_path)
    wait = functools.partial(wait_for, terminal, db=db)
    try:
        wait("the model to load", lambda: "ready:" in terminal.screen(), 60)
        terminal.type(GREETING)
        terminal.press("Enter")
        wait("the reply", lambda: all_complete(db, 1))
        first_id, first_text, _ = replies(db)[0]
        wait("the reply on screen", lambda: shows_reply(terminal.screen(), first_text), 10)

        terminal.press("C-r")
        wait("the regenerated reply", lambda: all_complete(db, 2))
        wait("the second branch's marker", lambda: "‹ 2/2 ›" in terminal.screen(), 10)
        terminal.press("M-Left")
        wait("the first branch's marker", lambda: "‹ 1/2 ›" in terminal.screen(), 10)
        assert query(db, "SELECT current_leaf FROM conversations") == [(first_id,)]

        terminal.press("C-o")
        wait("two compare panes", lambda: comparison_sizes(db) == [2] and all_complete(db, 4))
        press_until(wait, terminal, "C-Up", "a third pane", lambda: 3 in comparison_sizes(db))
        # the rerun replaces the unranked two-pane comparison (store.discard_comparison): 2 chat replies + 3
        wait("three compare panes", lambda: comparison_sizes(db) == [3] and all_complete(db, 5))
        terminal.type("b a=c")
        press_until(wait, terminal, "Enter", "the ranking",
                    lambda: query(db, "SELECT count(*) FROM rankings") == [(1,)])
        wait("the chat after ranking", lambda: "Decoding" in terminal.screen(), 10)
        terminal.press("C-q")
        wait("the app to quit", lambda: terminal.exit_status() is not None)
        after_exit = terminal.screen()
    finally:
        terminal.close()

    assert terminal.exit_status() == 0, f"parley exited with status {terminal.exit_status()}:\n{after_exit}"
    output = terminal.log.read_bytes().decode("utf-8", "replace")
    assert "Traceback" not in output and "Traceback" not in after_exit, f"a traceback was printed:\n{after_exit}"
    assert query(db, "SELECT count(*) FROM conversations") == [(1,)]
    assert all_complete(db, 5), replies(db)
    (comparison,) = [c for (c,) in query(db, "SELECT comparison_id FROM comparison_candidates GROUP BY "
                                             "comparison_id HAVING count(*) = 3")]
    a, b, c = [m for (m,) in query(db, "SELECT message_id FROM comparison_candidates WHERE comparison_id = ? "
                                       "ORDER BY position", comparison)]
    ((kind, ranks),) = query(db, "SELECT kind, ranks FROM rankings WHERE comparison_id = ?", comparison)
    assert kind == "order" and json.loads(ranks) == {b: 1, a: 2, c: 2}
    assert set(query(db, "SELECT chosen_id, rejected_id FROM preference_pairs")) == {(b, a), (b, c)}
    assert query(db, "SELECT current_leaf FROM conversations") == [(b,)]   # the best one continues
