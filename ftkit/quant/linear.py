"""The quantized linear layer: codes and per-group parameters in real low-bit storage, no full-precision copy.

What the layer stores is its codec's (ftkit.quant.codecs): a `codes` buffer in the codec's storage (int8 codes as
torch.int8 [N, K]; int4 codes two per byte in the CPU kernel's layout, ftkit.quant.packing; FP8 codes as
torch.float8_e4m3fn / float8_e5m2 [N, K]) and one [N, groups] buffer per name in the codec's `params` (`scales`
in bf16 or fp32, and `minimums` for an asymmetric grid), all saved in checkpoints. The bias stays in full
precision. Everything else (rounding, packing, dequantizing, stepping codes) the layer asks the codec.

Forward runs one of the matmul paths of ftkit.quant.kernels, chosen per format and device from what
`scripts/bench_quant.py` measured (see BENCHMARKS.md); the dequantize path materialises only this layer's weight,
and only for the duration of the matmul.

For zeroth-order methods the layer exposes its codes, scales and codec (`code_values`, `set_code_values`,
`scales`, `codec`) and three ways to perturb it without changing its stored codes: a `perturbation` hook (a
function of the layer returning an additive weight delta, a fresh float32 tensor which the layer then owns, applied
while dequantizing); a `scale_perturbation`, a float32 delta of the scales [N, groups] for training the scales
instead (QZO): the layer dequantizes with scales s + delta, so bf16 scales are never perturbed in place; and an
`output_perturbation` (U [N, r], V [K, r], scale) for a low-rank delta scale * U V^T: the layer runs its own
low-bit kernel and adds scale * (x V) U^T, so no dense perturbed weight is ever built.

Large layers are dequantized and rewritten a block of rows at a time (`row_blocks`), so what a layer needs beyond
its codes is one float32 copy of its weight, not the several that whole-tensor unpacking and scaling would make.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ftkit.quant import FORMATS
from ftkit.quant.kernels import kernel_for, matmul
from ftkit.quant.kquants import decode_view

# Elements per block of rows when dequantizing or rewriting codes: temporaries of about 16 MiB.
BLOCK_ELEMENTS = 1 << 22
# Row blocks start at multiples of this many rows, a multiple of every codec's `row_block` (64: int4's packing).
ROW_ALIGN = 64


class QuantLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, fmt: str, group_size: int = 0, bias: bool = True,
                 scale_dtype: torch.dtype = torch.bfloat16, kernel: str = "auto", device=None):
        super().__init__()
        self.codec = FORMATS[fmt].grid()
        codes = self.codec.empty(out_features, in_features, device=device)
        block = getattr(self.codec, "block", 0)  # a format with blocks of its own (GGUF) fixes the groups
        if block and group_size not in (0, block):
            raise ValueError(f"{fmt} stores blocks of {block} weights; quant.group_size must be {block} or unset")
        group_size, scale_dtype = block or group_size, getattr(self.codec, "scale_dtype", None) or scale_dtype
        if group_size and in_features % group_size:
            raise ValueError(f"quant.group_size {group_size} does not divide in_features {in_features}")
        if ROW_ALIGN % self.codec.row_block:
            raise ValueError(f"{fmt} stores rows in blocks of {self.codec.row_block}, which must divide the layer's "
                             f"row blocks of {ROW_ALIGN}")
        self.in_features, self.out_features, self.fmt = in_features, out_features, fmt
        self.group_size, self.kernel = group_size, kernel
        self.format_kernels = FORMATS[fmt].kernels  # kernels that read this format's codes directly
        groups = in_features // group_size if group_size else 1
        self.register_buffer("codes", codes)
        if hasattr(self.codec, "empty_stored"):  # K-quants: the file's per-super-block tensors, scales derived
            for name, tensor in self.codec.empty_stored(out_features, in_features, device).items():
                self.register_buffer(name, tensor)
        else:
            for name in self.codec.params:  # scales start at one, minimums (asymmetric grids) at zero
                fill = torch.ones if name == "scales" else torch.zeros
                self.register_buffer(name, fill(out_features, groups, dtype=scale_dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None
        self.perturbation: Optional[Callable[[QuantLinear], torch.Tensor]] = None
        self.output_perturbation: Optional[tuple[torch.Tensor, torch.Tensor, float]] = None  # (U, V, scale)
        # Whether a zeroth-order method updates the codes (full-parameter QuZO; set by its `prepare`). The codes are
        # a buffer, so this stands in for requires_grad: counting and the zeroth-order targets read it.
        self.train_codes = False
        # The same for the scales (method.zo.low_bit: scales), and the delta a perturbed forward adds to them.
        self.train_scales = False
        self.scale_perturbation: Optional[torch.Tensor] = None
        self._derived: dict = {}  # kernel layouts of the codes and scales (ftkit.quant.kernels), rebuilt on demand
        self._derived_params: tuple | None = None  # (key, {name: tensor}): a K-quant's scales from its stored tensors

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:  # a K-quant's scales and minimums are derived from what it stores
            codec = self.__dict__.get("codec")
            if hasattr(codec, "derive") and name in codec.params:
                return self.derived_params()[name]
            raise

    @property
    def stored_names(self) -> tuple[str, ...]:
        """The buffers beside the codes that the layer stores, checkpoints and counts: its codec's `params`, or a
        K-quant's per-super-block tensors (from which its params are derived)."""
        return getattr(self.codec, "stored_names", self.codec.params)

    def stored_params(self, rows: slice | None = None) -> dict:
        rows = rows or slice(0, self.out_features)
        return {name: getattr(self, name)[rows] for name in self.stored_names}

    def derived_params(self) -> dict:
        """A K-quant's float32 per-group tensors (`scales` as updates read them, `minimums`; ftkit.quant.kquants),
        cached until one of its stored tensors changes (their version counters)."""
        stored = {name: getattr(self, name) for name in self.stored_names}
        key = tuple((t._version, t.data_ptr()) for t in stored.values())
        if self._derived_params is None or self._derived_params[0] != key:
            with torch.inference_mode(False), torch.no_grad():  # a cache outlives the forward that built it
                self._derived_params = (key, self.codec.derive(stored))
        return self._derived_params[1]

    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt: str, group_size: int = 0, scale_method: str = "absmax",
                    rounding: str = "nearest", scale_dtype: torch.dtype = torch.bfloat16, kernel: str = "auto",
                    generator: torch.Generator | None = None) -> "QuantLinear":
        layer = cls(linear.in_features, linear.out_features, fmt, group_size, linear.bias is not None, scale_dtype,
                    kernel, device=linear.weight.device)
        group_size, scale_dtype = layer.group_size, layer.scales.dtype
        with torch.no_grad():
            weight = linear.weight.detach().to(torch.float32)
            grid_values, params = layer.codec.encode(weight, group_size, scale_method, scale_dtype, rounding,
                                                     generator)
            for name, value in params.items():
                getattr(layer, name).copy_(value)
            layer.set_code_values(grid_values)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias.detach().to(torch.float32))
        return layer

    # --- codes ------------------------------------------------------------------------------------------------

    def row_blocks(self) -> list[slice]:
        """Consecutive row ranges of about BLOCK_ELEMENTS elements, each starting at a multiple of ROW_ALIGN (64
        rows), so every range maps onto whole blocks of stored rows."""
        rows = max(ROW_ALIGN, BLOCK_ELEMENTS // self.in_features // ROW_ALIGN * ROW_ALIGN)
        return [slice(start, min(start + rows, self.out_features)) for start in range(0, self.out_features, rows)]

    def stored_rows(self, rows: slice) -> slice:
        """The rows of the `codes` buffer that hold the codes of `rows` (which starts at a multiple of the codec's
        `row_block`): whole blocks, the last one padded."""
        block = self.codec.row_block
        if rows.start % block:
            raise ValueError(f"{self.fmt} codes are stored in blocks of {block} rows; a row range must start at a "
                             f"multiple of {block}, got {rows.start}")
        return slice(rows.start, rows.start + -(-(rows.stop - rows.start) // block) * block)

    def group_params(self, rows: slice | None = None, scale_delta: torch.Tensor | None = None) -> dict:
        """The codec's per-group tensors (scales, minimums) by name, of all rows or of `rows`; with `scale_delta`
        ([N, groups] float32), the scales are float32 s + delta."""
        rows = rows or slice(0, self.out_features)
        params = {name: getattr(self, name)[rows] for name in self.codec.params}
        if hasattr(self.codec, "derive"):  # a K-quant's sub-blocks of scale 0 decode with 0 (ftkit.quant.kquants)
            params["scales"] = decode_view(params["scales"])
        if scale_delta is not None:
            params["scales"] = params["scales"].to(torch.float32) + scale_delta[rows]
        return params

    def code_values(self, rows: slice | None = None) -> torch.Tensor:
        """Grid values [N, K] (or of `rows`) as float32 (integers for int formats, FP8 values for FP8)."""
        rows = rows or slice(0, self.out_features)
        return self.codec.unpack(self.codes[self.stored_rows(rows)], rows.stop - rows.start, self.in_features)

    def set_code_values(self, grid_values: torch.Tensor, rows: slice | None = None) -> None:
        """Store grid values [N, K] (or of `rows`; already on the codec's grid) into the codes buffer, in place."""
        rows = rows or slice(0, self.out_features)
        self.drop_derived()
        self.codec.pack(grid_values, out=self.codes[self.stored_rows(rows)])

    def step_codes(self, positions: torch.Tensor, steps: torch.Tensor) -> None:
        """Move the codes at flat `positions` (row * K + column, distinct) by `steps` whole grid steps, clamped to
        the grid's range, in place, reading and writing only those codes (integer grids)."""
        step_codes_of([self], [positions], [steps])

    def dequantize(self, rows: slice | None = None, scale_delta: torch.Tensor | None = None) -> torch.Tensor:
        """The float32 weight [N, K] (or its `rows`), filled a block of rows at a time; with `scale_delta`, the
        weight of scales s + delta (see `group_params`)."""
        if rows is None:
            blocks = self.row_blocks()
            if len(blocks) == 1:  # the block is the weight: no second copy
                return self.dequantize(blocks[0], scale_delta)
            weight = torch.empty(self.out_features, self.in_features, dtype=torch.float32, device=self.codes.device)
            for block in blocks:
                weight[block] = self.dequantize(block, scale_delta)
            return weight
        # code_values gives a fresh float32 tensor, which the codec turns into weights in place
        return self.codec.decode(self.code_values(rows), self.group_params(rows, scale_delta), self.group_size)

    def add_dequantized(self, into: torch.Tensor, rows: slice, scale_delta: torch.Tensor | None = None) -> None:
        """into += the float32 weight of `rows`, in the same pass as decoding where the codec can (see
        ftkit.quant.codecs.scale_groups: bit for bit `into + dequantize(rows)` with bf16 scales)."""
        self.codec.decode(self.code_values(rows), self.group_params(rows, scale_delta), self.group_size, into=into)

    # --- forward ----------------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.perturbation is None and self.scale_perturbation is None:
            out = matmul(self, x)
        else:  # perturbed weights or scales: the kernels read the stored ones, so dequantize
            weight = self.perturbed_weight()
            out = F.linear(x, weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        if self.output_perturbation is not None:  # x (W + scale U V^T)^T = x W^T + scale (x V) U^T
            out = add_low_rank(out, x, *self.output_perturbation)
        return out

    def perturbed_weight(self) -> torch.Tensor:
        """The float32 weight under `perturbation` and `scale_perturbation`."""
        scale_delta = self.scale_perturbation
        if self.perturbation is None:
            return self.dequantize(scale_delta=scale_delta)
        weight = self.perturbation(self)
        for block in self.row_blocks():  # W + delta, added into the delta: no second full-size tensor
            self.add_dequantized(weight[block], block, scale_delta)
        return weight

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
        return sum(t.numel() * t.element_size() for t in (self.codes, *self.stored_params().values()))


def add_low_rank(out: torch.Tensor, x: torch.Tensor, u: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """out + scale (x V) U^T, for x [..., K], V [K, r], U [N, r]. On the CPU it runs on one thread: its work is
    r (1/N + 1/K) of the layer's matmul, and on a busy machine waking the other threads for each of its two products
    costs more than the products (measured on SmolLM2-135M, 210 layers: 0.03 s a forward on one thread against
    0.7-1.0 s on two; BENCHMARKS.md, "Low-rank directions: step cost")."""
    threads = torch.get_num_threads() if x.device.type == "cpu" else 1
    if threads > 1:
        torch.set_num_threads(1)
    try:
        low = x.reshape(-1, x.shape[-1]).mm(v.to(x.dtype))
        return torch.addmm(out.reshape(low.shape[0], -1), low, u.to(x.dtype).T, alpha=scale).view(out.shape)
    finally:
        if threads > 1:
            torch.set_num_threads(threads)


def step_codes_of(layers: list[QuantLinear], positions: list[torch.Tensor], steps: list[torch.Tensor]) -> None:
    """`QuantLinear.step_codes` for several layers at once: the layers of one codec are moved together by it (int4:
    all their moves' arithmetic at once, then a read and a write per layer)."""
    by_codec: dict[int, tuple] = {}
    for layer, where, by in zip(layers, positions, steps):
        if getattr(layer.codec, "step", None) is None:
            raise ValueError(f"{layer.fmt} codes are not on a uniform grid; whole grid steps are not defined")
        layer.drop_derived()
        by_codec.setdefault(id(layer.codec), (layer.codec, []))[1].append((layer, where, by))
    for codec, moves in by_codec.values():
        codec.step([layer.codes for layer, _, _ in moves], [where for _, where, _ in moves],
                   [by for _, _, by in moves], [layer.in_features for layer, _, _ in moves])


def count_tensor(module: nn.Module, leaf: str, tensor: torch.Tensor):
    """The native engine's counting (ftkit.components.Engine.count): codes stand for the layer's logical weights and
    are trained when `train_codes` is set; the codec's per-group tensors (scales, minimums) are bytes, not
    parameters, unless the scales are trained (`train_scales`): then each scale is a trained parameter. Bytes are
    those of the storage the codec made (int4: half a byte per weight, rows padded to 64)."""
    if not isinstance(module, QuantLinear) or (leaf != "codes" and leaf not in module.stored_names):
        return None
    nbytes = tensor.numel() * tensor.element_size()
    if leaf == "codes":
        return module.in_features * module.out_features, nbytes, module.train_codes
    if leaf == "scales" and module.train_scales:
        return tensor.numel(), nbytes, True
    return 0, nbytes, False
