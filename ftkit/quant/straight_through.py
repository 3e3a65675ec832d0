"""First-order training of low-precision weights: quantization-aware training with a straight-through estimator,
the baseline QuZO is compared against (the full-parameter first-order `qft` baseline of the QuZO code).

`quant.engine: straight_through` keeps a full-precision master weight per linear layer and computes every forward
with its quantized value: the same codec, scales (recomputed from the master weight at each forward) and
round-to-nearest as a `QuantLinear` built from that weight (the codec's encode, then decode). Backpropagation
treats the rounding as the identity, w_q = w + (Q(w) - w).detach(), so the gradient with respect to the quantized
weight updates the master weight. Memory is that of first-order fp32 training plus one quantized copy of a layer at
a time: this is an accuracy baseline, not a memory saving (that is what QuZO is for). Export writes the quantized
weights the model computes with.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ftkit.errors import UserError
from ftkit.quant import FORMATS
from ftkit.quant.scales import SCALE_DTYPES


class StraightThroughLinear(nn.Linear):
    def __init__(self, in_features: int, out_features: int, bias: bool, fmt: str, group_size: int = 0,
                 scale_method: str = "absmax", scale_dtype: str = "bfloat16", device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        group_size = getattr(FORMATS[fmt].grid(), "block", 0) or group_size  # GGUF's formats: their blocks
        if group_size and in_features % group_size:
            raise ValueError(f"quant.group_size {group_size} does not divide in_features {in_features}")
        self.fmt, self.group_size, self.scale_method = fmt, group_size, scale_method
        self.codec, self.scale_dtype = FORMATS[fmt].grid(), SCALE_DTYPES[scale_dtype]

    @classmethod
    def from_linear(cls, linear: nn.Linear, spec) -> "StraightThroughLinear":
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, spec.format, spec.group_size,
                    spec.scale_method, spec.scale_dtype, device=linear.weight.device, dtype=linear.weight.dtype)
        if not linear.weight.is_meta:
            with torch.no_grad():
                layer.weight.copy_(linear.weight)
                if linear.bias is not None:
                    layer.bias.copy_(linear.bias)
        return layer

    @torch.no_grad()
    def quantized_weight(self) -> torch.Tensor:
        """Q(w): the weight a QuantLinear built from the master weight (nearest rounding) dequantizes to."""
        weight = self.weight.detach().to(torch.float32)
        grid, params = self.codec.encode(weight, self.group_size, self.scale_method, self.scale_dtype, "nearest")
        return self.codec.decode(grid, params, self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight + (self.quantized_weight().to(self.weight.dtype) - self.weight).detach()
        return F.linear(x, weight, self.bias)

    def extra_repr(self) -> str:
        grouping = f"group {self.group_size}" if self.group_size else "per channel"
        return f"{super().extra_repr()}, straight-through {self.fmt}, {grouping}"


def to_straight_through(linear: nn.Linear, name: str, spec, generator=None) -> StraightThroughLinear:
    """The straight_through engine's conversion (its first rounding is always nearest)."""
    try:
        return StraightThroughLinear.from_linear(linear, spec)
    except ValueError as err:
        raise UserError(f"quant: cannot quantize layer {name}: {err}") from None
