"""Learning-rate schedules: a pure function of the step, so resuming needs no scheduler state."""

from __future__ import annotations

import math

from ftkit.recipe.schema import TrainSpec


def learning_rate(step: int, train: TrainSpec) -> float:
    """The rate for step `step` (0-based): linear warm-up, then constant, linear or cosine decay to zero."""
    if step < train.warmup_steps:
        return train.lr * (step + 1) / train.warmup_steps
    decay_steps = max(1, train.max_steps - train.warmup_steps)
    progress = min(1.0, (step - train.warmup_steps) / decay_steps)
    return train.lr * SCHEDULES[train.schedule](progress)


SCHEDULES = {
    "constant": lambda progress: 1.0,
    "linear": lambda progress: 1.0 - progress,
    "cosine": lambda progress: 0.5 * (1.0 + math.cos(math.pi * progress)),
}
