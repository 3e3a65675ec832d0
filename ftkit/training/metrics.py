"""Metric sinks: metrics.jsonl always (one JSON object per event), TensorBoard when asked and installed."""

from __future__ import annotations

import json
import math
from pathlib import Path

from ftkit.safe_files import open_file, read_bytes, write_atomic


class MetricsLog:
    def __init__(self, run_dir: Path, tensorboard: bool = False):
        self.path = run_dir / "metrics.jsonl"
        self.handle = open_file(self.path, "ab")
        self.writer = _tensorboard_writer(run_dir) if tensorboard else None

    def write(self, event: dict) -> None:
        self.handle.write((to_json(event) + "\n").encode("utf-8"))
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


def to_json(data, indent: int | None = None) -> str:
    """JSON that every parser reads: a NaN or infinite number (a diverged loss) is written as null."""
    return json.dumps(_finite(data), indent=indent, allow_nan=False)


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def truncate_after(path: Path, step: int) -> None:
    """Drop events logged after `step`: a resumed run rewrites them, so the file reads as one uninterrupted run."""
    try:
        text = read_bytes(path).decode("utf-8", errors="replace")
    except FileNotFoundError:
        return
    kept = []
    for line in text.splitlines():
        try:
            event = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by the crash
            continue
        if isinstance(event, dict) and isinstance(event.get("step", 0), int) and event.get("step", 0) <= step:
            kept.append(line)
    write_atomic(path, "".join(line + "\n" for line in kept))


def read_events(path: Path) -> list[dict]:
    """The events in `path`; a line cut short (a run killed while writing it) is left out."""
    events = []
    for line in read_bytes(path).decode("utf-8", errors="replace").splitlines():
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(event, dict):
            events.append(event)
    return events


def _tensorboard_writer(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        import warnings

        warnings.warn("train.tensorboard is on but tensorboard is not installed (pip install tensorboard); "
                      "metrics go to metrics.jsonl only", stacklevel=2)
        return None
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"))
