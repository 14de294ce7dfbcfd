"""Training runs the app starts: each a separate `parley train ...` process, its output in a log
next to the store; the app only reads what the run writes to the store, and the log when it fails."""
import re
from pathlib import Path


def launch(folder: Path, args: list[str]):
    """Start `parley train ...` (`args` from "train" on); returns (process, its log)."""
    import subprocess
    import sys
    import tempfile
    with tempfile.NamedTemporaryFile("w", dir=folder, prefix="run-", suffix=".log", delete=False) as log:
        process = subprocess.Popen([sys.executable, "-m", "tui_app", *args], stdout=log, stderr=log,
                                   stdin=subprocess.DEVNULL)
    # named after the process only once it has one; the process writes on through the renamed file
    return process, Path(log.name).replace(folder / f"run-{process.pid}.log")


def why_it_failed(log: Path, code: int) -> str:
    """The line of a failed run's log that says why: the CLI's one-line `error: ...` (its own or
    argparse's), else the last line (a traceback's ends with the exception)."""
    if code < 0:
        import signal
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    try:
        lines = [line.strip() for line in log.read_text(encoding="utf-8", errors="replace").splitlines()]
    except OSError:
        lines = []
    lines = [line for line in lines if line]
    errors = [said.group(1) for line in lines if (said := re.match(r"parley[\w -]*: error: (.*)", line))]
    return (errors or lines or [f"exited with status {code}"])[-1]
