"""Progress: a live rich bar (step/total, loss, steps/s, ETA) on a terminal, plain lines elsewhere; for training and
for a long evaluation."""

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


class EvalProgress:
    """Batches scored out of the total, with an ETA, for an evaluation that lasts: nothing for the first `delay`
    seconds (a quick split, the tests), then a live bar on a terminal, or elsewhere a line every `every` seconds.
    Called with (done, total) after each batch (ftkit.eval.evaluate)."""

    def __init__(self, console: Console, label: str, delay: float = 3.0, every: float = 30.0,
                 clock=time.perf_counter):
        self.console, self.label, self.delay, self.every, self.clock = console, label, delay, every, clock
        self.start = self.printed = clock()
        self.bar = None

    def __call__(self, done: int, total: int) -> None:
        now = self.clock()
        elapsed = now - self.start
        if elapsed < self.delay or done >= total and self.bar is None:
            return
        if self.console.is_terminal:
            if self.bar is None:
                self.bar = Progress(TextColumn(f"[bold]{self.label}"), BarColumn(), MofNCompleteColumn(),
                                    TextColumn("batches  ETA"), TimeRemainingColumn(), console=self.console)
                self.task = self.bar.add_task(self.label, total=total)
                self.bar.start()
            self.bar.update(self.task, completed=done)
        elif now - self.printed >= self.every:
            self.printed = now
            eta = elapsed / done * (total - done) if done else float("nan")
            self.console.print(f"{self.label}: {done}/{total} batches  {elapsed:.0f}s  ETA {eta:.0f}s")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
