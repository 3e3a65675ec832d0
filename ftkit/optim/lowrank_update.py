"""The stochastically rounded update of integer-coded layers along a low-rank direction, drawn as the few moves it
makes (the low-rank counterpart of ftkit.optim.sparse_update).

The update of code c_ij (row i, column j in group g, scale s_ig) is p_ij = coef (U V^T)_ij / s_ig grid steps, with
coef = -lr g / sqrt(r) and U, V the update's factors. At the rates zeroth-order training uses |p_ij| is far below
one, and stochastic rounding moves the code one step along sign(p_ij) with probability |p_ij|, else leaves it
(then clamps to the grid's range). Drawing that with one uniform per code spends the step on "stay"; instead, by
thinning, per (row, group):

1. a bound b_ig = |coef| sum_a |U_ia| max_{j in g} |V_ja| / s_ig >= |p_ij| for every j of the group (from the
   factors alone: m x groups x r numbers, no dense U V^T);
2. the number of candidates K_ig ~ Binomial(group size, b_ig), by inverting its distribution function at one 31-bit
   uniform in float64 (sparse_update.binomial_counts);
3. which K_ig codes of the group are candidates, uniformly without replacement (sparse_update.places_within);
4. each candidate moves with probability |p_ij| / b_ig (one more uniform, float64), along sign(p_ij).

Why this is exactly stochastic rounding, code by code. Steps 2 and 3 draw a set with the law of independent
Bernoulli(b_ig) indicators C_j over the group: the number of successes of n independent Bernoulli(b) trials is
Binomial(n, b), and given that number k every k-subset is equally likely (each has probability b^k (1 - b)^(n-k)).
Step 4 draws independent A_j ~ Bernoulli(|p_ij| / b_ig), so code j moves iff C_j A_j = 1, with probability
b_ig |p_ij| / b_ig = |p_ij|, and the pairs (C_j, A_j) are independent across codes, so the moves are independent
Bernoulli(|p_ij|): the law of stochastic rounding of c_ij + p_ij for an integer c_ij and |p_ij| < 1. Only the
candidates' codes are read and rewritten, and of U V^T only their entries are computed.

It applies to integer grids with stochastic rounding, one query, no weight decay, and bounds under one step with
few expected candidates per group (the MOST_MOVES_PER_GROUP of sparse_update); with nearest rounding and every bound
under half a step nothing moves. Everything else takes the general path (ftkit.optim.zo_targets.land).
"""

from __future__ import annotations

import torch

from ftkit.optim.sparse_update import MOST_MOVES_PER_GROUP, binomial_counts, places_within
from ftkit.optim.zo_streams import UPDATE, UPDATE_ACCEPT, derive, stream_words, words_to_uniform64
from ftkit.quant.codecs import IntCodec
from ftkit.quant.linear import step_codes_of


def bounds(layer, u: torch.Tensor, v: torch.Tensor, coef: float) -> torch.Tensor:
    """b_ig = |coef| sum_a |U_ia| max_{j in g} |V_ja| / s_ig (float64 [N, groups]): at least |p_ij| for every code
    of the group. Summed over the rank elementwise in order (the same bits at any thread count)."""
    groups = layer.scales.shape[1]
    top = v.abs().to(torch.float64).view(groups, -1, v.shape[1]).amax(dim=1)  # [groups, r]
    size = u.abs().to(torch.float64)
    out = size[:, :1] * top[:, 0]
    for a in range(1, u.shape[1]):
        out.add_(size[:, a:a + 1] * top[:, a])
    return out.mul_(abs(coef)).div_(layer.scales.to(torch.float64).abs())  # Q4_0's scales may be negative


@torch.no_grad()
def update(entries: list, rounding: str, step_seed: int, coef: float) -> list:
    """Update the layers of `entries` (layer, tensor index, U, V) this path applies to by coef U V^T, and return
    those layers (the others are left to the general path)."""
    done, drawn = [], []
    for layer, index, u, v in entries:
        if not isinstance(layer.codec, IntCodec):
            continue
        bound = bounds(layer, u, v, coef)
        largest, size = bound.max().item(), layer.group_size or layer.in_features
        if rounding == "nearest" and largest < 0.5:
            done.append(layer)  # every |p_ij| < 1/2: nothing moves
        elif rounding == "stochastic" and largest < 1.0 and largest * size <= MOST_MOVES_PER_GROUP:
            done.append(layer)
            drawn.append((layer, index, u, v, bound.view(-1)))
    if drawn and coef != 0.0:
        moved = [(layer, positions, steps) for (layer, *_), (positions, steps)
                 in zip(drawn, moves(drawn, step_seed, coef)) if positions.numel()]
        if moved:
            step_codes_of(*(list(column) for column in zip(*moved)))
    return done


def moves(drawn: list, step_seed: int, coef: float) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """For each (layer, index, U, V, bounds): (flat positions row * K + column, steps of +-1) of the codes it moves.
    All layers' counts and places are drawn together, each layer from streams of its own."""
    device = drawn[0][0].codes.device
    layers = [(layer, index) for layer, index, *_ in drawn]
    sizes = [layer.group_size or layer.in_features for layer, *_ in drawn]
    groups_of = [bound.numel() for *_, bound in drawn]
    chance = torch.cat([bound for *_, bound in drawn])
    size = torch.repeat_interleave(torch.tensor(sizes, dtype=torch.float64, device=device),
                                   torch.tensor(groups_of, device=device))
    words = torch.cat(stream_words([(g, derive(step_seed, i, UPDATE)) for g, (_, i) in zip(groups_of, layers)],
                                   device))
    counts = binomial_counts(chance, size, words_to_uniform64(words)).split(groups_of)
    moving = [c.nonzero().squeeze(1) for c in counts]
    places = places_within(layers, sizes, moving, counts, step_seed, device)
    candidates = [groups.repeat_interleave(c[groups]) for groups, c in zip(moving, counts)]
    accept = stream_words([(g.numel(), derive(step_seed, i, UPDATE_ACCEPT)) for g, (_, i) in zip(candidates, layers)],
                          device)
    result = []
    for (layer, _, u, v, bound), group, place, size, uniform in zip(drawn, candidates, places, sizes, accept):
        positions = group * size + place
        rows, cols = positions // layer.in_features, positions % layer.in_features
        picked_u, picked_v = u[rows].to(torch.float64), v[cols].to(torch.float64)
        change = picked_u[:, 0] * picked_v[:, 0]
        for a in range(1, u.shape[1]):  # elementwise in order: the same bits at any thread count
            change.add_(picked_u[:, a] * picked_v[:, a])
        change.mul_(coef)
        change.div_(layer.scales.to(torch.float64).reshape(-1)[group])
        keep = words_to_uniform64(uniform).mul_(bound[group]) < change.abs()
        result.append((positions[keep], torch.sign(change[keep]).to(torch.int16)))
    return result
