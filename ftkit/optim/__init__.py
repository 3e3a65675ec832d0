"""Optimizers, declared in `OPTIMIZERS` (torch-free; see ftkit.components.Optimizer). A built method has
`step(batch, lr) -> metrics`, `state_dict()`, `load_state_dict()`, and `begin(run_dir, resume_step)` / `end()`
around a run; the loop knows nothing else of it."""

from ftkit.components import Registry
from ftkit.optim.config import ADAMW, MEZO, QUZO, SGD

OPTIMIZERS: Registry = Registry("method.optimizer", [ADAMW, SGD, MEZO, QUZO])
