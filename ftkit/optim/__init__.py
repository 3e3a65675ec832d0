"""Optimizers. Each builder takes (model, recipe) and returns a method object with `step(batch, lr) -> metrics`,
`state_dict()`, `load_state_dict()`, and `begin(run_dir, resume_step)` / `end()` around a run; the loop knows
nothing else of it."""

from ftkit.optim.first_order import build_adamw, build_sgd
from ftkit.optim.zo import build_mezo, build_quzo

# name -> builder(model, Recipe)
OPTIMIZERS = {"adamw": build_adamw, "sgd": build_sgd, "mezo": build_mezo, "quzo": build_quzo}
