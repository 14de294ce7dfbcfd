"""The training dashboard: preference data, runs with live curves, runs to start or cancel."""
import re
from pathlib import Path

from textual import on
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import Screen
from textual.widgets import Footer, Header, Input, Label, ListItem, ListView, Static

from engine.terminal import printable


class TrainingScreen(Screen):
    """Preference data at a glance, every training run with live curves, and runs to start or cancel.
    A run is a separate `parley train ...` process: the app only reads what it writes to the store."""

    BINDINGS = [Binding("escape", "app.pop_screen", "Back", id="back"),
                Binding("f8", "cancel_run", "Cancel run", id="cancel_run")]
    DEFAULT_CSS = """
    #counts { height: auto; color: $text-muted; }
    #runs { height: 1fr; }
    #curves { height: auto; }
    .curve { height: 3; }
    #run-error { display: none; height: auto; color: $error; }
    """

    def __init__(self):
        super().__init__()
        self.selected: str | None = None
        self.processes: dict[int, tuple] = {}   # pid: (process, its log, its arguments), until it ends
        self.cancelled: set[int] = set()

    def compose(self):
        yield Header()
        yield Static("", id="counts", markup=False)
        yield ListView(id="runs")
        yield Vertical(id="curves")
        yield Static("", id="run-error", markup=False)
        yield Input(placeholder="start: train sft --model default --max-steps 100 --out DIR (any `parley train` "
                                "arguments)", id="start-run")
        yield Footer()

    async def on_mount(self) -> None:
        await self.refresh_runs()
        self.set_interval(1.0, self.refresh_runs)

    async def refresh_runs(self) -> None:
        self.check_processes()
        store = self.app.store
        counts = store.counts()
        self.query_one("#counts", Static).update(
            f"{counts['rankings']} rankings · {counts['preference_pairs']} preference pairs · "
            f"{counts['comparisons']} comparisons · {counts['conversations']} conversations · {counts['runs']} runs")
        view = self.query_one("#runs", ListView)
        runs = store.runs()
        rows = [(r["id"], self.run_line(r)) for r in runs]
        if [item.name for item in view.query(ListItem)] != [rid for rid, _ in rows]:
            index = view.index
            await view.clear()
            for rid, line in rows:
                await view.append(ListItem(Label(line, markup=False), name=rid))
            view.index = index if index is not None and index < len(rows) else (0 if rows else None)
        else:
            for item, (_, line) in zip(view.query(ListItem), rows):
                item.query_one(Label).update(line)
        if view.index is not None and rows:
            self.selected = rows[view.index][0]
            await self.show_curves(self.selected)

    def run_line(self, run: dict) -> str:
        metrics = self.app.store.metrics(run["id"])
        steps = max((m["step"] for m in metrics), default=0)
        total = run["config"].get("max_steps", "?")
        last = {m["name"]: m["value"] for m in metrics if m["step"] == steps}
        shown = "  ".join(f"{k} {v:.4g}" for k, v in last.items() if k in ("loss", "eval_loss", "reward", "kl"))
        return (f"{run['kind']:<9}{run['status']:<12}step {steps}/{total}  {shown}  "
                f"{run['base_model'] or ''} → {run['output_model'] or run['config'].get('out', '')}")

    async def show_curves(self, run_id: str) -> None:
        from textual.widgets import Sparkline
        series: dict[str, list[float]] = {}
        for m in self.app.store.metrics(run_id):
            if m["name"] in ("loss", "eval_loss", "reward", "kl", "accuracy"):
                series.setdefault(m["name"], []).append(m["value"])
        box = self.query_one("#curves", Vertical)
        await box.remove_children()
        for name, values in series.items():
            await box.mount(Label(f"{name}: {values[-1]:.4g} (from {values[0]:.4g})", markup=False),
                            Sparkline(values, classes="curve"))

    @on(Input.Submitted, "#start-run")
    def start_run(self, event: Input.Submitted) -> None:
        import shlex
        import subprocess
        import sys
        args = shlex.split(event.value)
        if not args or args[0] != "train":
            self.app.notify("a run starts with `train`, e.g. train sft --model default --out my-model",
                            severity="error")
            return
        import tempfile
        folder = self.app.store.path.parent
        with tempfile.NamedTemporaryFile("w", dir=folder, prefix="run-", suffix=".log", delete=False) as log:
            process = subprocess.Popen([sys.executable, "-m", "tui_app", *args], stdout=log, stderr=log,
                                       stdin=subprocess.DEVNULL)
        # named after the process only once it has one; the process writes on through the renamed file
        log_path = Path(log.name).replace(folder / f"run-{process.pid}.log")
        self.processes[process.pid] = (process, log_path, args)
        event.input.value = ""
        self.query_one("#run-error", Static).display = False
        self.app.notify(f"started {' '.join(args[:2])} (pid {process.pid}); its output is in {log_path}")

    def check_processes(self) -> None:
        """Show why a run started here failed: one that fails before it has a row (bad arguments, a
        model that is not there) leaves nothing in the store, only its log."""
        for pid, (process, log_path, args) in list(self.processes.items()):
            code = process.poll()
            if code is None:
                continue
            del self.processes[pid]
            if code == 0 or code == 130 or pid in self.cancelled:   # 130: interrupted, recorded as cancelled
                continue
            text = f"{' '.join(args[:2])} (pid {pid}) failed: {why_it_failed(log_path, code)}  (log: {log_path})"
            error = self.query_one("#run-error", Static)
            error.update(printable(text))
            error.display = True
            self.app.notify(text, title="run failed", severity="error", timeout=15)

    def action_cancel_run(self) -> None:
        import os
        import signal
        if not self.selected:
            return
        run = self.app.store.run(self.selected)
        if run["status"] != "running" or not run["pid"]:
            self.app.notify("that run is not running", severity="warning")
            return
        try:
            os.kill(run["pid"], signal.SIGTERM)   # the trainer records the run as cancelled
            self.cancelled.add(run["pid"])
            self.app.notify(f"cancelling run {run['id']}")
        except ProcessLookupError:
            self.app.store.end_run(run["id"], "failed", error="the process was gone")


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
