"""Optimizers. Each builder takes (model, recipe) and returns a method object with
`step(batch, lr) -> metrics`, `state_dict()` and `load_state_dict()`; the loop knows nothing else of it."""

from ftkit.optim.first_order import build_adamw, build_sgd

# name -> builder(model, Recipe)
OPTIMIZERS = {"adamw": build_adamw, "sgd": build_sgd}
