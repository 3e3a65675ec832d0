"""Central differences (MeZO, QuZO, SPSA): per query, L+ = L(w + eps u1) and L- = L(w - eps u1),
g = (L+ - L-) / (2 eps); the update is -lr / n sum_i g_i u2_i. Two forward passes per query."""

from __future__ import annotations

from ftkit.optim.estimators import EstimatorKind


class Central(EstimatorKind):
    name = "central"

    def forwards(self, n_queries: int) -> int:
        return 2 * n_queries

    def visit(self, query_seeds, eps, evaluate, move):
        local = []
        for i, seed in enumerate(query_seeds):
            move(seed, 0.0, eps)
            local += evaluate(i) if evaluate else []
            move(seed, eps, -eps)
            local += evaluate(i) if evaluate else []
            if i < len(query_seeds) - 1:
                move(seed, -eps, 0.0)  # the last query's restore is folded into the update
        return local, -eps

    def estimate(self, losses, eps, n_queries):
        pairs = [(losses[2 * i], losses[2 * i + 1]) for i in range(n_queries)]
        return [(plus - minus) / (2 * eps) for plus, minus in pairs], [(plus + minus) / 2 for plus, minus in pairs]

    def coefficients(self, gradients, rate):
        return [-rate * g / len(gradients) for g in gradients]


CENTRAL = Central()
