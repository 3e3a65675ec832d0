"""Batched one-sided estimates (FZOO, Dang et al. 2025, arXiv 2506.09034): per step, L0 = L(w) once and, for each
of the N queries, L_i = L(w + eps u1_i); g_i = (L_i - L0) / eps. The update divides by the spread of the estimates,

    w <- w - lr / N  sum_i (g_i / sigma) u2_i,      sigma = std(g_1 .. g_N)  (sample standard deviation, N - 1)

sigma = std(L_1 .. L_N) / eps, so this is FZOO's step with its loss deviation: a normalised step whose size is
about lr per element whatever the loss's scale, large where the loss is flat and small where it is steep (Adam-like).
N + 1 forward passes a step instead of central differences' 2N. With sigma = 0 (every perturbed loss the same, e.g.
eps below the loss's resolution) there is no signal to normalise: the step makes no move along the directions
(coefficients 0; decoupled weight decay and momentum still apply).

FZOO evaluates the N perturbed losses as one batched forward on a GPU. Here they are evaluated one after another,
through the same `evaluate` as every estimator: with dense perturbations each member of such a batch needs its own
weights, so on a CPU a batch of N costs about N forwards anyway. A low-rank direction kind, whose perturbation is a
cheap correction to a layer's output, is what would make the batch dimension cheap.
"""

from __future__ import annotations

import math

from ftkit.optim.estimators import EstimatorKind


class OneSided(EstimatorKind):
    name = "one_sided"

    def forwards(self, n_queries: int) -> int:
        return n_queries + 1

    def visit(self, query_seeds, eps, evaluate, move):
        local = list(evaluate(None)) if evaluate else []
        for i, seed in enumerate(query_seeds):
            move(seed, 0.0, eps)
            local += evaluate(i) if evaluate else []
            if i < len(query_seeds) - 1:
                move(seed, eps, 0.0)  # the last query's restore is folded into the update
        return local, eps

    def estimate(self, losses, eps, n_queries):
        base = losses[0]
        return [(loss - base) / eps for loss in losses[1: n_queries + 1]], [base]

    def coefficients(self, gradients, rate):
        sigma = deviation(gradients)
        if sigma == 0.0:
            return [0.0] * len(gradients)
        return [-rate * (g / sigma) / len(gradients) for g in gradients]


def deviation(values: list[float]) -> float:
    """The sample standard deviation, in a fixed order of float64 operations (every process and a replay agree)."""
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


ONE_SIDED = OneSided()
