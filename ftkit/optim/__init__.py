"""Optimizers, declared in `OPTIMIZERS` (torch-free; see ftkit.components.Optimizer). A built method has
`step(batch, lr) -> metrics`, `state_dict()`, `load_state_dict()`, and `begin(run_dir, resume_step)` / `end()`
around a run; the loop knows nothing else of it.

`MeZO` and `QuZO` are the same zeroth-order methods as PyTorch optimizers (`step(closure)`) for training scripts of
your own (ftkit.optim.optimizers); they are imported, with torch, when first used. Zeroth-order optimizers are set
apart by the rules they declare (`Optimizer.zeroth_order`), draw directions of a kind in `DIRECTIONS` and combine
their losses by an estimator in `ESTIMATORS` (docs/components.md: adding a zeroth-order estimator)."""

from ftkit.components import Hook, Registry
from ftkit.optim.config import ADAMW, DIRECTIONS, ESTIMATORS, MEZO, QUZO, SGD

OPTIMIZERS: Registry = Registry("method.optimizer", [ADAMW, SGD, MEZO, QUZO])
__all__ = ["OPTIMIZERS", "DIRECTIONS", "ESTIMATORS"]  # and, lazily, MeZO, QuZO, ZerothOrderOptimizer


LAZY = {name: Hook(f"ftkit.optim.optimizers:{name}") for name in ("MeZO", "QuZO", "ZerothOrderOptimizer")}


def __getattr__(name: str):
    if name in LAZY:
        return LAZY[name].resolve()
    raise AttributeError(f"module 'ftkit.optim' has no attribute {name!r}")
