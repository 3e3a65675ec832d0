"""What a zeroth-order step perturbs and updates, one tensor at a time.

A `FloatTarget` is a full-precision parameter (fp32/bf16 weights, biases, norms, adapters, the head): perturbed in
place, restored and updated in one fused pass. A `QuantTarget` is the codes of a `QuantLinear`: the perturbation
is applied while the layer dequantizes (the `perturbation` hook), so stored codes change only at the update, which
is rounded onto the weight grid (stochastically by default). No full-precision master copy exists. A `ScaleTarget`
is the per-group scales of a `QuantLinear` whose codes stay frozen (QZO, method.zo.low_bit: scales): perturbed in
the layer's dequantize path (`scale_perturbation`: the layer computes with s + delta), so bf16 scales are never
perturbed in place, and updated on the scales' own dtype grid (bf16: stochastically rounded by default; fp32: added).

Both take their directions from a `Directions` (ftkit.optim.directions: the kind of direction and its rounding)
and, within a step, from the kind's `StepDraws` (`step`: what the kind keeps through the step; None outside one).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ftkit.optim.directions import Directions, StepDraws
from ftkit.optim.zo_streams import Q1, Q2, UPDATE, derive, uniform_chunks
from ftkit.quant.codecs import round_to_dtype
from ftkit.quant.linear import QuantLinear
from ftkit.quant.scales import group_view

__all__ = ["Directions", "FloatTarget", "QuantTarget", "ScaleTarget", "land", "zo_targets", "prepare_model"]


class FloatTarget:
    low_bit = False

    def __init__(self, name: str, param: nn.Parameter, index: int, decay: bool):
        self.name, self.param, self.index, self.decay = name, param, index, decay

    @property
    def numel(self) -> int:
        return self.param.numel()

    @property
    def tensor(self) -> torch.Tensor:
        return self.param

    @property
    def device(self) -> torch.device:
        return self.param.device

    def flat(self) -> torch.Tensor:
        """The parameter's storage as one vector, written in place. Through `detach()`, not `.data`: writes through
        `.data` leave the parameter's version counter unchanged, and layers that cache what they compute from their
        weights (a tensor-train layer's built matrix) rely on it to notice the weights moved."""
        return self.param.detach().view(-1)

    def move(self, d: Directions, query_seed: int, current: float, to: float, step: StepDraws | None = None) -> None:
        """From w + current * u1 to w + to * u1, in place, a chunk of the direction at a time."""
        p = self.flat()
        held = None if step is None else step.held(query_seed, self.index)
        for part, (u1,) in d.chunks(query_seed, self.index, p.numel(), p.device, (Q1,), held):
            p[part].add_(u1.to(p.dtype), alpha=to - current)
            del u1

    def update(self, d: Directions, step_seed: int, query_seeds: list[int], coefs: list[float], restore: float,
               decay: float, step: StepDraws | None = None) -> None:
        """Undo the last query's perturbation (+restore * u1) and apply sum_i coef_i * u2_i and weight decay, a chunk
        at a time (each element sees the same operations in the same order as whole-tensor arithmetic)."""
        p = self.flat()
        held = (lambda seed: None) if step is None else (lambda seed: step.held(seed, self.index))
        *earlier, (last_seed, last_coef) = list(zip(query_seeds, coefs))
        streams = (Q1, Q2) if d.rounds and d.independent else (Q1,)
        for part, directions in d.chunks(last_seed, self.index, p.numel(), p.device, streams, held(last_seed)):
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
            for part, (u2,) in d.chunks(seed, self.index, p.numel(), p.device, (d.update_stream,), held(seed)):
                p[part].add_(u2.to(p.dtype), alpha=coef)
                del u2


class QuantTarget:
    low_bit = True

    def __init__(self, name: str, layer: QuantLinear, index: int):
        self.name, self.layer, self.index = name, layer, index

    @property
    def numel(self) -> int:
        return self.layer.in_features * self.layer.out_features

    @property
    def shape(self) -> tuple[int, int]:
        return self.layer.out_features, self.layer.in_features

    @property
    def tensor(self) -> torch.Tensor:
        return self.layer.codes

    @property
    def device(self) -> torch.device:
        return self.layer.codes.device

    def move(self, d: Directions, query_seed: int, current: float, to: float, step: StepDraws | None = None) -> None:
        """The layer dequantizes to w + to * u1 (its codes untouched); `to` = 0 removes the perturbation. The
        direction is drawn inside the forward: by the step's kind where it keeps one (`StepDraws.perturbation`)."""
        if to == 0.0:
            self.layer.perturbation = None
            return
        hook = None if step is None else step.perturbation(self, query_seed, to)
        self.layer.perturbation = hook or (lambda layer: d.perturbation(query_seed, self.index, self.shape,
                                                                        layer.codes.device).mul_(to))

    @torch.no_grad()
    def update(self, d: Directions, step_seed: int, query_seeds: list[int], coefs: list[float], restore: float,
               decay: float, step: StepDraws | None = None) -> None:
        """codes <- R(codes + sum_i coef_i * u2_i / scale - decay * codes), R onto the grid (SR or nearest), unless
        the kind updates it its own way (`StepDraws.update_together`: random signs on an integer grid are drawn as
        the codes they move, ftkit.optim.sparse_update)."""
        layer = self.layer
        layer.perturbation = None
        if not (d.begin_step() if step is None else step).update_together([self], d, step_seed, query_seeds, coefs,
                                                                          decay):
            return
        shape, device = self.shape, layer.codes.device
        change = None
        for seed, coef in zip(query_seeds, coefs):
            u2 = d.update_direction(seed, self.index, shape, device)
            change = u2.mul_(coef) if change is None else change.add_(u2, alpha=coef)
        land(layer, self.index, change, step_seed, d.update_rounding, decay)


@torch.no_grad()
def land(layer: QuantLinear, index: int, change: torch.Tensor, step_seed: int, rounding: str, decay: float) -> None:
    """codes <- R(codes + change / scale - decay * codes) for a layer's float32 `change` [N, K] (overwritten), R
    onto the grid (SR with the noise of stream (step_seed, index, UPDATE), or nearest), a block of rows at a time:
    temporaries of a few MiB, not of the layer."""
    blocks = layer.row_blocks()
    noise = uniform_chunks(change.numel(), derive(step_seed, index, UPDATE), change.device,
                           size=(blocks[0].stop - blocks[0].start) * change.shape[1]) \
        if rounding == "stochastic" else None
    for rows in blocks:
        group_view(change[rows], layer.group_size).div_(layer.scales[rows].to(torch.float32).unsqueeze(-1))
        codes = layer.code_values(rows)
        target = change[rows].add_(codes)  # in grid units
        if decay:
            target.add_(codes, alpha=-decay)
        block_noise = None if noise is None else next(noise)[1].view_as(target)
        layer.set_code_values(layer.codec.round(target, rounding, noise=block_noise), rows)


class ScaleTarget:
    """The scales [N, groups] of a QuantLinear (its codes untouched). Behaves as a full-precision tensor for the
    direction kinds (`low_bit` False: drawn ahead, held, never updated as moves of codes)."""

    low_bit = False

    def __init__(self, name: str, layer: QuantLinear, index: int):
        self.name, self.layer, self.index = name, layer, index

    @property
    def numel(self) -> int:
        return self.layer.scales.numel()

    @property
    def tensor(self) -> torch.Tensor:
        return self.layer.scales

    @property
    def device(self) -> torch.device:
        return self.layer.scales.device

    def _direction(self, d: Directions, query_seed: int, streams: tuple, held) -> torch.Tensor:
        """The direction of the last of `streams` as one float32 vector (the scales are few: 1/group of the weights)."""
        out = torch.empty(self.numel, dtype=torch.float32, device=self.device)
        for part, directions in d.chunks(query_seed, self.index, self.numel, self.device, streams, held):
            out[part] = directions[-1]
        return out

    def move(self, d: Directions, query_seed: int, current: float, to: float, step: StepDraws | None = None) -> None:
        """The layer computes with scales s + to * u1 (stored scales untouched); `to` = 0 removes the perturbation."""
        if to == 0.0:
            self.layer.scale_perturbation = None
            return
        held = None if step is None else step.held(query_seed, self.index)
        self.layer.scale_perturbation = self._direction(d, query_seed, (Q1,), held).mul_(to).view_as(self.tensor)

    @torch.no_grad()
    def update(self, d: Directions, step_seed: int, query_seeds: list[int], coefs: list[float], restore: float,
               decay: float, step: StepDraws | None = None) -> None:
        """s <- R(s + sum_i coef_i * u2_i), R onto the scales' dtype: bf16 by `update_rounding` (stochastic: unbiased,
        so updates far below bf16's spacing still move the scales on average), fp32 a plain add. No weight decay:
        pulling scales towards zero would shrink the weights, not regularise them."""
        layer = self.layer
        layer.scale_perturbation = None
        change = None
        for seed, coef in zip(query_seeds, coefs):
            held = None if step is None else step.held(seed, self.index)
            u2 = self._direction(d, seed, (d.update_stream,), held)
            change = u2.mul_(coef) if change is None else change.add_(u2, alpha=coef)
        scales = layer.scales
        target = change.add_(scales.detach().view(-1).to(torch.float32))
        noise = None
        if scales.dtype != torch.float32 and d.update_rounding == "stochastic":
            noise = next(uniform_chunks(self.numel, derive(step_seed, self.index, UPDATE), self.device,
                                        size=self.numel))[1]
        scales.copy_(round_to_dtype(target, scales.dtype, d.update_rounding, noise).view_as(scales))
        layer.drop_derived()


def zo_targets(model: nn.Module) -> list[FloatTarget | QuantTarget | ScaleTarget]:
    """Every trainable tensor, in module order: the codes of QuantLinear layers whose `train_codes` is set
    (full-parameter QuZO, see `prepare_model`), their scales where `train_scales` is set (QZO) and parameters with
    requires_grad."""
    targets: list[FloatTarget | QuantTarget | ScaleTarget] = []
    for module_name, module in model.named_modules():
        if isinstance(module, QuantLinear) and module.train_codes:
            targets.append(QuantTarget(module_name, module, len(targets)))
        if isinstance(module, QuantLinear) and module.train_scales:
            targets.append(ScaleTarget(f"{module_name}.scales", module, len(targets)))
        for param_name, param in module.named_parameters(recurse=False):
            if param.requires_grad:
                name = f"{module_name}.{param_name}" if module_name else param_name
                targets.append(FloatTarget(name, param, len(targets), decay=param.ndim >= 2))
    return targets


def prepare_model(model: nn.Module, recipe) -> None:
    """What zeroth-order methods train beyond the parameters an adapter leaves trainable (their `prepare`,
    ftkit.components.Optimizer): without an adapter, the codes of low-bit layers themselves (QuZO) or their scales
    (`method.zo.low_bit: scales`, QZO), and never the word embeddings unless `method.zo.train_embeddings`: a batch
    touches few of their rows, so a random direction moves the rest with no signal (pure noise), at the cost of
    random numbers for much of a small model."""
    from ftkit.adapters import ADAPTERS

    if ADAPTERS[recipe.method.adapter].trains_base:
        for module in model.modules():
            if isinstance(module, QuantLinear):
                mark_low_bit(module, recipe.method.zo.low_bit)
    if not recipe.method.zo.train_embeddings:
        embeddings = model.backbone.get_input_embeddings()
        if embeddings is not None:
            embeddings.weight.requires_grad_(False)


def mark_low_bit(layer: QuantLinear, low_bit: str) -> None:
    """Mark what of a low-bit layer a zeroth-order method trains: its "codes" (QuZO) or its "scales" (QZO)."""
    if low_bit not in ("codes", "scales"):
        raise ValueError(f"low_bit must be 'codes' or 'scales', got {low_bit!r}")
    if low_bit == "scales" and hasattr(layer.codec, "derive"):
        raise ValueError(f"{layer.fmt} scales are derived from integer sub-block scales and cannot be trained; "
                         f"train its codes")
    layer.train_codes, layer.train_scales = low_bit == "codes", low_bit == "scales"
