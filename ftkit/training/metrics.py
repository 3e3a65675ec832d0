"""Metric sinks: metrics.jsonl always (one JSON object per event), TensorBoard when asked and installed."""

from __future__ import annotations

import json
import os
from pathlib import Path


class MetricsLog:
    def __init__(self, run_dir: Path, tensorboard: bool = False):
        self.path = run_dir / "metrics.jsonl"
        self.handle = self.path.open("a", encoding="utf-8")
        self.writer = _tensorboard_writer(run_dir) if tensorboard else None

    def write(self, event: dict) -> None:
        self.handle.write(json.dumps(event) + "\n")
        self.handle.flush()
        if self.writer is not None:
            for key, value in event.items():
                if key not in ("step", "split") and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{event['split']}/{key}", value, event["step"])

    def close(self) -> None:
        self.handle.close()
        if self.writer is not None:
            self.writer.close()


class NullLog:
    """What processes other than process 0 log to: nothing."""

    def write(self, event: dict) -> None:
        pass

    def close(self) -> None:
        pass


def truncate_after(path: Path, step: int) -> None:
    """Drop events logged after `step`: a resumed run rewrites them, so the file reads as one uninterrupted run."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            event = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by the crash
            continue
        if event.get("step", 0) <= step:
            kept.append(line)
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)


def read_events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _tensorboard_writer(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        import warnings

        warnings.warn("train.tensorboard is on but tensorboard is not installed (pip install tensorboard); "
                      "metrics go to metrics.jsonl only", stacklevel=2)
        return None
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"))
