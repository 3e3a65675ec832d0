"""The quantized linear layer: codes and scales in real low-bit storage, no full-precision copy of the weight.

Storage (buffers, saved in checkpoints): int8 codes as torch.int8 [N, K]; int4 codes packed two per byte in the
CPU kernel's layout (ftkit.quant.packing); FP8 codes as torch.float8_e4m3fn / float8_e5m2 [N, K]; scales [N, groups]
in bf16 or fp32. The bias stays in full precision.

Forward runs one of the matmul paths of ftkit.quant.kernels, chosen per format and device from what
`scripts/bench_quant.py` measured (see BENCHMARKS.md); the dequantize path materialises only this layer's weight,
and only for the duration of the matmul.

For zeroth-order methods the layer exposes its codes, scales and codec (`code_values`, `set_code_values`,
`scales`, `codec`) and a `perturbation` hook: a function of the layer returning an additive weight delta (a fresh
float32 tensor, which the layer then owns), applied while dequantizing so the stored codes never change during a
perturbed forward.

Large layers are dequantized and rewritten a block of rows at a time (`row_blocks`), so what a layer needs beyond
its codes is one float32 copy of its weight, not the several that whole-tensor unpacking and scaling would make.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ftkit.quant import FORMATS
from ftkit.quant.codecs import IntCodec
from ftkit.quant.kernels import kernel_for, matmul
from ftkit.quant.packing import (
    BLOCK,
    pack_int4,
    padded_rows,
    step_int4,
    step_int4_layers,
    unpack_int4,
)
from ftkit.quant.scales import compute_scales, group_view

# Elements per block of rows when dequantizing or rewriting codes: temporaries of about 16 MiB.
BLOCK_ELEMENTS = 1 << 22


class QuantLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, fmt: str, group_size: int = 0, bias: bool = True,
                 scale_dtype: torch.dtype = torch.bfloat16, kernel: str = "auto", device=None):
        super().__init__()
        self.codec = FORMATS[fmt].grid()
        if self.codec.packed and in_features % 2:
            raise ValueError(f"{fmt} needs an even number of input features, got {in_features}")
        if group_size and in_features % group_size:
            raise ValueError(f"quant.group_size {group_size} does not divide in_features {in_features}")
        self.in_features, self.out_features, self.fmt = in_features, out_features, fmt
        self.group_size, self.kernel = group_size, kernel
        self.format_kernels = FORMATS[fmt].kernels  # kernels that read this format's codes directly
        groups = in_features // group_size if group_size else 1
        if self.codec.packed:
            codes = torch.zeros(padded_rows(out_features), in_features // 2, dtype=torch.uint8, device=device)
        else:
            codes = torch.zeros(out_features, in_features, dtype=self.codec.storage_dtype, device=device)
        self.register_buffer("codes", codes)
        self.register_buffer("scales", torch.ones(out_features, groups, dtype=scale_dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None
        self.perturbation: Optional[Callable[[QuantLinear], torch.Tensor]] = None
        # Whether a zeroth-order method updates the codes (full-parameter QuZO; set by its `prepare`). The codes are
        # a buffer, so this stands in for requires_grad: counting and the zeroth-order targets read it.
        self.train_codes = False
        self._derived: dict = {}  # kernel layouts of the codes and scales (ftkit.quant.kernels), rebuilt on demand

    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt: str, group_size: int = 0, scale_method: str = "absmax",
                    rounding: str = "nearest", scale_dtype: torch.dtype = torch.bfloat16, kernel: str = "auto",
                    generator: torch.Generator | None = None) -> "QuantLinear":
        layer = cls(linear.in_features, linear.out_features, fmt, group_size, linear.bias is not None, scale_dtype,
                    kernel, device=linear.weight.device)
        with torch.no_grad():
            weight = linear.weight.detach().to(torch.float32)
            layer.scales.copy_(compute_scales(weight, layer.codec, group_size, scale_method, scale_dtype))
            scaled = group_view(weight, group_size) / layer.scales.to(torch.float32).unsqueeze(-1)
            layer.set_code_values(layer.codec.round(scaled, rounding, generator).reshape(weight.shape))
            if linear.bias is not None:
                layer.bias.copy_(linear.bias.detach().to(torch.float32))
        return layer

    # --- codes ------------------------------------------------------------------------------------------------

    def row_blocks(self) -> list[slice]:
        """Consecutive row ranges of about BLOCK_ELEMENTS elements, each starting at a multiple of the int4 packing
        block (64 rows), so every range maps onto whole rows of the packed codes."""
        rows = max(BLOCK, BLOCK_ELEMENTS // self.in_features // BLOCK * BLOCK)
        return [slice(start, min(start + rows, self.out_features)) for start in range(0, self.out_features, rows)]

    def code_values(self, rows: slice | None = None) -> torch.Tensor:
        """Grid values [N, K] (or of `rows`) as float32 (integers for int formats, FP8 values for FP8)."""
        rows = rows or slice(0, self.out_features)
        if self.codec.packed:
            _check_packed_start(rows)
            count = rows.stop - rows.start
            packed = self.codes[rows.start: rows.start + padded_rows(count)]
            return unpack_int4(packed, count, self.in_features, torch.float32)
        return self.codec.decode(self.codes[rows])

    def set_code_values(self, grid_values: torch.Tensor, rows: slice | None = None) -> None:
        """Store grid values [N, K] (or of `rows`; already on the codec's grid) into the codes buffer, in place."""
        rows = rows or slice(0, self.out_features)
        self.drop_derived()
        if self.codec.packed:  # packed from the grid values straight into the buffer's rows
            _check_packed_start(rows)
            pack_int4(grid_values, out=self.codes[rows.start: rows.start + padded_rows(rows.stop - rows.start)])
        else:
            self.codes[rows].copy_(self.codec.encode(grid_values))

    def step_codes(self, positions: torch.Tensor, steps: torch.Tensor) -> None:
        """Move the codes at flat `positions` (row * K + column, distinct) by `steps` whole grid steps, clamped to
        the grid's range, in place, reading and writing only those codes (integer formats)."""
        if not isinstance(self.codec, IntCodec):
            raise ValueError(f"{self.fmt} codes are not on a uniform grid; whole grid steps are not defined")
        self.drop_derived()
        if self.codec.packed:
            step_int4(self.codes, positions, steps, self.in_features)
            return
        flat = self.codes.view(-1)
        moved = flat[positions].to(torch.int16).add_(steps.to(torch.int16))
        flat[positions] = moved.clamp_(self.codec.qmin, self.codec.qmax).to(flat.dtype)

    def dequantize(self, rows: slice | None = None) -> torch.Tensor:
        """The float32 weight [N, K] (or its `rows`), filled a block of rows at a time."""
        if rows is None:
            blocks = self.row_blocks()
            if len(blocks) == 1:  # the block is the weight: no second copy
                return self.dequantize(blocks[0])
            weight = torch.empty(self.out_features, self.in_features, dtype=torch.float32, device=self.codes.device)
            for block in blocks:
                weight[block] = self.dequantize(block)
            return weight
        weight = self.code_values(rows)  # a fresh float32 tensor, scaled in place
        group_view(weight, self.group_size).mul_(self.scales[rows].to(torch.float32).unsqueeze(-1))
        return weight

    def add_dequantized(self, into: torch.Tensor, rows: slice) -> None:
        """into += the float32 weight of `rows`, codes times scales in the same pass. With bf16 scales (the default)
        a code times its scale is exact in float32, so this is `into + dequantize(rows)` bit for bit; with float32
        scales the product may be fused into the sum (one rounding instead of two)."""
        size = self.group_size or self.in_features
        groups = into.view(into.shape[0], -1, size)  # a view (raises otherwise): the sum must land in `into`
        codes = self.code_values(rows).view_as(groups)
        groups.addcmul_(codes, self.scales[rows].to(torch.float32).unsqueeze(-1))

    # --- forward ----------------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.perturbation is not None:
            weight = self.perturbation(self)
            for block in self.row_blocks():  # W + delta, added into the delta: no second full-size tensor
                self.add_dequantized(weight[block], block)
            return F.linear(x, weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        return matmul(self, x)

    def kernel_for(self, x: torch.Tensor) -> str:
        """The matmul path `forward` takes for `x` (ftkit.quant.kernels)."""
        return kernel_for(self, x)

    def drop_derived(self) -> None:
        """Forget copies derived from the codes or scales (a kernel's packed layout, its scale table): they are
        rebuilt from the stored ones when next needed. Called whenever the codes or scales are rewritten."""
        self._derived.clear()

    def extra_repr(self) -> str:
        grouping = f"group {self.group_size}" if self.group_size else "per channel"
        return f"{self.in_features}, {self.out_features}, {self.fmt}, {grouping}, bias={self.bias is not None}"

    @property
    def stored_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scales))


def step_codes_of(layers: list[QuantLinear], positions: list[torch.Tensor], steps: list[torch.Tensor]) -> None:
    """`QuantLinear.step_codes` for several layers at once: int4 layers' moves are applied together
    (ftkit.quant.packing.step_int4_layers), a read and a write per layer; others one at a time."""
    packed = [j for j, layer in enumerate(layers) if layer.codec.packed]
    is_packed = set(packed)
    for j, layer in enumerate(layers):
        if j in is_packed:
            layer.drop_derived()
        else:
            layer.step_codes(positions[j], steps[j])
    if packed:
        step_int4_layers([layers[j].codes for j in packed], [positions[j] for j in packed], [steps[j] for j in packed],
                         [layers[j].in_features for j in packed])


def _check_packed_start(rows: slice) -> None:
    if rows.start % BLOCK:
        raise ValueError(f"int4 codes are packed in blocks of {BLOCK} rows; a row range must start at a multiple of "
                         f"{BLOCK}, got {rows.start}")


def count_tensor(module: nn.Module, leaf: str, tensor: torch.Tensor):
    """The native engine's counting (ftkit.components.Engine.count): codes stand for the layer's logical weights and
    are trained when `train_codes` is set; scales are bytes, not parameters."""
    if not isinstance(module, QuantLinear) or leaf not in ("codes", "scales"):
        return None
    nbytes = tensor.numel() * tensor.element_size()
    if leaf == "codes":
        return module.in_features * module.out_features, nbytes, module.train_codes
    return 0, nbytes, False
