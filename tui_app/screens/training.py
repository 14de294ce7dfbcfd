"""The training dashboard: preference data, runs with live curves, runs to start or cancel."""
from textual import on
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import Screen
from textual.widgets import Footer, Header, Input, Label, ListItem, ListView, Static


class TrainingScreen(Screen):
    """Preference data at a glance, every training run with live curves, and runs to start or cancel.
    A run is a separate `parley train ...` process: the app only reads what it writes to the store."""

    BINDINGS = [Binding("escape", "app.pop_screen", "Back"), Binding("f8", "cancel_run", "Cancel run")]
    DEFAULT_CSS = """
    #counts { height: auto; color: $text-muted; }
    #runs { height: 1fr; }
    #curves { height: auto; }
    .curve { height: 3; }
    """

    def __init__(self):
        super().__init__()
        self.selected: str | None = None
        self.processes: dict[str, object] = {}

    def compose(self):
        yield Header()
        yield Static("", id="counts", markup=False)
        yield ListView(id="runs")
        yield Vertical(id="curves")
        yield Input(placeholder="start: train sft --model default --max-steps 100 --out DIR (any `parley train` "
                                "arguments)", id="start-run")
        yield Footer()

    async def on_mount(self) -> None:
        await self.refresh_runs()
        self.set_interval(1.0, self.refresh_runs)

    async def refresh_runs(self) -> None:
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
        return (f"{run['kind']:<9}{run['status']:<10}step {steps}/{total}  {shown}  "
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
        log = open(self.app.store.path.parent / "last-run.log", "w")
        process = subprocess.Popen([sys.executable, "-m", "tui_app", *args], stdout=log, stderr=log,
                                   stdin=subprocess.DEVNULL)
        self.processes[str(process.pid)] = process
        event.input.value = ""
        self.app.notify(f"started {' '.join(args[:2])} (pid {process.pid}); its output is in last-run.log")

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
            self.app.notify(f"cancelling run {run['id']}")
        except ProcessLookupError:
            self.app.store.end_run(run["id"], "failed", error="the process was gone")
