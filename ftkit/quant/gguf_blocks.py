"""GGUF's simple block formats as codecs: Q4_0, Q4_1, Q5_0 and Q8_0, as llama.cpp quantizes them.

Each block is 32 consecutive weights of a row with a float16 scale d (and for Q4_1 a float16 minimum m):

    Q4_0  nibbles q 0..15, w = d (q - 8)   d = the block's largest-magnitude value / -8 (its sign kept)   4.5 bits
    Q4_1  nibbles q 0..15, w = d q + m     d = (max - min) / 15, m = min                                  5 bits
    Q5_0  q 0..31,         w = d (q - 16)  d = the block's largest-magnitude value / -16 (its sign kept)  5.5 bits
    Q8_0  int8 q,          w = d q         d = max |w| / 127                                               8.5 bits

The quantizers follow gguf.quants (which is bit-exact with ggml-quants.c): d in float32, the weights multiplied by
1/d in float32, Q4_0, Q4_1 and Q5_0 rounded by truncating x + 8.5, x + 0.5 and x + 16.5, Q8_0 to nearest with ties
away from zero, and only then d and m rounded to float16. So codes and scales are the file's, and the weights they
decode to are gguf.quants.dequantize's exactly. ftkit keeps Q4_0's codes as q - 8 (int4's grid: -8..7, same
nibbles), Q4_1's as q (an unsigned grid with minimums) and Q5_0's as q - 16 (-16..15 in five bits,
ftkit.quant.bitplanes: 22 bytes a block, as the file); the bits sit in ftkit's layouts (ftkit.quant.packing,
bitplanes), not the file's byte order. One difference: a block whose d is 0 (all its weights equal) stores d = 1
(with d's sign), its codes unchanged, so the weights are the same and zeroth-order updates, which work in units of
d, stay finite.
"""

from __future__ import annotations

import torch

from ftkit.quant.bitplanes import FIVE_BITS
from ftkit.quant.codecs import IntCodec, round_to_integers
from ftkit.quant.scales import group_view

BLOCK = 32


def _inverse(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, torch.zeros_like(d), 1 / d)


def _scales(d: torch.Tensor) -> torch.Tensor:
    """d in float16, a d of 0 kept as 1 with its sign (Q4_0's d of an all-zero block is -0: the sign is the file's)."""
    return torch.where(d == 0, torch.ones_like(d).copysign(d), d).to(torch.float16)


def _finish(codec, x: torch.Tensor, nearest, shape, rounding: str, generator) -> torch.Tensor:
    """Grid values of the scaled weights x: llama.cpp's rounding (`nearest`, a function of x) or stochastic."""
    out = nearest(x) if rounding == "nearest" else round_to_integers(x, codec.qmin, codec.qmax, rounding, generator)
    return out.reshape(shape)


def encode_q4_0(codec, weight, group_size, rounding="nearest", generator=None):
    blocks = group_view(weight.to(torch.float32), group_size)
    top = blocks.gather(-1, blocks.abs().argmax(dim=-1, keepdim=True))  # the first largest magnitude, signed
    d = top / -8
    x = blocks * _inverse(d)
    codes = _finish(codec, x, lambda v: (v + 8.5).trunc_().clamp_(0, 15).sub_(8), weight.shape, rounding, generator)
    return codes, {"scales": _scales(d.squeeze(-1))}


def encode_q4_1(codec, weight, group_size, rounding="nearest", generator=None):
    blocks = group_view(weight.to(torch.float32), group_size)
    low = blocks.amin(dim=-1, keepdim=True)
    d = (blocks.amax(dim=-1, keepdim=True) - low) / 15
    x = (blocks - low) * _inverse(d)
    codes = _finish(codec, x, lambda v: (v + 0.5).trunc_().clamp_(0, 15), weight.shape, rounding, generator)
    return codes, {"scales": _scales(d.squeeze(-1)), "minimums": low.squeeze(-1).to(torch.float16)}


def encode_q5_0(codec, weight, group_size, rounding="nearest", generator=None):
    blocks = group_view(weight.to(torch.float32), group_size)
    top = blocks.gather(-1, blocks.abs().argmax(dim=-1, keepdim=True))  # as Q4_0, on a grid twice as fine
    d = top / -16
    x = blocks * _inverse(d)
    codes = _finish(codec, x, lambda v: (v + 16.5).trunc_().clamp_(0, 31).sub_(16), weight.shape, rounding, generator)
    return codes, {"scales": _scales(d.squeeze(-1))}


def round_half_away(x: torch.Tensor) -> torch.Tensor:
    """gguf.quants' np_roundf: |x| rounded half away from zero as floor(a) + floor(2 (a - floor(a))), which, unlike
    floor(a + 0.5), adds no float32 rounding."""
    a = x.abs()
    whole = a.floor()
    return whole.add_((a - whole).mul_(2).floor_()).mul_(x.sign())


def encode_q8_0(codec, weight, group_size, rounding="nearest", generator=None):
    blocks = group_view(weight.to(torch.float32), group_size)
    d = blocks.abs().amax(dim=-1, keepdim=True) / 127
    x = blocks * _inverse(d)
    codes = _finish(codec, x, lambda v: round_half_away(v).clamp_(-128, 127), weight.shape, rounding, generator)
    return codes, {"scales": _scales(d.squeeze(-1))}


Q4_0 = IntCodec("q4_0", 4, packed=True, block=BLOCK, scale_dtype=torch.float16, encoder=encode_q4_0)
Q4_1 = IntCodec("q4_1", 4, packed=True, signed=False, block=BLOCK, scale_dtype=torch.float16, encoder=encode_q4_1)
Q5_0 = IntCodec("q5_0", 5, block=BLOCK, scale_dtype=torch.float16, encoder=encode_q5_0, storage=FIVE_BITS)
Q8_0 = IntCodec("q8_0", 8, block=BLOCK, scale_dtype=torch.float16, encoder=encode_q8_0)
