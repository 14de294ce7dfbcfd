"""A training run's metrics as the dashboard's plots: one plot per family of metrics (loss, reward,
KL, accuracy, the rest), each metric a line over the steps, and a second run's lines on the same axes."""
from textual_plotext import PlotextPlot

FAMILIES = ("loss", "reward", "kl", "accuracy", "other")


def family(name: str) -> str:
    """The plot a metric goes on, by its name: every trainer's held-out twin (eval_loss,
    heldout_kl, eval_reward_accuracy) shares the plot of what it measures."""
    if name.endswith("loss"):
        return "loss"
    if "accuracy" in name:   # before reward: reward_accuracy is an accuracy, on [0, 1]
        return "accuracy"
    if "kl" in name.split("_"):
        return "kl"
    if "reward" in name or "margin" in name:
        return "reward"
    return "other"


def series(metrics: list[dict]) -> dict[str, dict[str, tuple[list[int], list[float]]]]:
    """{family: {metric: (steps, values)}} from the store's metrics rows, in step order."""
    out: dict[str, dict[str, tuple[list[int], list[float]]]] = {}
    for m in sorted(metrics, key=lambda m: m["step"]):
        steps, values = out.setdefault(family(m["name"]), {}).setdefault(m["name"], ([], []))
        steps.append(m["step"])
        values.append(m["value"])
    return out


def run_label(run: dict) -> str:
    """A run as a legend names it: its kind and what it writes."""
    out = run["output_model"] or run["config"].get("out") or run["id"]
    return f"{run['kind']} {str(out).rstrip('/').rsplit('/', 1)[-1]}"


class RunPlot(PlotextPlot):
    """One family's curves of one run, or of two overlaid (each line's legend names its run)."""

    def draw(self, family_name: str, runs: list[tuple[str, list[dict]]]) -> list[str]:
        """Plot `family_name` of each (label, metrics) run; returns the legend entries drawn."""
        plt = self.plt
        plt.clear_figure()
        drawn = []
        for label, metrics in runs:
            for name, (steps, values) in series(metrics).get(family_name, {}).items():
                entry = f"{name} · {label}" if len(runs) > 1 else name
                # plotext draws one point as nothing: a single step shows as a marker
                if len(steps) == 1:
                    plt.scatter(steps, values, label=entry)
                else:
                    plt.plot(steps, values, label=entry)
                drawn.append(entry)
        plt.title(family_name if drawn else f"no {family_name} metrics yet")
        plt.xlabel("step")
        plt.ylabel(family_name)
        self.refresh()
        return drawn
