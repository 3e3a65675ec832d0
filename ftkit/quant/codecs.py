"""Codecs: everything ftkit knows of a low-bit weight format, asked by the quantized layer (ftkit.quant.linear), its
kernels, zeroth-order updates, counting, checkpoints and export. The built-in ones: int8, int4 and the FP8 formats
(GGUF's blocks, ftkit.quant.gguf_blocks, are integer codecs with llama.cpp's quantizers);
ftkit.quant.FORMATS names each format's codec (the one list of them).

A codec declares:

    grid         round(x, mode, generator=None, noise=None) -> grid values (float32); spacing(x) -> distance
                 between the grid points around x. It works in the *scaled* domain: a weight w of group g is the
                 grid value x = (w - minimum_g) / scale_g (minimum 0 for a symmetric grid).
    parameters   `params`: the names of the per-group tensors a layer stores beside its codes, [N, groups] each,
                 scales first: ("scales",), or ("scales", "minimums") for an asymmetric grid.
                 encode(weight, group_size, method, dtype, rounding, generator) -> (grid values [N, K] float32,
                 {name: [N, groups] tensor in dtype}); decode(x, params, group_size, into=None) -> the weights of
                 grid values x (computed in place on x), or added into `into`.
    storage      `bits` per code; `row_block`: stored rows come in blocks of this many, so a range of rows read or
                 written starts at a multiple of it; empty(rows, cols, device) -> zero storage of [rows, cols]
                 codes (its bytes are what the layer stores and counts); pack(x, out) writes grid values [n, K]
                 into storage rows `out` (shaped as empty(n, K)); unpack(stored, rows, cols) -> float32 grid values.
    steps        step(stored, positions, steps, cols) (integer grids only; the lists of several layers' storage):
                 move codes at flat positions by whole grid steps, clamped to the grid, in place.

Stochastic rounding draws from an explicit `torch.Generator`, one uniform float32 per element: its 24 random bits
decide the direction, so two generators give independent roundings and a seed replays one exactly. Callers with
their own noise (the zeroth-order update, ftkit.optim.zo_streams) pass it as `noise`: uniform in [0, 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ftkit.quant.bitplanes import CodeStorage
from ftkit.quant.packing import BLOCK, pack_nibbles, padded_rows, step_nibbles, unpack_codes
from ftkit.quant.scales import compute_scales, group_view


@dataclass(frozen=True)
class IntCodec:
    """Signed integers qmin..qmax; the scale maps a group's absolute maximum to qmax (symmetric). Codes are stored
    one per int8 byte, or `packed` two per byte (bits <= 4) in the layout of ftkit.quant.packing, or in a `storage`
    of their own (ftkit.quant.bitplanes: five bits a code), which holds code - qmin.

    A format with a quantizer of its own (GGUF's blocks, ftkit.quant.gguf_blocks) sets `encoder`, and may fix the
    group size (`block`) and the scales' dtype; `signed=False` is the grid 0..2^bits - 1 with a per-group minimum
    (w = minimum + code * scale)."""

    name: str
    bits: int
    packed: bool = False
    signed: bool = True
    block: int = 0  # the format's own group size (0: quant.group_size)
    scale_dtype: Optional[torch.dtype] = None  # the format's own scale dtype (None: quant.scale_dtype)
    encoder: Optional[Callable] = None  # encoder(codec, weight, group_size, rounding, generator) -> as `encode`
    storage: Optional[CodeStorage] = None  # where codes are neither bytes nor packed nibbles

    @property
    def params(self) -> tuple[str, ...]:
        return ("scales",) if self.signed else ("scales", "minimums")

    def __post_init__(self):
        if self.packed and self.bits > 4:
            raise ValueError(f"{self.name}: {self.bits}-bit codes do not fit two per byte")

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2 ** self.bits - 1

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.signed else 0

    @property
    def max_value(self) -> float:
        return float(self.qmax)

    @property
    def row_block(self) -> int:
        return BLOCK if self.packed else 1

    def round(self, x: torch.Tensor, mode: str = "nearest", generator: torch.Generator | None = None,
              noise: torch.Tensor | None = None) -> torch.Tensor:
        return round_to_integers(x, self.qmin, self.qmax, mode, generator, noise)

    def spacing(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(x)

    def encode(self, weight, group_size, method="absmax", dtype=torch.bfloat16, rounding="nearest", generator=None):
        if self.encoder is not None:
            return self.encoder(self, weight, self.block or group_size, rounding, generator)
        return encode_symmetric(self, weight, group_size, method, dtype, rounding, generator)

    def decode(self, x, params, group_size, into=None):
        return scale_groups(x, params, self.block or group_size, into)

    def empty(self, rows: int, cols: int, device=None) -> torch.Tensor:
        if self.storage is not None:
            return self.storage.empty(rows, cols, device)
        if self.packed:
            if cols % 2:
                raise ValueError(f"{self.name} needs an even number of input features, got {cols}")
            return torch.zeros(padded_rows(rows), cols // 2, dtype=torch.uint8, device=device)
        return torch.zeros(rows, cols, dtype=torch.int8, device=device)

    def pack(self, x: torch.Tensor, out: torch.Tensor) -> None:
        if self.storage is not None:
            self.storage.pack(x, -self.qmin, out)
        elif self.packed:  # nibbles hold code - qmin: int4's -8..7 as 0..15, unsigned codes as they are
            pack_nibbles(x, -self.qmin, out=out)
        else:
            out.copy_(x.to(torch.int8))

    def unpack(self, stored: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        if self.storage is not None:
            return self.storage.unpack(stored, rows, cols, -self.qmin)
        if self.packed:
            return unpack_codes(stored, rows, cols, -self.qmin, torch.float32)
        return stored.to(torch.float32)

    def step(self, stored: list[torch.Tensor], positions: list[torch.Tensor], steps: list[torch.Tensor],
             cols: list[int]) -> None:
        if self.storage is not None:  # in stored values, code - qmin
            self.storage.step(stored, positions, steps, cols, 0, self.qmax - self.qmin)
            return
        if self.packed:  # all layers' moves at once: one read and one write of the touched bytes per layer
            step_nibbles(stored, positions, steps, cols, 0, self.qmax - self.qmin)
            return
        for codes, where, by in zip(stored, positions, steps):
            flat = codes.view(-1)
            moved = flat[where].to(torch.int16).add_(by.to(torch.int16))
            flat[where] = moved.clamp_(self.qmin, self.qmax).to(flat.dtype)


@dataclass(frozen=True)
class FloatCodec:
    """A float format narrower than float32 (the float8 formats; bfloat16 and float16 as the grids of trained
    scales, `round_to_dtype`): the scale maps a group's absolute maximum to the format's largest finite value.

    Rounding saturates at that maximum (never inf or NaN). Normal numbers keep `mantissa_bits` bits below the
    leading one; below the smallest normal the grid is uniform (subnormals). Codes are stored as the float8 dtype.
    """

    name: str
    dtype: torch.dtype
    mantissa_bits: int
    exponent_bias: int
    bits = 8
    row_block = 1
    params = ("scales",)

    @property
    def max_value(self) -> float:
        return float(torch.finfo(self.dtype).max)

    @property
    def min_normal_exponent(self) -> int:
        return 1 - self.exponent_bias

    @property
    def subnormal_spacing(self) -> float:
        return 2.0 ** (self.min_normal_exponent - self.mantissa_bits)

    def round(self, x: torch.Tensor, mode: str = "nearest", generator: torch.Generator | None = None,
              noise: torch.Tensor | None = None) -> torch.Tensor:
        x = x.to(torch.float32).clamp(-self.max_value, self.max_value)
        if mode == "nearest":
            return x.to(self.dtype).to(torch.float32)  # the cast rounds to nearest, ties to even
        u = uniform_like(x, generator) if noise is None else noise
        # Normal range: add random bits below the kept mantissa and truncate them. On the sign-magnitude float32
        # pattern this rounds the magnitude up with probability equal to the dropped fraction; a carry moves into
        # the next binade, which is the correct upper neighbour.
        dropped = 23 - self.mantissa_bits
        noise = (u * float(2**dropped)).to(torch.int32)
        bits = x.view(torch.int32)
        normal = ((bits + noise) & ~((1 << dropped) - 1)).view(torch.float32)
        # Subnormal range: a uniform grid.
        step = self.subnormal_spacing
        subnormal = torch.sign(x) * torch.floor(x.abs() / step + u) * step
        is_normal = x.abs() >= 2.0 ** self.min_normal_exponent
        return torch.where(is_normal, normal, subnormal).clamp_(-self.max_value, self.max_value)

    def spacing(self, x: torch.Tensor) -> torch.Tensor:
        """Distance between the two grid points around x (for tests and variance bounds)."""
        magnitude = x.abs().clamp(min=2.0 ** self.min_normal_exponent)
        exponent = torch.floor(torch.log2(magnitude))
        return torch.pow(2.0, exponent - self.mantissa_bits)

    def encode(self, weight, group_size, method="absmax", dtype=torch.bfloat16, rounding="nearest", generator=None):
        return encode_symmetric(self, weight, group_size, method, dtype, rounding, generator)

    def decode(self, x, params, group_size, into=None):
        return scale_groups(x, params, group_size, into)

    def empty(self, rows: int, cols: int, device=None) -> torch.Tensor:
        return torch.zeros(rows, cols, dtype=self.dtype, device=device)

    def pack(self, x: torch.Tensor, out: torch.Tensor) -> None:
        out.copy_(x.to(self.dtype))

    def unpack(self, stored: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        return stored.to(torch.float32)


# The built-in codecs; ftkit.quant.FORMATS names each by its format (the one list of formats).
INT8 = IntCodec("int8", 8)
INT4 = IntCodec("int4", 4, packed=True)
FP8_E4M3 = FloatCodec("fp8_e4m3", torch.float8_e4m3fn, mantissa_bits=3, exponent_bias=7)
FP8_E5M2 = FloatCodec("fp8_e5m2", torch.float8_e5m2, mantissa_bits=2, exponent_bias=15)


# The grids of trained scales (QZO's scale space, ftkit.optim.zo_targets.ScaleTarget): bf16, and float16 (GGUF's).
SCALE_GRIDS = {torch.bfloat16: FloatCodec("bfloat16", torch.bfloat16, mantissa_bits=7, exponent_bias=127),
               torch.float16: FloatCodec("float16", torch.float16, mantissa_bits=10, exponent_bias=15)}


def round_to_dtype(x: torch.Tensor, dtype: torch.dtype, mode: str = "nearest",
                   noise: torch.Tensor | None = None) -> torch.Tensor:
    """float32 `x` onto the grid of `dtype`, as `dtype`: to nearest (the cast), or stochastically with `noise`
    uniform in [0, 1), unbiased, as a float codec rounds (FloatCodec.round). float32 is its own grid."""
    if dtype == torch.float32 or mode == "nearest":
        return x.to(dtype)
    if dtype not in SCALE_GRIDS:
        raise ValueError(f"stochastic rounding onto {dtype} is not defined here (bfloat16, float16 or float32)")
    return SCALE_GRIDS[dtype].round(x, "stochastic", noise=noise.view_as(x)).to(dtype)


# --- shared by codecs -------------------------------------------------------------------------------------------

def uniform_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(x.shape, generator=generator, device=x.device, dtype=torch.float32)


def round_to_integers(x: torch.Tensor, low: int, high: int, mode: str = "nearest",
                      generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
    """x onto the integers low..high: nearest, or stochastically (P(up) = x - floor(x), unbiased)."""
    if mode == "nearest":
        out = torch.round(x)
    else:
        out = torch.floor(x + (uniform_like(x, generator) if noise is None else noise))
    return out.clamp_(low, high)


def encode_symmetric(codec, weight: torch.Tensor, group_size: int, method: str, dtype: torch.dtype, rounding: str,
                     generator: torch.Generator | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Grid values and scales of a symmetric grid: each group's scale maps its absolute maximum (or the clipping
    an MSE search chose, ftkit.quant.scales) to the codec's `max_value`."""
    weight = weight.to(torch.float32)
    scales = compute_scales(weight, codec, group_size, method, dtype)
    x = group_view(weight, group_size) / scales.to(torch.float32).unsqueeze(-1)
    return codec.round(x, rounding, generator).reshape(weight.shape), {"scales": scales}


def scale_groups(x: torch.Tensor, params: dict[str, torch.Tensor], group_size: int,
                 into: torch.Tensor | None = None) -> torch.Tensor:
    """Weights from grid values [n, K]: x * scale (+ minimum) of each group, computed in place on x; or, with `into`,
    added into it. Without minimums the product is fused into the sum: exactly `into + decode(x)` when a code times
    its scale is exact in float32, as with bf16 scales (with float32 scales one rounding instead of two)."""
    scales = params["scales"].to(torch.float32).unsqueeze(-1)
    minimums = params.get("minimums")
    if into is not None and minimums is None:
        groups = into.view(into.shape[0], -1, group_size or into.shape[1])  # a view: the sum must land in `into`
        groups.addcmul_(x.view_as(groups), scales)
        return into
    groups = group_view(x, group_size).mul_(scales)
    if minimums is not None:
        groups.add_(minimums.to(torch.float32).unsqueeze(-1))
    return x if into is None else into.add_(x)
