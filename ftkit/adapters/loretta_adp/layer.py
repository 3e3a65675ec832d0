"""LoRETTA_adp: bottleneck adapters (h -> b -> h) whose two projections are tensor trains.

out = z + scaling * up(act(down(dropout(z)))), down and up TTLinear layers with dense biases. "Output" adapters
transform a layer's output (BERT family: after the attention-output and FFN-output dense layers, before dropout,
residual and LayerNorm); "input" adapters transform a layer's input (LLaMA's gate/up projections, OPT's fc1).
With `init: identity` the up projection's last core and bias are zero, so the model is unchanged at step 0.
Layer norms are trained by default (`train_norms`), as in the paper; `tt_head` adds a residual TT hidden layer
in front of an encoder's classification head.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ftkit.adapters.export import unwrap_layers
from ftkit.adapters.targets import (
    ADP_TARGETS,
    default_targets,
    find_linears,
    freeze_all_but,
    is_norm,
)
from ftkit.adapters.tt import TTLinear
from ftkit.devices import model_device
from ftkit.errors import UserError
from ftkit.modules import replace_module

NONLINEARITIES = {"relu": lambda: nn.ReLU(inplace=True), "gelu": nn.GELU, "tanh": nn.Tanh, "silu": nn.SiLU}


class TTAdapter(nn.Module):
    def __init__(self, hidden: int, spec, device=None):
        super().__init__()
        identity = spec.init == "identity"
        self.down = TTLinear(hidden, spec.bottleneck, spec.tensor_rank, spec.shapes.get("down"), bias=True,
                             init="paper", device=device, modes=spec.modes)
        self.up = TTLinear(spec.bottleneck, hidden, spec.tensor_rank, spec.shapes.get("up"), bias=True,
                           init="identity" if identity else "paper", device=device, modes=spec.modes)
        self.act = NONLINEARITIES[spec.nonlinearity]()
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()
        self.scaling = spec.scaling

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = z.to(self.down.cores[0].dtype)
        update = self.up(self.act(self.down(self.dropout(h)))).to(z.dtype)
        return torch.add(z, update, alpha=self.scaling)  # residual and scaling in one pass


class OutputAdapter(nn.Module):
    def __init__(self, base: nn.Module, adapter: TTAdapter):
        super().__init__()
        self.base, self.loretta_adapter = base, adapter
        self.in_features, self.out_features = base.in_features, base.out_features

    def forward(self, x):
        return self.loretta_adapter(self.base(x))


class InputAdapter(OutputAdapter):
    def forward(self, x):
        return self.base(self.loretta_adapter(x))


class ResidualTTHead(nn.Module):
    """pooled + tanh(TT(pooled)): a TT hidden layer before the classifier that starts as the identity."""

    def __init__(self, hidden: int, spec, device=None):
        super().__init__()
        self.loretta_dense = TTLinear(hidden, hidden, spec.tensor_rank, spec.shapes.get("head"), bias=True,
                                      init=spec.init, device=device, modes=spec.modes)

    def forward(self, pooled):
        return pooled + torch.tanh(self.loretta_dense(pooled.to(self.loretta_dense.cores[0].dtype))).to(pooled.dtype)


def inject(model: nn.Module, spec) -> nn.Module:
    """TT adapters at the targets of `spec` (method.loretta); they, the norms (train_norms) and the head train."""
    backbone = model.backbone
    if spec.target_modules:
        placement = {"output": spec.target_modules}
    else:
        placement = default_targets(ADP_TARGETS, backbone.config.model_type, "method.loretta.target_modules")
    found = 0
    for where, wrapper in (("output", OutputAdapter), ("input", InputAdapter)):
        for name in find_linears(backbone, placement.get(where, [])):
            base = backbone.get_submodule(name)
            hidden = base.out_features if where == "output" else base.in_features
            device = model_device(base)  # the adapter lives where its base layer does (meta when counting)
            try:
                adapter = TTAdapter(hidden, spec, device)
            except ValueError as err:
                raise UserError(f"method.loretta.shapes: layer {name}: {err}") from None
            replace_module(backbone, name, wrapper(base, adapter))
            found += 1
    if not found:
        raise UserError(f"method.loretta.target_modules: no linear layer matches {placement}")
    if spec.tt_head:
        if not hasattr(model, "head"):
            raise UserError("method.loretta.tt_head: only encoder classifiers have a classification head")
        device = model.head.weight.device
        model.pre_head = ResidualTTHead(model.head.in_features, spec, device)
    freeze_all_but(model, lambda n: "loretta_" in n or n.startswith(("head.", "pre_head."))
                   or (spec.train_norms and is_norm(n)))
    return model


def unwrap(model: nn.Module, merge: bool) -> dict:
    """The adapters are set aside as tensors (they have a nonlinearity: nothing merges them into the weights)."""
    def set_base(layer, base):
        layer.base = base

    return unwrap_layers(model, OutputAdapter, lambda layer: layer.base, set_base, None, merge, r"loretta_")
