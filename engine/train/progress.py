"""The one progress display of every trainer, on stderr.

On a terminal: a Rich progress bar (Rich comes with Textual) with the step, the time left and the
latest figures, and a line kept above it at every evaluation. Elsewhere (a pipe, the app's log of
a run): plain lines at the first step, at every evaluation and at the last step, so a log stays
short and each line can be read on its own. Every figure also goes to the store (engine.train.run).
"""
import sys
import time

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn


def figures(values: dict, shown: tuple[str, ...]) -> str:
    """The values named in `shown` (those present), each as `name value`."""
    parts = []
    for name in shown:
        if name in values:
            value = values[name]
            parts.append(f"{name} {value:.4g}" if isinstance(value, float) else f"{name} {value}")
    return "  ".join(parts)


def is_evaluation(values: dict) -> bool:
    return any(name.startswith(("eval_", "heldout_")) for name in values)


class StepProgress:
    def __init__(self, total: int, start: int, shown: tuple[str, ...], stream=None):
        self.total, self.start, self.shown = total, start, shown
        self.console = Console(file=stream or sys.stderr, highlight=False)
        self.last = time.perf_counter()
        self.bar = None
        if self.console.is_terminal:
            self.bar = Progress(TextColumn("step {task.completed}/{task.total}"), BarColumn(), TimeRemainingColumn(),
                                TextColumn("{task.fields[figures]}"), console=self.console, transient=True)
            self.task = self.bar.add_task("train", total=total, completed=start, figures="")
            self.bar.start()

    def seconds_since_last(self) -> float:
        """Seconds since the last call (or the start): what a tokens-per-second figure divides by."""
        now = time.perf_counter()
        seconds, self.last = now - self.last, now
        return max(seconds, 1e-9)

    def show(self, step: int, values: dict) -> None:
        line = f"step {step}/{self.total}  {figures(values, self.shown)}"
        if self.bar is not None:
            self.bar.update(self.task, completed=step, figures=figures(values, self.shown))
            if is_evaluation(values) or step == self.total:
                self.bar.console.print(line, markup=False)
        elif is_evaluation(values) or step == self.total or step == self.start + 1:
            self.console.print(line, markup=False, soft_wrap=True)
            self.console.file.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
