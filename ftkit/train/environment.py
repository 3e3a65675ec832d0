"""What bit-exact reproduction depends on besides the recipe: the device kind, the CPU thread count (float sums
are split across threads) and the torch version. Checkpoints record it; a resume on a different one is refused by
name unless the user accepts close but not identical results (`--allow-inexact`)."""

from __future__ import annotations

from contextlib import contextmanager

import torch

from ftkit.errors import UserError


def environment() -> dict:
    return {"device": "cpu", "threads": torch.get_num_threads(), "torch": torch.__version__}


def check_environment(saved: dict | None, what: str, allow_inexact: bool) -> None:
    """Refuse to continue `what` when the environment it was recorded in differs from this one."""
    if not saved or allow_inexact:
        return
    current = environment()
    for key in ("device", "threads", "torch"):
        if key in saved and saved[key] != current[key]:
            raise UserError(f"{what}: it ran with {key} {saved[key]} and this process has {current[key]}; set "
                            f"train.threads or use the same machine, or pass --allow-inexact to accept close but not "
                            f"identical results")


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
