"""GGUF's K-quants as codecs: Q4_K and Q6_K, super-blocks of 256 weights of a row, as llama.cpp stores them.

    Q4_K  float16 d and dmin; 8 sub-blocks of 32, each a 6-bit scale sc and a 6-bit minimum m (12 bytes for the
          16 of them); codes q 0..15;  w = (d sc) q - (dmin m)                              144 bytes per 256
    Q6_K  float16 d; 16 sub-blocks of 16, each an int8 scale sc; codes q 0..63;  w = (d sc) (q - 32)
                                                                                            210 bytes per 256

A layer stores what the file stores: its codes, d (and dmin) per super-block and the sub-block scales (Q4_K's
packed six bits to a value, as the file packs them): these are its buffers, counted and checkpointed. The codes
are Q4_K's q (0..15, ftkit's packed nibbles, as Q4_1's) and Q6_K's q - 32 (-32..31, one int8 each: 8 bits a code
where the file spends 6, so a Q6_K layer holds 274 bytes per 256 weights, which is what it counts).

Decoding, the updates of zeroth-order training and the int4 kernel read one float32 scale per sub-block, d * sc,
and Q4_K's minimum -(dmin * m) (ftkit's w = code * scale + minimum): the codec derives them from the stored
tensors (`derive`), and the layer caches them until the stored tensors change. Each product is float32, as
gguf.quants.dequantize computes it, so the weights are the file's bit for bit. A sub-block whose scale is 0 decodes
to its minimum whatever its codes: no step of its codes moves a weight, so the scales the updates read
(`layer.scales`) hold an infinity there, with the zero's sign, (every update is 0 grid steps) while decoding uses 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ftkit.quant.codecs import IntCodec

SUPER_BLOCK = 256


@dataclass(frozen=True)
class KQuantCodec(IntCodec):
    """An IntCodec whose per-group scales (and minimums) are derived from what the file stores per super-block:
    `stored` names those tensors as (name, dtype, values per super-block), `derive(stored) -> {param: float32
    [N, groups]}` computes the exact per-sub-block scales and minimums from them."""

    stored: tuple = ()
    derive: Optional[Callable] = None

    @property
    def stored_names(self) -> tuple[str, ...]:
        return tuple(name for name, _, _ in self.stored)

    def _check(self, cols: int) -> None:
        if cols % SUPER_BLOCK:
            raise ValueError(f"{self.name} stores super-blocks of {SUPER_BLOCK} weights along each row, and "
                             f"{cols} input features are not a multiple of {SUPER_BLOCK} (list the layer in "
                             f"quant.skip, or use q5_0 / q8_0 for it, as llama.cpp does)")

    def empty_stored(self, rows: int, cols: int, device=None) -> dict[str, torch.Tensor]:
        """Zero buffers of the stored per-super-block tensors of a [rows, cols] layer."""
        self._check(cols)
        blocks = cols // SUPER_BLOCK
        return {name: torch.zeros(rows, blocks * width, dtype=dtype, device=device)
                for name, dtype, width in self.stored}


def update_view(scales: torch.Tensor) -> torch.Tensor:
    """The scales updates divide by: infinite where a sub-block's scale is 0 (its codes move no weight), with the
    zero's sign, which decoding keeps (gguf.quants' products carry it: -0 * q is -0)."""
    return torch.where(scales == 0, torch.full_like(scales, float("inf")).copysign_(scales), scales)


def decode_view(scales: torch.Tensor) -> torch.Tensor:
    """The inverse of `update_view`: the scales decoding multiplies by."""
    return torch.where(torch.isinf(scales), torch.zeros_like(scales).copysign_(scales), scales)


def pack_scale_mins(sc: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Q4_K's 8 six-bit scales and minimums [..., 8] (0..63, uint8) -> the file's 12 bytes [..., 12]: bytes 0-3 and
    4-7 hold the low six bits of sc and m of sub-blocks 0-3 and, in their top two bits, bits 4-5 of sc and m of
    sub-blocks 4-7, whose low four bits fill bytes 8-11 (sc low nibble, m high nibble)."""
    sc, m = sc.to(torch.uint8), m.to(torch.uint8)
    return torch.cat([sc[..., :4] | ((sc[..., 4:] >> 4) << 6), m[..., :4] | ((m[..., 4:] >> 4) << 6),
                      (sc[..., 4:] & 0x0F) | ((m[..., 4:] & 0x0F) << 4)], dim=-1)


def unpack_scale_mins(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of `pack_scale_mins`: [..., 12] bytes -> (sc, m) [..., 8] uint8."""
    low, mid, high = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    sc = torch.cat([low & 0x3F, (high & 0x0F) | ((low >> 6) << 4)], dim=-1)
    m = torch.cat([mid & 0x3F, (high >> 4) | ((mid >> 6) << 4)], dim=-1)
    return sc, m


def derive_q4_k(stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    d, dmin, packed = stored["d"], stored["dmin"], stored["sub_scales"]
    rows, blocks = d.shape
    sc, m = unpack_scale_mins(packed.view(rows, blocks, 12))
    scales = d.to(torch.float32).unsqueeze(-1) * sc.to(torch.float32)
    minimums = (dmin.to(torch.float32).unsqueeze(-1) * m.to(torch.float32)).neg_()
    return {"scales": update_view(scales.view(rows, -1)), "minimums": minimums.view(rows, -1)}


def derive_q6_k(stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    d, sc = stored["d"], stored["sub_scales"]
    scales = d.to(torch.float32).repeat_interleave(16, dim=1) * sc.to(torch.float32)
    return {"scales": update_view(scales)}


def _encoder(name: str) -> Callable:
    def encode(codec, weight, group_size, rounding="nearest", generator=None):
        from ftkit.quant import kquant_quantize  # the llama.cpp quantizers: loaded when a layer is converted

        return getattr(kquant_quantize, f"quantize_{name}")(weight, rounding, generator)
    return encode


Q4_K = KQuantCodec("q4_k", 4, packed=True, signed=False, block=32, scale_dtype=torch.float32,
                   encoder=_encoder("q4_k"), derive=derive_q4_k,
                   stored=(("d", torch.float16, 1), ("dmin", torch.float16, 1), ("sub_scales", torch.uint8, 12)))
Q6_K = KQuantCodec("q6_k", 6, block=16, scale_dtype=torch.float32, encoder=_encoder("q6_k"), derive=derive_q6_k,
                   stored=(("d", torch.float16, 1), ("sub_scales", torch.int8, 16)))
