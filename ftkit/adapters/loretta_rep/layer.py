"""LoRETTA_rep: LoRA whose two factors are tensor trains.

y = W0 x + (alpha / r) * B(A(dropout(x))), with A: in -> r and B: r -> out each a TTLinear of rank `tensor_rank`.
The base layer (full precision, native low-bit or bitsandbytes) stays frozen. `merge` adds the update to a
full-precision base weight exactly; `unmerge` removes it.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ftkit.adapters.export import unwrap_layers
from ftkit.adapters.targets import (
    REP_TARGETS,
    default_targets,
    find_linears,
    freeze_all_but,
)
from ftkit.adapters.tt import TTLinear
from ftkit.devices import model_device
from ftkit.errors import UserError
from ftkit.modules import replace_module


class LorettaRepLinear(nn.Module):
    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float, tensor_rank: int,
                 shape_a: list[int] | None = None, shape_b: list[int] | None = None, init: str = "identity",
                 modes: int | None = None):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.scaling = alpha / r
        device = model_device(base)  # the adapter lives where its base layer does (meta when counting)
        # Identity init: B's last core is zero, so the update starts at exactly zero and gradients reach it.
        self.loretta_a = TTLinear(self.in_features, r, tensor_rank, shape_a, init="paper", device=device, modes=modes)
        self.loretta_b = TTLinear(r, self.out_features, tensor_rank, shape_b, init="paper",
                                  zero_last_core=init == "identity", device=device, modes=modes)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def delta_weight(self) -> torch.Tensor:
        """The update in nn.Linear's (out x in) layout."""
        return self.scaling * (self.loretta_a.to_matrix() @ self.loretta_b.to_matrix()).T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.merged:
            return out
        update = self.loretta_b(self.loretta_a(self.dropout(x).to(self.loretta_a.cores[0].dtype)))
        return out + (self.scaling * update).to(out.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        if not isinstance(self.base, nn.Linear):
            raise ValueError(f"merge needs a full-precision base layer, got {type(self.base).__name__}; "
                             f"export dequantizes quantized bases first")
        if not self.merged:
            self.base.weight += self.delta_weight().to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
            self.merged = False


def inject(model: nn.Module, spec) -> nn.Module:
    """LorettaRepLinear around each target of `spec` (method.loretta); only they and the task head train."""
    backbone = model.backbone
    targets = spec.target_modules or default_targets(REP_TARGETS, backbone.config.model_type,
                                                     "method.loretta.target_modules")
    names = find_linears(backbone, targets)
    if not names:
        raise UserError(f"method.loretta.target_modules: no linear layer matches {targets}")
    for name in names:
        base = backbone.get_submodule(name)
        try:
            layer = LorettaRepLinear(base, spec.r, spec.alpha, spec.dropout, spec.tensor_rank, spec.shapes.get("a"),
                                     spec.shapes.get("b"), spec.init, spec.modes)
        except ValueError as err:
            raise UserError(f"method.loretta.shapes: layer {name}: {err}") from None
        replace_module(backbone, name, layer)
    freeze_all_but(model, lambda n: "loretta_" in n or n.startswith(("head.", "pre_head.")))
    return model


def unwrap(model: nn.Module, merge: bool) -> dict:
    def set_base(layer, base):
        layer.base = base

    return unwrap_layers(model, LorettaRepLinear, lambda layer: layer.base, set_base, lambda layer: layer.merge(),
                         merge, r"loretta_")
