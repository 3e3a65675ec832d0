"""The environment a run's bit-exact reproduction depends on (ftkit.devices.describe: device kind and model, CPU
thread count, torch and CUDA versions). Checkpoints and traces record it; resuming or replaying in a different one
is refused by name unless the user accepts close but not identical results (`--allow-inexact`)."""

from __future__ import annotations

from contextlib import contextmanager

import torch

from ftkit.devices import CPU, describe
from ftkit.errors import UserError

COMPARED = ("device", "name", "threads", "torch", "cuda")


def environment(device: torch.device = CPU) -> dict:
    return describe(device)


def check_environment(saved: dict | None, what: str, allow_inexact: bool, device: torch.device = CPU,
                      ignore: tuple[str, ...] = ()) -> None:
    """Refuse to continue `what` when the environment it was recorded in differs from this one (in the keys that
    matter to it: `ignore` names those that do not)."""
    if not saved or allow_inexact:
        return
    current = describe(device)
    for key in (k for k in COMPARED if k not in ignore):
        if saved.get(key) != current.get(key) and (key in saved or key in current):
            raise UserError(f"{what}: it ran with {key} {saved.get(key, 'unrecorded')} and this process has "
                            f"{current.get(key, 'none')}; use the same {key} (train.threads, train.device), or pass "
                            f"--allow-inexact to accept close but not identical results")


@contextmanager
def using_threads(threads: int | None):
    """torch's intra-op thread count set to `threads` (None: left as it is) for a run, and restored after it."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
