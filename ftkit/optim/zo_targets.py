"""What a zeroth-order step perturbs and updates, one tensor at a time.

A `FloatTarget` is a full-precision parameter (fp32/bf16 weights, biases, norms, adapters, the head): perturbed in
place, restored and updated in one fused pass. A `QuantTarget` is the codes of a `QuantLinear`: the perturbation
is applied while the layer dequantizes (the `perturbation` hook), so stored codes change only at the update, which
is rounded onto the weight grid (stochastically by default). No full-precision master copy exists.

Directions: u ~ N(0, I) per tensor from its stream; the perturbation uses u1 = Q1(u) and the update u2 = Q2(u),
two stochastic roundings onto a `perturb_bits` grid with independent random bits (MeZO: bits 0, u1 = u2 = u).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ftkit.optim.zo_streams import Q1, Q2, UPDATE, U, derive, gaussian, quantize_direction, uniform_chunks
from ftkit.quant.linear import QuantLinear
from ftkit.quant.scales import group_view


@dataclass(frozen=True)
class Directions:
    """How directions are drawn and updates rounded (from method.zo)."""

    bits: int  # 0: Gaussian directions as they are (MeZO)
    independent: bool  # Q2 uses its own rounding bits (QuZO) or Q1's (the public code's variant)
    update_rounding: str  # "stochastic" or "nearest" (QuantTarget only)

    def perturbation(self, query_seed: int, index: int, shape, device) -> torch.Tensor:
        u = gaussian(shape, derive(query_seed, index, U), device)
        return quantize_direction(u, self.bits, derive(query_seed, index, Q1))

    def both(self, query_seed: int, index: int, shape, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(u1, u2) from one draw of u."""
        u = gaussian(shape, derive(query_seed, index, U), device)
        if self.bits == 0:
            return u, u
        u1 = quantize_direction(u.clone(), self.bits, derive(query_seed, index, Q1))
        if not self.independent:
            return u1, u1
        return u1, quantize_direction(u, self.bits, derive(query_seed, index, Q2))

    def update_direction(self, query_seed: int, index: int, shape, device) -> torch.Tensor:
        u = gaussian(shape, derive(query_seed, index, U), device)
        return quantize_direction(u, self.bits, derive(query_seed, index, Q2 if self.independent else Q1))


class FloatTarget:
    def __init__(self, name: str, param: nn.Parameter, index: int, decay: bool):
        self.name, self.param, self.index, self.decay = name, param, index, decay

    @property
    def numel(self) -> int:
        return self.param.numel()

    def move(self, d: Directions, query_seed: int, current: float, to: float) -> None:
        """From w + current * u1 to w + to * u1, in place."""
        p = self.param.data
        p.add_(d.perturbation(query_seed, self.index, p.shape, p.device).to(p.dtype), alpha=to - current)

    def update(self, d: Directions, step_seed: int, query_seeds: list[int], coefs: list[float], restore: float,
               decay: float) -> None:
        """Undo the last query's perturbation (+restore * u1) and apply sum_i coef_i * u2_i and weight decay."""
        p = self.param.data
        *earlier, last = list(zip(query_seeds, coefs))
        u1, u2 = d.both(last[0], self.index, p.shape, p.device)
        if decay and self.decay:
            p.add_(u1.to(p.dtype), alpha=restore).mul_(1.0 - decay)
            p.add_(u2.to(p.dtype), alpha=last[1])
        elif u1 is u2:
            p.add_(u1.to(p.dtype), alpha=restore + last[1])  # MeZO: restore and update in one pass
        else:
            p.add_(u1.to(p.dtype), alpha=restore).add_(u2.to(p.dtype), alpha=last[1])
        for seed, coef in earlier:
            p.add_(d.update_direction(seed, self.index, p.shape, p.device).to(p.dtype), alpha=coef)


class QuantTarget:
    def __init__(self, name: str, layer: QuantLinear, index: int):
        self.name, self.layer, self.index = name, layer, index

    @property
    def numel(self) -> int:
        return self.layer.in_features * self.layer.out_features

    def move(self, d: Directions, query_seed: int, current: float, to: float) -> None:
        """The layer dequantizes to w + to * u1 (its codes untouched); `to` = 0 removes the perturbation."""
        if to == 0.0:
            self.layer.perturbation = None
            return
        shape = (self.layer.out_features, self.layer.in_features)
        self.layer.perturbation = lambda layer: d.perturbation(query_seed, self.index, shape,
                                                               layer.codes.device).mul_(to)

    @torch.no_grad()
    def update(self, d: Directions, step_seed: int, query_seeds: list[int], coefs: list[float], restore: float,
               decay: float) -> None:
        """codes <- R(codes + sum_i coef_i * u2_i / scale - decay * codes), R onto the grid (SR or nearest)."""
        layer = self.layer
        layer.perturbation = None
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
