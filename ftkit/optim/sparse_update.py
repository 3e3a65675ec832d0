"""The stochastically rounded update of integer-coded layers along random signs, drawn as the few moves it makes.

With random-sign directions, one query and no weight decay, the update of a code c in group g (scale s_g) is
c + coef * u_i / s_g with u_i = +-1: every code of a group moves by the same fraction p_g = |coef| / s_g of a grid
step, in the direction sign(coef) * u_i. Stochastic rounding onto the integer grid moves it one whole step that way
with probability p_g and leaves it otherwise (then clamps to the grid's range). At the rates zeroth-order training
uses p_g is about 1e-4, so a step moves about one code in ten thousand.

Drawing one uniform number per code (`QuantTarget`'s general path) spends the step on numbers that mostly decide
"stay". Here the same distribution, independent Bernoulli(p_g) moves per code, is drawn group by group: each
group's number of moves k_g ~ Binomial(group size, p_g) by inverting its distribution function at one uniform
(float64 from 31 bits, so probabilities far below the general path's 2^-15 resolution keep their value instead of
rounding to a multiple of 2^-15), then which k_g of the group's codes move, uniformly without replacement. Only the
moved codes are read and rewritten, and of the direction only its words are drawn, not its values.

All the layers of a step are drawn together (a few dozen tensor operations in all, not per layer), each from
streams of its own: the same numbers whichever layers are updated beside it.
"""

from __future__ import annotations

import torch

from ftkit.optim.zo_streams import (
    SIGNS_PER_WORD,
    UPDATE,
    UPDATE_PLACES,
    U,
    derive,
    sign_at,
    stream_words,
    tensor_sign_words,
    words_to_uniform64,
)
from ftkit.quant.codecs import IntCodec
from ftkit.quant.linear import step_codes_of

# Drawn as moves only while no group expects more than this many: beyond it most codes move anyway (a uniform per
# code costs no more), and P(K = 0) = (1 - p)^n of a wide per-channel group would underflow.
MOST_MOVES_PER_GROUP = 16


def applies(layer, rounding: str, coefs: list[float], decay: float) -> bool:
    """Whether an update along random signs (the only directions that ask) is one on an integer grid, one query
    and no decay, each move under a grid step and few per group: the case drawn here (everything else takes the
    general path)."""
    if len(coefs) != 1 or decay or not isinstance(layer.codec, IntCodec):
        return False
    largest = abs(coefs[0]) / smallest_scale(layer)
    if rounding == "nearest":
        return largest < 0.5  # under half a step nothing moves
    return largest < 1.0 and largest * (layer.group_size or layer.in_features) <= MOST_MOVES_PER_GROUP


def smallest_scale(layer) -> float:
    """The layer's smallest scale, kept until its scales change (QuZO moves codes, never scales): read once, not at
    every step, so a GPU step does not wait on the device once per layer to decide its path."""
    key = (layer.scales._version, layer.scales.data_ptr())
    cached = getattr(layer, "_smallest_scale", None)
    if cached is None or cached[0] != key:
        cached = (key, layer.scales.to(torch.float64).abs().min().item())  # Q4_0's may be negative
        layer._smallest_scale = cached
    return cached[1]


@torch.no_grad()
def update(layers: list, rounding: str, step_seed: int, query_seed: int, coef: float,
           words: list[torch.Tensor | None] | None = None) -> None:
    """Apply the update of `applies` to each (layer, tensor index) of `layers`: with nearest rounding every code
    stays (each move is under half a step); with stochastic rounding, the moves of `moves`. `words`: each layer's
    sign words where the step kept them (None: drawn)."""
    if rounding == "nearest" or coef == 0.0 or not layers:
        return
    moved = [(layer, positions, steps) for (layer, _), (positions, steps)
             in zip(layers, moves(layers, step_seed, query_seed, coef, words)) if positions.numel()]
    if moved:
        step_codes_of(*(list(column) for column in zip(*moved)))


def moves(layers: list, step_seed: int, query_seed: int, coef: float,
          words: list[torch.Tensor | None] | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """For each (layer, tensor index): (flat positions row * K + column, steps of +-1) of the codes it moves."""
    device = layers[0][0].codes.device
    sizes = [layer.group_size or layer.in_features for layer, _ in layers]
    chance = torch.cat([layer.scales.to(torch.float64).reshape(-1) for layer, _ in layers]).abs_().reciprocal_().mul_(
        abs(coef))  # p_g of every group of every layer, layer after layer, rows in order (Q4_0's scales may be < 0)
    groups_of = [layer.scales.numel() for layer, _ in layers]
    size = _per_group(sizes, groups_of, device)
    u = torch.cat(stream_words([(g, derive(step_seed, i, UPDATE)) for g, (_, i) in zip(groups_of, layers)], device))
    counts = binomial_counts(chance, size, words_to_uniform64(u))
    per_layer = counts.split(groups_of)
    moving = [c.nonzero().squeeze(1) for c in per_layer]  # each layer's moving groups
    places = places_within(layers, sizes, moving, per_layer, step_seed, device)
    numels = [layer.out_features * layer.in_features for layer, _ in layers]
    words = _sign_words(numels, [derive(query_seed, i, U) for _, i in layers], device, words)
    direction = 1 if coef > 0 else -1
    result = []
    for (layer, _), groups, layer_counts, layer_places, layer_words, group_size in zip(
            layers, moving, counts.split(groups_of), places, words, sizes):
        moved = groups.repeat_interleave(layer_counts[groups])
        positions = moved * group_size + layer_places
        steps = sign_at(layer_words, positions).mul_(direction)
        result.append((positions, _against_negative_scales(steps, layer, moved)))
    return result


def _against_negative_scales(steps: torch.Tensor, layer, groups: torch.Tensor) -> torch.Tensor:
    """A step in weight space is the opposite step in codes where the group's scale is negative (Q4_0)."""
    return torch.where(layer.scales.reshape(-1)[groups] < 0, -steps, steps)


def _per_group(sizes: list[int], groups_of: list[int], device) -> int | torch.Tensor:
    """The group size of every group: one number when all layers share it."""
    if len(set(sizes)) == 1:
        return sizes[0]
    return torch.repeat_interleave(torch.tensor(sizes, device=device), torch.tensor(groups_of, device=device))


def _sign_words(numels: list[int], seeds: list[int], device, kept: list | None) -> list[torch.Tensor]:
    """The words of each tensor's random signs (ftkit.optim.zo_streams.signs): the `kept` ones, the others drawn
    (on the CPU all by the pool at once)."""
    kept = kept or [None] * len(numels)
    missing = [j for j, words in enumerate(kept) if words is None]
    if torch.device(device).type == "cpu":
        drawn = stream_words([(-(-numels[j] // SIGNS_PER_WORD), seeds[j]) for j in missing])
    else:
        drawn = [tensor_sign_words(numels[j], seeds[j], device) for j in missing]
    words = list(kept)
    for j, w in zip(missing, drawn):
        words[j] = w
    return words


def binomial_counts(p: torch.Tensor, n: int | torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """k ~ Binomial(n, p) per element (int64; n one number or one per element), the inverse of its distribution
    function at u: the number of k' < n with P(K <= k') <= u. Exact but for float64 rounding; p in [0, 1)."""
    n = torch.as_tensor(n, dtype=torch.float64, device=p.device).expand_as(p)
    counts = torch.zeros_like(p, dtype=torch.int64)
    # K >= 1 where u >= P(K = 0) = (1 - p)^n, which is at least 1 - n p: only elements with u above that bound (a
    # few per cent of groups at QuZO's rates; the margin covers its rounding) need the exact test.
    rest = (u >= 1 - n * p - 1e-12).nonzero().squeeze(1)
    pmf = torch.exp(n[rest] * torch.log1p(-p[rest]))  # P(K = 0)
    more = u[rest] >= pmf
    rest, pmf = rest[more], pmf[more]  # the elements with K >= 1
    cdf, u_rest, odds, n_rest = pmf, u[rest], p[rest] / (1 - p[rest]), n[rest]
    k = 0
    while rest.numel():
        k += 1
        counts[rest] += 1
        pmf = pmf * ((n_rest - k + 1) / k) * odds  # P(K = k)
        cdf = cdf + pmf
        more = (u_rest >= cdf) & (n_rest > k)
        rest, cdf, pmf, u_rest, odds, n_rest = rest[more], cdf[more], pmf[more], u_rest[more], odds[more], n_rest[more]
    return counts


def places_within(layers: list, sizes: list[int], moving: list[torch.Tensor], counts: list[torch.Tensor],
                  step_seed: int, device) -> list[torch.Tensor]:
    """Which codes of each moving group move: counts distinct places in 0..size - 1, uniformly, the places of the
    smallest of `size` random keys of the group (ties broken by place), group after group. Each layer draws its
    keys from a stream of its own; the layers of one group size are sorted together."""
    requests = [(groups.numel() * size, derive(step_seed, i, UPDATE_PLACES))
                for groups, size, (_, i) in zip(moving, sizes, layers)]
    keys = stream_words(requests, device)
    places: list = [None] * len(layers)
    for size in set(sizes):
        members = [j for j, s in enumerate(sizes) if s == size]
        order = torch.cat([keys[j].view(-1, size) for j in members]).argsort(dim=1, stable=True)
        wanted = torch.cat([counts[j][moving[j]] for j in members])
        taken = order[torch.arange(size, device=device) < wanted.unsqueeze(1)]
        for j, part in zip(members, taken.split([int(counts[j][moving[j]].sum()) for j in members])):
            places[j] = part
    return places
