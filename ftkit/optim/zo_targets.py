"""What a zeroth-order step perturbs and updates, one tensor at a time.

A `FloatTarget` is a full-precision parameter (fp32/bf16 weights, biases, norms, adapters, the head): perturbed in
place, restored and updated in one fused pass. A `QuantTarget` is the codes of a `QuantLinear`: the perturbation
is applied while the layer dequantizes (the `perturbation` hook), so stored codes change only at the update, which
is rounded onto the weight grid (stochastically by default). No full-precision master copy exists.

Directions: u ~ N(0, I) per tensor from its stream; the perturbation uses u1 = Q1(u) and the update u2 = Q2(u),
two stochastic roundings onto a `perturb_bits` grid with independent random bits (MeZO: bits 0, u1 = u2 = u). With
`method.zo.direction: rademacher`, u is a vector of random signs (SPSA's directions): already on every such grid,
so u1 = u2 = u exactly and no rounding is drawn.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ftkit.optim import sparse_update, zo_streams
from ftkit.optim.zo_streams import (
    Q1,
    Q2,
    UPDATE,
    U,
    chunk_slices,
    derive,
    direction_step,
    gaussian,
    gaussian_chunks,
    quantize_direction,
    round_onto,
    sign_chunks,
    sign_words,
    signs,
    tensor_sign_words,
    uniform_chunks,
    words_to_signs,
)
from ftkit.quant.linear import QuantLinear
from ftkit.quant.scales import group_view

# Traces record that the update of random signs on integer codes is drawn as the codes it moves
# (ftkit.optim.sparse_update); traces without it drew a uniform per code, other numbers.
SIGN_UPDATE_DRAW = "moves"


@dataclass(frozen=True)
class Directions:
    """How directions are drawn and updates rounded (from method.zo)."""

    bits: int  # 0: Gaussian directions as they are (MeZO)
    independent: bool  # Q2 uses its own rounding bits (QuZO) or Q1's (the public code's variant)
    update_rounding: str  # "stochastic" or "nearest" (QuantTarget only)
    distribution: str = "gaussian"  # or "rademacher": random signs

    @property
    def rounds(self) -> bool:
        """Whether directions are rounded onto a grid: QuZO's Gaussians. Signs +-1 are on every symmetric grid
        (max|u| = 1, so u / step is the grid's largest level), where stochastic rounding returns them unchanged."""
        return self.bits > 0 and self.distribution == "gaussian"

    def _draw(self, shape, seed: int, device) -> torch.Tensor:
        return (gaussian if self.distribution == "gaussian" else signs)(shape, seed, device)

    def _draw_chunks(self, numel: int, seed: int, device, words: torch.Tensor | None = None):
        if words is not None:
            return sign_chunks(numel, seed, device, words)
        return (gaussian_chunks if self.distribution == "gaussian" else sign_chunks)(numel, seed, device)

    @property
    def streams(self) -> tuple[int, int, int]:
        """The stream ids of the perturbation's rounding, the update direction's rounding and the update's grid
        rounding, as the trace records them."""
        return Q1, Q2 if self.independent else Q1, UPDATE

    def trace_fields(self) -> dict:
        fields = {"perturb_bits": self.bits, "independent_roundings": self.independent,
                  "update_rounding": self.update_rounding, "direction": self.distribution}
        if self.distribution == "rademacher":  # how updates of random signs on integer codes are drawn: replay checks
            fields["sign_update_draw"] = SIGN_UPDATE_DRAW
        return fields

    def perturbation(self, query_seed: int, index: int, shape, device) -> torch.Tensor:
        u = self._draw(shape, derive(query_seed, index, U), device)
        return quantize_direction(u, self.bits, derive(query_seed, index, Q1)) if self.rounds else u

    def both(self, query_seed: int, index: int, shape, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(u1, u2) from one draw of u."""
        u = self._draw(shape, derive(query_seed, index, U), device)
        if not self.rounds:
            return u, u
        u1 = quantize_direction(u.clone(), self.bits, derive(query_seed, index, Q1))
        if not self.independent:
            return u1, u1
        return u1, quantize_direction(u, self.bits, derive(query_seed, index, Q2))

    def update_direction(self, query_seed: int, index: int, shape, device) -> torch.Tensor:
        u = self._draw(shape, derive(query_seed, index, U), device)
        return quantize_direction(u, self.bits, derive(query_seed, index, self.update_stream)) if self.rounds else u

    @property
    def update_stream(self) -> int:
        return Q2 if self.independent else Q1

    def chunks(self, query_seed: int, index: int, numel: int, device, streams: tuple[int, ...],
               words: torch.Tensor | None = None):
        """The directions of `streams` (Q1, Q2) for a tensor of `numel` elements, a chunk at a time: (slice, [u_s
        over the slice]), each u_s the one `perturbation` / `update_direction` / `both` give, flattened. What a
        chunk holds exists once (16 MiB), not the whole tensor's direction; the grid of a rounded direction needs
        max|u| first, so a tensor of several chunks draws its Gaussian twice. `words`: its signs' random words,
        drawn ahead (`with_sign_words`)."""
        u_seed, slices = derive(query_seed, index, U), chunk_slices(numel)
        if not self.rounds:
            for part, u in self._draw_chunks(numel, u_seed, device, words):
                yield part, [u] * len(streams)
            return
        step = None
        if len(slices) > 1:
            bounds = [torch.aminmax(u) for _, u in gaussian_chunks(numel, u_seed, device)]
            step = direction_step(torch.stack([b[0] for b in bounds]).min(),
                                  torch.stack([b[1] for b in bounds]).max(), self.bits)
        noises = [uniform_chunks(numel, derive(query_seed, index, s), device, slices=slices) for s in streams]
        for part, u in gaussian_chunks(numel, u_seed, device):
            here = step if step is not None else direction_step(*torch.aminmax(u), self.bits)
            rounded = [round_onto(u if k == len(noises) - 1 else u.clone(), here, next(noise)[1])
                       for k, noise in enumerate(noises)]
            yield part, rounded
            del u, rounded  # a chunk at a time: nothing of this one is held while the next is drawn


class FloatTarget:
    def __init__(self, name: str, param: nn.Parameter, index: int, decay: bool):
        self.name, self.param, self.index, self.decay = name, param, index, decay

    @property
    def numel(self) -> int:
        return self.param.numel()

    def flat(self) -> torch.Tensor:
        """The parameter's storage as one vector, written in place. Through `detach()`, not `.data`: writes through
        `.data` leave the parameter's version counter unchanged, and layers that cache what they compute from their
        weights (a tensor-train layer's built matrix) rely on it to notice the weights moved."""
        return self.param.detach().view(-1)

    def move(self, d: Directions, query_seed: int, current: float, to: float,
             words: torch.Tensor | None = None) -> None:
        """From w + current * u1 to w + to * u1, in place, a chunk of the direction at a time (`words`: see
        `with_sign_words`)."""
        p = self.flat()
        for part, (u1,) in d.chunks(query_seed, self.index, p.numel(), p.device, (Q1,), words):
            p[part].add_(u1.to(p.dtype), alpha=to - current)
            del u1

    def update(self, d: Directions, step_seed: int, query_seeds: list[int], coefs: list[float], restore: float,
               decay: float, words: torch.Tensor | None = None, kept: KeptWords | None = None) -> None:
        """Undo the last query's perturbation (+restore * u1) and apply sum_i coef_i * u2_i and weight decay, a chunk
        at a time (each element sees the same operations in the same order as whole-tensor arithmetic). `words`:
        the last query's, see `with_sign_words`; `kept`: the step's, where the earlier queries' words are found."""
        p = self.flat()
        *earlier, (last_seed, last_coef) = list(zip(query_seeds, coefs))
        streams = (Q1, Q2) if d.rounds and d.independent else (Q1,)
        for part, directions in d.chunks(last_seed, self.index, p.numel(), p.device, streams, words):
            u1, u2 = directions[0].to(p.dtype), directions[-1].to(p.dtype)
            chunk = p[part]
            if decay and self.decay:
                chunk.add_(u1, alpha=restore).mul_(1.0 - decay)
                chunk.add_(u2, alpha=last_coef)
            elif len(directions) == 1:
                chunk.add_(u1, alpha=restore + last_coef)  # u1 = u2: restore and update in one pass
            else:
                chunk.add_(u1, alpha=restore).add_(u2, alpha=last_coef)
            del directions, u1, u2
        for seed, coef in earlier:
            earlier_words = None if kept is None else kept.get((seed, self.index))
            for part, (u2,) in d.chunks(seed, self.index, p.numel(), p.device, (d.update_stream,), earlier_words):
                p[part].add_(u2.to(p.dtype), alpha=coef)
                del u2


class QuantTarget:
    def __init__(self, name: str, layer: QuantLinear, index: int):
        self.name, self.layer, self.index = name, layer, index

    @property
    def numel(self) -> int:
        return self.layer.in_features * self.layer.out_features

    def move(self, d: Directions, query_seed: int, current: float, to: float, words: None = None,
             kept: KeptWords | None = None) -> None:
        """The layer dequantizes to w + to * u1 (its codes untouched); `to` = 0 removes the perturbation. (Its
        direction is drawn inside the forward, so none is drawn ahead: `words` is always None.) Random signs come
        from words kept in `kept` for the step, drawn by the first forward that needs them (within its bound)."""
        if to == 0.0:
            self.layer.perturbation = None
            return
        shape = (self.layer.out_features, self.layer.in_features)
        if d.distribution == "rademacher" and kept is not None:
            self.layer.perturbation = lambda layer: words_to_signs(
                self.kept_words(query_seed, kept), 0, self.numel, to).view(shape)
            return
        self.layer.perturbation = lambda layer: d.perturbation(query_seed, self.index, shape,
                                                               layer.codes.device).mul_(to)

    def kept_words(self, query_seed: int, kept: KeptWords) -> torch.Tensor:
        """The words of this tensor's random signs for `query_seed`: kept ones, or drawn (and offered to `kept`)."""
        words = kept.get((query_seed, self.index))
        if words is None:
            words = tensor_sign_words(self.numel, derive(query_seed, self.index, U), self.layer.codes.device)
            kept.offer((query_seed, self.index), words)
        return words

    @torch.no_grad()
    def update(self, d: Directions, step_seed: int, query_seeds: list[int], coefs: list[float], restore: float,
               decay: float, words: None = None, kept: None = None) -> None:
        """codes <- R(codes + sum_i coef_i * u2_i / scale - decay * codes), R onto the grid (SR or nearest). The
        update of random signs, one query and no decay on an integer grid is drawn as the moves it makes
        (ftkit.optim.sparse_update): the same distribution, without a random number per code."""
        layer = self.layer
        layer.perturbation = None
        if sparse_update.applies(layer, d.distribution, d.update_rounding, coefs, decay):
            sparse_update.update([(layer, self.index)], d.update_rounding, step_seed, query_seeds[0], coefs[0])
            return
        shape, device = (layer.out_features, layer.in_features), layer.codes.device
        step = None
        for seed, coef in zip(query_seeds, coefs):
            u2 = d.update_direction(seed, self.index, shape, device)
            step = u2.mul_(coef) if step is None else step.add_(u2, alpha=coef)
        blocks = layer.row_blocks()  # a block of rows at a time: temporaries of a few MiB, not of the layer
        noise = uniform_chunks(step.numel(), derive(step_seed, self.index, UPDATE), device,
                               size=(blocks[0].stop - blocks[0].start) * shape[1]) \
            if d.update_rounding == "stochastic" else None
        for rows in blocks:
            group_view(step[rows], layer.group_size).div_(layer.scales[rows].to(torch.float32).unsqueeze(-1))
            codes = layer.code_values(rows)
            target = step[rows].add_(codes)  # in grid units
            if decay:
                target.add_(codes, alpha=-decay)
            block_noise = None if noise is None else next(noise)[1].view_as(target)
            layer.set_code_values(layer.codec.round(target, d.update_rounding, noise=block_noise), rows)


def update_sparse_targets(targets: list, d: Directions, step_seed: int, query_seeds: list[int], coefs: list[float],
                          decay: float, kept: KeptWords | None = None) -> list:
    """Update together the quantized targets whose update is drawn as its moves (ftkit.optim.sparse_update), with
    the sign words the step's forwards kept, and return the other targets, for `update` one at a time."""
    sparse = [t for t in targets if isinstance(t, QuantTarget)
              and sparse_update.applies(t.layer, d.distribution, d.update_rounding, coefs, decay)]
    for target in sparse:
        target.layer.perturbation = None
    if sparse:
        words = None if kept is None else [kept.get((query_seeds[0], t.index)) for t in sparse]
        sparse_update.update([(t.layer, t.index) for t in sparse], d.update_rounding, step_seed, query_seeds[0],
                             coefs[0], words)
    chosen = {id(t) for t in sparse}
    return [t for t in targets if id(t) not in chosen]


# Float targets whose sign words are drawn together, ahead of their pass: windows of about this many elements (their
# words: 4 MiB, and at most one tensor more).
AHEAD_ELEMENTS = 1 << 24
# A step applies each query's direction three times (to +eps, to -eps, back with the update); the sign words drawn
# for the first are kept for the other two up to this many bytes: a 16th of the fp32 weights they drive (SmolLM2-135M:
# 26.5 MB), so they cost memory only up to this bound, and the steps of larger models redraw the rest.
KEEP_BYTES = 64 << 20


class KeptWords(dict):
    """The sign words of one step's directions, by (query seed, target index), within KEEP_BYTES."""

    def __init__(self):
        super().__init__()
        self.nbytes = 0

    def offer(self, key: tuple[int, int], words: torch.Tensor) -> None:
        if self.nbytes + words.nbytes <= KEEP_BYTES:
            self[key] = words
            self.nbytes += words.nbytes


def with_sign_words(targets: list, d: Directions, query_seed: int, kept: KeptWords | None = None):
    """(target, words) for each target in order: with random-sign directions, the words of the float targets of
    one chunk or less on the CPU are drawn ahead, a window of AHEAD_ELEMENTS at a time by every thread at once
    (`sign_words`), or taken from `kept` (and offered to it when drawn); None for the rest, which draw their own.
    The same numbers either way."""
    def ahead(target) -> bool:
        one_chunk = target.numel <= zo_streams.CHUNK_ELEMENTS  # read at each call: tests shrink it
        return isinstance(target, FloatTarget) and one_chunk and target.param.device.type == "cpu"

    if d.distribution != "rademacher":
        yield from ((target, None) for target in targets)
        return
    kept = KeptWords() if kept is None else kept
    start = 0
    while start < len(targets):
        window, size, stop = [], 0, start
        while stop < len(targets) and size < AHEAD_ELEMENTS:
            if ahead(targets[stop]) and (query_seed, targets[stop].index) not in kept:
                window.append(targets[stop])
                size += targets[stop].numel
            stop += 1
        drawn = sign_words([(t.numel, derive(query_seed, t.index, U)) for t in window])
        fresh = {t.index: w for t, w in zip(window, drawn)}
        del drawn
        for target in targets[start:stop]:
            words = kept.get((query_seed, target.index))
            if words is None and target.index in fresh:
                words = fresh.pop(target.index)  # each window's words freed as they are used, unless kept
                kept.offer((query_seed, target.index), words)
            yield target, words
        start = stop


def zo_targets(model: nn.Module) -> list[FloatTarget | QuantTarget]:
    """Every trainable tensor, in module order: the codes of QuantLinear layers whose `train_codes` is set
    (full-parameter QuZO, see `prepare_model`) and parameters with requires_grad."""
    targets: list[FloatTarget | QuantTarget] = []
    for module_name, module in model.named_modules():
        if isinstance(module, QuantLinear) and module.train_codes:
            targets.append(QuantTarget(module_name, module, len(targets)))
        for param_name, param in module.named_parameters(recurse=False):
            if param.requires_grad:
                name = f"{module_name}.{param_name}" if module_name else param_name
                targets.append(FloatTarget(name, param, len(targets), decay=param.ndim >= 2))
    return targets


def prepare_model(model: nn.Module, recipe) -> None:
    """What zeroth-order methods train beyond the parameters an adapter leaves trainable (their `prepare`,
    ftkit.components.Optimizer): without an adapter, the codes of low-bit layers themselves (QuZO), and never the
    word embeddings unless `method.zo.train_embeddings`: a batch touches few of their rows, so a random direction
    moves the rest with no signal (pure noise), at the cost of random numbers for much of a small model."""
    from ftkit.adapters import ADAPTERS

    if ADAPTERS[recipe.method.adapter].trains_base:
        for module in model.modules():
            if isinstance(module, QuantLinear):
                module.train_codes = True
    if not recipe.method.zo.train_embeddings:
        embeddings = model.backbone.get_input_embeddings()
        if embeddings is not None:
            embeddings.weight.requires_grad_(False)
