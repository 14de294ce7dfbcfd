"""The training dashboard: preference data, runs with live plots (a second run overlaid), runs to
start or cancel, and "train on my rankings"."""
from textual import on
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import Footer, Header, Input, Label, ListItem, ListView, Static

from engine.terminal import printable
from tui_app.curves import FAMILIES, RunPlot, run_label, series
from tui_app.runs import launch, why_it_failed


class TrainingScreen(Screen):
    """Preference data at a glance, every training run with live curves, and runs to start or cancel.
    A run is a separate `parley train ...` process: the app only reads what it writes to the store."""

    BINDINGS = [Binding("escape", "app.pop_screen", "Back", id="back"),
                Binding("f8", "cancel_run", "Cancel run", id="cancel_run"),
                Binding("f6", "next_family", "Metric", id="next_family"),
                Binding("f7", "overlay", "Overlay run", id="overlay"),
                Binding("f9", "train_dpo", "Train on my rankings", id="train_dpo"),
                Binding("f10", "train_rm", "Reward model on my rankings", id="train_rm")]
    DEFAULT_CSS = """
    #counts { height: auto; color: $text-muted; }
    #runs { height: 1fr; max-height: 12; }
    #curve-note { height: auto; color: $text-muted; }
    #curve-plot { height: 2fr; min-height: 12; }
    #run-error { display: none; height: auto; color: $error; }
    """

    def __init__(self):
        super().__init__()
        self.selected: str | None = None
        self.processes: dict[int, tuple] = {}   # pid: (process, its log, its arguments), until it ends
        self.cancelled: set[int] = set()
        self.family = FAMILIES[0]            # the metric family plotted (F6 cycles)
        self.overlay: str | None = None      # a second run whose curves share the axes (F7)

    def compose(self):
        yield Header()
        yield Static("", id="counts", markup=False)
        yield ListView(id="runs")
        yield Static("", id="curve-note", markup=False)
        yield RunPlot(id="curve-plot")
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
        """The selected run's curves of the chosen family, with the overlaid run's on the same axes;
        the note says each metric's latest value and which families the run has."""
        store = self.app.store
        ids = [run_id] + ([self.overlay] if self.overlay and self.overlay != run_id else [])
        shown = [(rid, store.metrics(rid)) for rid in ids]
        runs = [(run_label(store.run(rid)), metrics) for rid, metrics in shown]
        self.query_one(RunPlot).draw(self.family, runs)
        families = series(shown[0][1])
        latest = "  ".join(f"{name} {values[-1]:.4g} (from {values[0]:.4g})"
                           for name, (_, values) in families.get(self.family, {}).items())
        others = ", ".join(f for f in FAMILIES if f in families and f != self.family)
        if len(runs) > 1:
            overlay = f" · overlaid: {runs[1][0]} (F7 on it again removes it)"
        elif self.overlay == run_id:
            overlay = " · overlay set: pick another run to see both (F7 again removes it)"
        else:
            overlay = " · F7 overlays the selected run on the next one picked"
        self.query_one("#curve-note", Static).update(
            f"{self.family}: {latest or 'nothing logged yet'}{' · also ' + others + ' (F6)' if others else ''}"
            f"{overlay}")

    async def action_next_family(self) -> None:
        self.family = FAMILIES[(FAMILIES.index(self.family) + 1) % len(FAMILIES)]
        if self.selected:
            await self.show_curves(self.selected)

    async def action_overlay(self) -> None:
        """The selected run becomes the overlay, drawn with every run picked after it; F7 on the
        overlay run itself removes it."""
        if not self.selected:
            return
        self.overlay = None if self.overlay == self.selected else self.selected
        self.app.notify("overlay removed" if self.overlay is None else
                        "overlaid: pick another run to see both on the same axes")
        await self.show_curves(self.selected)

    def action_train_dpo(self) -> None:
        """DPO of the chat model on the store's preference pairs; compare opens when it is done."""
        from tui_app.rounds import train_on_my_rankings
        train_on_my_rankings(self.app, "dpo")

    def action_train_rm(self) -> None:
        from tui_app.rounds import train_on_my_rankings
        train_on_my_rankings(self.app, "rm")

    @on(ListView.Highlighted, "#runs")
    async def run_highlighted(self, event: ListView.Highlighted) -> None:
        if event.item is not None and event.item.name != self.selected:
            self.selected = event.item.name
            await self.show_curves(self.selected)

    @on(Input.Submitted, "#start-run")
    def start_run(self, event: Input.Submitted) -> None:
        import shlex
        args = shlex.split(event.value)
        if not args or args[0] != "train":
            self.app.notify("a run starts with `train`, e.g. train sft --model default --out my-model",
                            severity="error")
            return
        process, log_path = launch(self.app.store.path.parent, args)
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
