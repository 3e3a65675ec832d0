"""Curves of one or more runs from their metrics.jsonl: train loss and the dev metric, against step and against
wall time, overlaid with the runs' recipe names. Written as a PNG (matplotlib's Agg backend, no display)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ftkit.errors import UserError
from ftkit.training.metrics import read_events


@dataclass
class Curves:
    label: str
    metric: str
    train_steps: list[int]
    train_loss: list[float]
    train_time: list[float]  # empty for runs logged before elapsed times were recorded
    dev_steps: list[int]
    dev_metric: list[float]
    dev_time: list[float]


def read_curves(run_dir: Path, label: str | None = None) -> Curves:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{run_dir} is not a run directory (no metrics.jsonl)")
    events = read_events(path)
    metric = _metric(run_dir, events)
    train = [e for e in events if e["split"] == "train"]
    dev = [e for e in events if e["split"] == "dev" and metric in e]
    if not train and not dev:
        raise UserError(f"{path} has no train or dev events yet")
    timed = all("elapsed" in e for e in train + dev[1:])  # the step-0 evaluation precedes the clock
    return Curves(
        label=label or _recipe_name(run_dir), metric=metric,
        train_steps=[e["step"] for e in train], train_loss=[e["loss"] for e in train],
        train_time=[e["elapsed"] for e in train] if timed else [],
        dev_steps=[e["step"] for e in dev], dev_metric=[e[metric] for e in dev],
        dev_time=[e.get("elapsed", 0.0) for e in dev] if timed else [],
    )


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing mean over `window` points (zeroth-order losses are noisy step to step)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_runs(run_dirs: list[Path], out: Path, labels: list[str] | None = None, title: str | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = [read_curves(d, label) for d, label in zip(run_dirs, labels or [None] * len(run_dirs))]
    timed = all(c.train_time for c in curves)
    rows = 2 if timed else 1
    fig, axes = plt.subplots(rows, 2, figsize=(12, 4.2 * rows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, c in enumerate(curves):
        color = colors[i % len(colors)]
        window = max(1, len(c.train_loss) // 50)
        xs = [(c.train_steps, c.dev_steps, "step")] + ([(c.train_time, c.dev_time, "wall time (s)")] if timed else [])
        for row, (train_x, dev_x, name) in enumerate(xs):
            loss_ax, dev_ax = axes[row]
            loss_ax.plot(train_x, c.train_loss, color=color, alpha=0.2, linewidth=0.8)
            loss_ax.plot(train_x, smooth(c.train_loss, window), color=color, label=c.label, linewidth=1.6)
            dev_ax.plot(dev_x, c.dev_metric, color=color, marker="o", markersize=3, label=c.label, linewidth=1.6)
            loss_ax.set(xlabel=name, ylabel=f"train loss (faint: per step; bold: mean of {window})")
            dev_ax.set(xlabel=name, ylabel=f"dev {c.metric}")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    axes[0][1].legend(fontsize=8, loc="best")
    axes[0][0].legend(fontsize=8, loc="best")
    if title:
        fig.suptitle(title)
    save_png(fig, out)
    return out


def save_png(fig, out: Path, dpi: int = 110) -> None:
    """Lay out, write (creating the folder) and close a figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)


def _recipe_name(run_dir: Path) -> str:
    """A run directory is named after its recipe (runs/<recipe name>) unless train.output_dir says otherwise."""
    return run_dir.resolve().name


def _metric(run_dir: Path, events: list[dict]) -> str:
    """The task's metric, from the run's summary; else the first one its dev events carry."""
    import json

    summary = run_dir / "summary.json"
    if summary.is_file():
        return json.loads(summary.read_text())["metric"]
    for event in events:
        for name in ("accuracy", "f1", "exact_match", "macro_f1"):
            if event["split"] == "dev" and name in event:
                return name
    return "accuracy"
