"""The quantized linear layer: codes and scales in real low-bit storage, no full-precision copy of the weight.

Storage (buffers, saved in checkpoints): int8 codes as torch.int8 [N, K]; int4 codes packed two per byte in the
CPU kernel's layout (ftkit.quant.packing); FP8 codes as torch.float8_e4m3fn / float8_e5m2 [N, K]; scales [N, groups]
in bf16 or fp32. The bias stays in full precision.

Forward runs one of the matmul kernels below, chosen per format by `scripts/bench_quant.py` (see BENCHMARKS.md);
the dequantize path materialises only this layer's weight, and only for the duration of the matmul.

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
from ftkit.quant.packing import BLOCK, pack_int4, padded_rows, unpack_int4
from ftkit.quant.scales import compute_scales, group_view

# Below this many input rows (tokens) the packed int4 kernel beats dequantize + fp32 matmul on CPU.
SMALL_BATCH_ROWS = 512
# Elements per block of rows when dequantizing or rewriting codes: temporaries of about 16 MiB.
BLOCK_ELEMENTS = 1 << 22
# Group sizes PyTorch's CPU int4 kernel accepts.
INT4_KERNEL_GROUPS = (32, 64, 128, 256)


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
            return unpack_int4(packed, count, self.in_features).to(torch.float32)
        return self.codec.decode(self.codes[rows])

    def set_code_values(self, grid_values: torch.Tensor, rows: slice | None = None) -> None:
        """Store grid values [N, K] (or of `rows`; already on the codec's grid) into the codes buffer, in place."""
        rows = rows or slice(0, self.out_features)
        codes = self.codec.encode(grid_values)
        if self.codec.packed:
            _check_packed_start(rows)
            packed = pack_int4(codes)
            self.codes[rows.start: rows.start + packed.shape[0]].copy_(packed)
        else:
            self.codes[rows].copy_(codes)

    def dequantize(self, rows: slice | None = None) -> torch.Tensor:
        """The float32 weight [N, K] (or its `rows`), filled a block of rows at a time."""
        if rows is None:
            weight = torch.empty(self.out_features, self.in_features, dtype=torch.float32, device=self.codes.device)
            for block in self.row_blocks():
                weight[block] = self.dequantize(block)
            return weight
        weight = self.code_values(rows)  # a fresh float32 tensor, scaled in place
        group_view(weight, self.group_size).mul_(self.scales[rows].to(torch.float32).unsqueeze(-1))
        return weight

    # --- forward ----------------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.perturbation is not None:
            weight = self.perturbation(self)
            for block in self.row_blocks():  # W + delta, added into the delta: no second full-size tensor
                weight[block].add_(self.dequantize(block))
            return F.linear(x, weight.to(x.dtype), _cast(self.bias, x.dtype))
        return KERNELS[self.kernel_for(x)](self, x)

    def kernel_for(self, x: torch.Tensor) -> str:
        """The matmul path for this input. `auto` follows what scripts/bench_quant.py measured (BENCHMARKS.md): on
        CPU, int4's packed kernel below SMALL_BATCH_ROWS rows (it wins for few rows and loses for many), int8's
        packed kernel with bf16 activations, dequantize otherwise (weight-only numerics); `_int_mm` (int8
        activations) is opt-in: quant.kernel=int_mm."""
        if torch.is_grad_enabled() and x.requires_grad:
            return "dequantize"  # backprop to the input: the packed kernels have no derivative
        if self.kernel != "auto":
            return self.kernel
        if x.device.type == "cpu":
            rows = x.numel() // x.shape[-1]
            if "int4pack" in self.format_kernels and rows < SMALL_BATCH_ROWS and self._int4_group() is not None:
                return "int4pack"
            # _weight_int8pack_mm is fast only with bf16 activations (with fp32 ones it is ~40x slower than
            # dequantize + matmul; see BENCHMARKS.md).
            if "int8pack" in self.format_kernels and self.scales.shape[1] == 1 and x.dtype == torch.bfloat16:
                return "int8pack"
        if x.device.type == "cuda" and "scaled_mm" in self.format_kernels and self.scales.shape[1] == 1:
            return "scaled_mm"
        return "dequantize"

    def _int4_group(self) -> int | None:
        if self.group_size in INT4_KERNEL_GROUPS:
            return self.group_size
        if self.group_size == 0:  # per channel: repeat the row's scale over kernel-sized groups
            return next((g for g in reversed(INT4_KERNEL_GROUPS) if self.in_features % g == 0), None)
        return None

    def extra_repr(self) -> str:
        grouping = f"group {self.group_size}" if self.group_size else "per channel"
        return f"{self.in_features}, {self.out_features}, {self.fmt}, {grouping}, bias={self.bias is not None}"

    @property
    def stored_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scales))


def _check_packed_start(rows: slice) -> None:
    if rows.start % BLOCK:
        raise ValueError(f"int4 codes are packed in blocks of {BLOCK} rows; a row range must start at a multiple of "
                         f"{BLOCK}, got {rows.start}")


def _cast(bias, dtype):
    return None if bias is None else bias.to(dtype)


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def _dequantize_matmul(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, layer.dequantize().to(x.dtype), _cast(layer.bias, x.dtype))


def _int8pack_matmul(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    out = torch.ops.aten._weight_int8pack_mm(_flat(x), layer.codes, layer.scales[:, 0].to(x.dtype))
    out = out.view(*x.shape[:-1], layer.out_features)
    return out if layer.bias is None else out + layer.bias.to(x.dtype)


def _int_mm_matmul(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """int8 x int8 -> int32 with activations quantized per row on the fly (W8A8 numerics)."""
    flat = _flat(x).to(torch.float32)
    x_scale = flat.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127.0
    x_codes = torch.round(flat / x_scale).to(torch.int8)
    acc = torch._int_mm(x_codes, layer.codes.t())
    out = acc.to(torch.float32) * x_scale * layer.scales[:, 0].to(torch.float32)
    out = out.to(x.dtype).view(*x.shape[:-1], layer.out_features)
    return out if layer.bias is None else out + layer.bias.to(x.dtype)


def _int4_scales_and_zeros(layer: QuantLinear, group: int) -> torch.Tensor:
    """The kernel's [groups, padded N, 2] bf16 table of scales and zero points (zero: codes are symmetric).

    Cached on the layer until its scales change (tracked by the tensor's version counter)."""
    cached = getattr(layer, "_int4_table", None)
    if cached is not None and cached[0] == (layer.scales._version, layer.scales.data_ptr()):
        return cached[1]
    scales = layer.scales.to(torch.bfloat16)
    if layer.group_size == 0:
        scales = scales.expand(-1, layer.in_features // group)
    rows = layer.codes.shape[0]
    if rows != layer.out_features:  # padded rows get scale 0
        scales = torch.cat([scales, scales.new_zeros(rows - layer.out_features, scales.shape[1])])
    table = torch.stack([scales, torch.zeros_like(scales)], dim=2).transpose(0, 1).contiguous()
    layer._int4_table = ((layer.scales._version, layer.scales.data_ptr()), table)
    return table


def _int4pack_matmul(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    group = layer._int4_group()
    out = torch.ops.aten._weight_int4pack_mm_for_cpu(_flat(x).to(torch.bfloat16), layer.codes, group,
                                                     _int4_scales_and_zeros(layer, group))
    out = out[:, : layer.out_features].to(x.dtype).view(*x.shape[:-1], layer.out_features)
    return out if layer.bias is None else out + layer.bias.to(x.dtype)


def _scaled_mm_matmul(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """FP8 on GPUs: activations quantized per row to the weight's format, one fused scaled matmul."""
    flat = _flat(x).to(torch.float32)
    x_scale = (flat.abs().amax(dim=1, keepdim=True) / layer.codec.max_value).clamp(min=1e-12)
    x_fp8 = (flat / x_scale).to(layer.codec.storage_dtype)
    out = torch._scaled_mm(x_fp8, layer.codes.t(), scale_a=x_scale, scale_b=layer.scales.to(torch.float32).t(),
                           out_dtype=torch.bfloat16)
    out = out.to(x.dtype).view(*x.shape[:-1], layer.out_features)
    return out if layer.bias is None else out + layer.bias.to(x.dtype)


KERNELS = {
    "dequantize": _dequantize_matmul,
    "int8pack": _int8pack_matmul,
    "int_mm": _int_mm_matmul,
    "int4pack": _int4pack_matmul,
    "scaled_mm": _scaled_mm_matmul,
}


def count_tensor(module: nn.Module, leaf: str, tensor: torch.Tensor):
    """The native engine's counting (ftkit.components.Engine.count): codes stand for the layer's logical weights and
    are trained when `train_codes` is set; scales are bytes, not parameters."""
    if not isinstance(module, QuantLinear) or leaf not in ("codes", "scales"):
        return None
    nbytes = tensor.numel() * tensor.element_size()
    if leaf == "codes":
        return module.in_features * module.out_features, nbytes, module.train_codes
    return 0, nbytes, False
