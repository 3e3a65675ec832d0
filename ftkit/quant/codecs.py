"""Weight grids: int8, int4 and the FP8 formats, with nearest and stochastic rounding.

A codec works in the *scaled* domain: a weight w with scale s is the grid value x = w / s. `round` puts x on the
grid (nearest, or stochastically with P(up) = distance to the lower grid point / grid spacing, which makes the
rounding unbiased), `encode` turns grid values into the storage dtype and `decode` back into float32.

Stochastic rounding draws from an explicit `torch.Generator`, one uniform float32 per element: its 24 random bits
decide the direction, so two generators give independent roundings and a seed replays one exactly. Callers with
their own noise (the zeroth-order update, ftkit.optim.zo_streams) pass it as `noise`: uniform in [0, 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class IntCodec:
    """Signed integers qmin..qmax; the scale maps a group's absolute maximum to qmax (symmetric). `packed` codes are
    stored two per byte (4 bits) in the layout of ftkit.quant.packing."""

    name: str
    bits: int
    packed: bool = False

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1))

    @property
    def max_value(self) -> float:
        return float(self.qmax)

    @property
    def storage_dtype(self) -> torch.dtype:
        return torch.int8  # packed codes are unpacked to this

    def round(self, x: torch.Tensor, mode: str = "nearest", generator: torch.Generator | None = None,
              noise: torch.Tensor | None = None) -> torch.Tensor:
        if mode == "nearest":
            out = torch.round(x)
        else:
            out = torch.floor(x + (uniform_like(x, generator) if noise is None else noise))
        return out.clamp_(self.qmin, self.qmax)

    def encode(self, grid_values: torch.Tensor) -> torch.Tensor:
        return grid_values.to(torch.int8)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return codes.to(torch.float32)

    def spacing(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(x)


@dataclass(frozen=True)
class FP8Codec:
    """A float8 format: the scale maps a group's absolute maximum to the format's largest finite value.

    Rounding saturates at that maximum (never inf or NaN). Normal numbers keep `mantissa_bits` bits below the
    leading one; below the smallest normal the grid is uniform (subnormals).
    """

    name: str
    dtype: torch.dtype
    mantissa_bits: int
    exponent_bias: int
    packed: bool = False

    @property
    def max_value(self) -> float:
        return float(torch.finfo(self.dtype).max)

    @property
    def min_normal_exponent(self) -> int:
        return 1 - self.exponent_bias

    @property
    def subnormal_spacing(self) -> float:
        return 2.0 ** (self.min_normal_exponent - self.mantissa_bits)

    @property
    def storage_dtype(self) -> torch.dtype:
        return self.dtype

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

    def encode(self, grid_values: torch.Tensor) -> torch.Tensor:
        return grid_values.to(self.dtype)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return codes.to(torch.float32)

    def spacing(self, x: torch.Tensor) -> torch.Tensor:
        """Distance between the two grid points around x (for tests and variance bounds)."""
        magnitude = x.abs().clamp(min=2.0 ** self.min_normal_exponent)
        exponent = torch.floor(torch.log2(magnitude))
        return torch.pow(2.0, exponent - self.mantissa_bits)


def uniform_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(x.shape, generator=generator, device=x.device, dtype=torch.float32)


INT8 = IntCodec("int8", 8)
INT4 = IntCodec("int4", 4, packed=True)
FP8_E4M3 = FP8Codec("fp8_e4m3", torch.float8_e4m3fn, mantissa_bits=3, exponent_bias=7)
FP8_E5M2 = FP8Codec("fp8_e5m2", torch.float8_e5m2, mantissa_bits=2, exponent_bias=15)

# The built-in grids by format name (ftkit.quant.FORMATS declares them).
CODECS = {codec.name: codec for codec in (INT8, INT4, FP8_E4M3, FP8_E5M2)}
