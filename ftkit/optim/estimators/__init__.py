"""How a zeroth-order step spends its forward passes and turns their losses into an update (method.zo.estimator).

An estimator (`EstimatorKind`, one module each: central.py, one_sided.py; declared in ftkit.optim.ESTIMATORS) walks
the weights through the step's evaluation points, evaluating the loss at each (`visit`), turns the losses into one
projected gradient per query and the step's loss (`estimate`), and the projected gradients into the coefficients of
the update, sum_i coef_i u2_i (`coefficients`). The direction kind (gaussian, rademacher, ...), QuZO's roundings and
the targets are orthogonal to it: the estimator only says where the weights stand when the loss is evaluated, and
how the losses combine.

A trace records the projected gradients; `coefficients` is a pure function of them, so a replay (which visits the
same points without evaluating) lands on the same weights, bit for bit.
"""

from __future__ import annotations

import abc

from ftkit.components import Hook


class EstimatorKind(abc.ABC):
    """The interface of an estimator: a kind that leaves out a method cannot be built."""

    name: str = ""

    @abc.abstractmethod
    def forwards(self, n_queries: int) -> int:
        """Forward passes (loss evaluations of the whole batch) per step."""

    @abc.abstractmethod
    def visit(self, query_seeds: list[int], eps: float, evaluate, move) -> tuple[list[float], float]:
        """Walk the weights through the step's evaluation points, `evaluate(query)` at each (query None: the
        unperturbed weights; it returns a list of losses), unless `evaluate` is None (a replay).
        `move(query_seed, current, to)` moves from w + current u1 to w + to u1. Returns (the losses evaluated, in
        order; the offset at which the last query's perturbation is left, which the update folds into its
        restore)."""

    @abc.abstractmethod
    def estimate(self, losses: list[float], eps: float, n_queries: int) -> tuple[list[float], list[float]]:
        """(projected gradient per query, losses whose mean is the step's loss) from the batch losses of every
        evaluation, in the order `visit` made them."""

    @abc.abstractmethod
    def coefficients(self, gradients: list[float], rate: float) -> list[float]:
        """The coefficient of each query's direction in the update w <- w + sum_i coef_i u2_i, at learning rate
        `rate`."""


def estimator_kind(name: str) -> EstimatorKind:
    """The estimator ftkit.optim.ESTIMATORS declares as `name`."""
    from ftkit.optim import ESTIMATORS

    if name not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {', '.join(e.name for e in ESTIMATORS)}; got {name!r}")
    behaviour = ESTIMATORS[name].behaviour
    return behaviour.resolve() if isinstance(behaviour, Hook) else behaviour
