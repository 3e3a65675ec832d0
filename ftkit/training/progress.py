"""Progress: a live rich bar (step/total, loss, steps/s, ETA) on a terminal, plain lines elsewhere."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)


class TrainProgress:
    def __init__(self, console: Console, total: int, start: int, log_every: int):
        self.console, self.total, self.log_every = console, total, log_every
        self.start_step, self.start_time = start, time.perf_counter()
        self.bar = None
        if console.is_terminal:
            self.bar = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[rate]} steps/s"),
                TextColumn("ETA"), TimeRemainingColumn(), console=console, transient=False,
            )
            self.task = self.bar.add_task("train", total=total, completed=start, loss="-", rate="-")
            self.bar.start()

    def update(self, step: int, loss: float) -> None:
        elapsed = time.perf_counter() - self.start_time
        rate = (step - self.start_step) / elapsed if elapsed > 0 else 0.0
        if self.bar is not None:
            self.bar.update(self.task, completed=step, loss=f"{loss:.4f}", rate=f"{rate:.2f}")
        elif step % self.log_every == 0 or step == self.total:
            eta = (self.total - step) / rate if rate > 0 else float("nan")
            self.console.print(f"step {step}/{self.total}  loss {loss:.4f}  {rate:.2f} steps/s  ETA {eta:.0f}s")

    def message(self, text: str) -> None:
        self.console.print(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
