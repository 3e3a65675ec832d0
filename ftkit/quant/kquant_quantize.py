"""llama.cpp's reference quantizers of Q4_K and Q6_K (ggml-quants.c: quantize_row_q4_K_ref with its weighted
min-and-scale search, quantize_row_q6_K_ref with its symmetric scale search), vectorised over every sub-block of a
matrix at once.

How faithful: every arithmetic step is the reference's, in float32, in the reference's order: sums are
accumulated one term at a time in index order (not tree-reduced), products are grouped as the C expressions group
them, the trial scales' loop constants are float32 (0.1f * is), rounding to an integer is nearest-even (what
nearest_int's magic-number addition does), divisions and square roots are correctly rounded as C's are, and
float16 conversions round to nearest-even, so the stored bytes are those of a build of ggml that does not contract
a * b + c into fused multiply-adds: every block of a Q4_K_M SmolLM2 that llama.cpp (llama-cpp-python 0.3.36)
quantized from float32 (scripts/make_gguf.py --compare). A compiler that contracts
(GCC's default -ffp-contract=fast with FMA enabled) rounds some of the search's sums differently, and may pick a
different trial scale for a sub-block where two are within a rounding of each other. Both produce valid files.

Q4_K (per super-block of 256): each sub-block of 32 is fitted by a weighted least-squares search over 21 trial
scales for a scale and a minimum (weights av + |x|, av the sub-block's RMS); the 8 scales and 8 minimums are
quantized to 6 bits against the largest of each (d = max scale / 63, dmin = max minimum / 63, float16), and the
codes recomputed as nearest((x + dmin m) / (d sc)), clamped to 0..15. Q6_K: each sub-block of 16 gets the best of
19 trial scales around -32 / (its largest-magnitude value) by weighted error (weights x^2); the 16 scales become
int8 against the largest-magnitude one (d = -max / 128), and the codes nearest(x / (d sc)), clamped to -32..31.

`rounding="stochastic"` rounds the final codes stochastically on the same grid instead (the first quantization
of quant.rounding: stochastic); the scales are the reference's either way.
"""

from __future__ import annotations

import numpy as np
import torch

from ftkit.quant.kquants import SUPER_BLOCK, pack_scale_mins


def sequential_sum(terms: torch.Tensor) -> torch.Tensor:
    """Sum over the first axis one term at a time, in order: a C loop's float32 accumulation."""
    total = terms[0].clone()
    for term in terms[1:]:
        total += term
    return total


def _f32(value: float) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float32)


def _trial(rdelta: float, step: int, rmin: float, nmax: int) -> torch.Tensor:
    """rmin + rdelta * step + nmax, each operation in float32 as C evaluates it."""
    return _f32(float(np.float32(np.float32(rmin) + np.float32(rdelta) * np.float32(step)) + np.float32(nmax)))


def _codes(v: torch.Tensor, low: int, high: int, rounding: str, generator) -> torch.Tensor:
    if rounding == "nearest":
        return torch.round(v).clamp_(low, high)
    noise = torch.rand(v.shape, generator=generator, device=v.device, dtype=torch.float32)
    return torch.floor(v + noise).clamp_(low, high)


def fit_scale_and_min(x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int):
    """make_qkx2_quants on the columns of x [n, M] with weights w: codes L [n, M] (0..nmax), scale [M] and the
    minimum's negation [M] (>= 0) of each column, fitted by weighted squared error."""
    low, high = x.amin(0).clamp(max=0), x.amax(0)
    sum_w, sum_x = sequential_sum(w), sequential_sum(w * x)
    flat = high == low
    iscale = _f32(nmax) / (high - low)
    scale = 1 / iscale
    codes = torch.round(iscale * (x - low)).clamp_(0, nmax)
    diff = scale * codes + low - x
    best = sequential_sum(w * (diff * diff))
    for step in range(nstep + 1):  # `low` moves with the best fit: later trials scale from it, as the reference does
        trial = torch.round(_trial(rdelta, step, rmin, nmax) / (high - low) * (x - low)).clamp_(0, nmax)
        wl = w * trial
        sum_l, sum_l2, sum_xl = sequential_sum(wl), sequential_sum(wl * trial), sequential_sum(wl * x)
        det = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        clipped = this_min > 0
        this_scale = torch.where(clipped, sum_xl / sum_l2, this_scale)
        this_min = torch.where(clipped, torch.zeros_like(this_min), this_min)
        diff = this_scale * trial + this_min - x
        error = sequential_sum(w * (diff * diff))
        better = (det > 0) & (error < best)
        best = torch.where(better, error, best)
        codes = torch.where(better, trial, codes)
        scale, low = torch.where(better, this_scale, scale), torch.where(better, this_min, low)
    codes = torch.where(flat, torch.zeros_like(codes), codes)
    return codes, torch.where(flat, torch.zeros_like(scale), scale), -low


def _symmetric_attempt(x: torch.Tensor, w: torch.Tensor, iscale: torch.Tensor, nmax: int):
    codes = torch.round(iscale * x).clamp_(-nmax, nmax - 1)
    return codes, sequential_sum((w * x) * codes), sequential_sum((w * codes) * codes)


def fit_symmetric(x: torch.Tensor, nmax: int):
    """make_qx_quants (rmse_type 1: weights x^2) on the columns of x [n, M]: codes [n, M] (-nmax..nmax-1) and the
    scale [M] of each column; a column under 1e-15 in magnitude has codes -nmax and scale 0."""
    top = x.gather(0, x.abs().argmax(0, keepdim=True)).squeeze(0)  # the first largest magnitude, signed
    zero = top.abs() < 1e-15
    w = x * x
    codes, sumlx, suml2 = _symmetric_attempt(x, w, _f32(-nmax) / top, nmax)
    scale = torch.where(suml2 != 0, sumlx / suml2, torch.zeros_like(sumlx))
    best = scale * sumlx
    for step in [s for s in range(-9, 10) if s]:
        trial, sumlx, suml2 = _symmetric_attempt(x, w, -_trial(0.1, step, 0.0, nmax) / top, nmax)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        codes = torch.where(better, trial, codes)
        scale = torch.where(better, sumlx / suml2, scale)
        best = torch.where(better, scale * sumlx, best)
    codes = torch.where(zero, torch.full_like(codes, -nmax), codes)
    return codes, torch.where(zero, torch.zeros_like(scale), scale)


def _nearest_byte(v: torch.Tensor) -> torch.Tensor:
    """nearest_int stored in a uint8, then MIN(63, .): a negative value wraps as the C assignment does."""
    return torch.round(v).remainder_(256).clamp_(max=63)


def quantize_q4_k(weight: torch.Tensor, rounding: str = "nearest", generator=None):
    """Grid values [N, K] (0..15) and the stored tensors {d, dmin, sub_scales} of Q4_K."""
    rows, cols = weight.shape
    blocks = cols // SUPER_BLOCK
    x = weight.to(torch.float32).reshape(-1, 32).T.contiguous()  # [32, sub-blocks]
    # sqrtf is correctly rounded; torch's float32 sqrt on the CPU can be one unit in the last place off. The float64
    # root of a float32 number rounds to float32's correctly rounded root (53 >= 2 * 24 + 2 bits).
    av = torch.sqrt((sequential_sum(x * x) / 32).double()).float()
    fitted, scale, mins = fit_scale_and_min(x, av + x.abs(), 15, -1.0, 0.1, 20)
    scale, mins = scale.view(-1, 8), mins.view(-1, 8)
    max_scale, max_min = scale.amax(1).clamp(min=0), mins.amax(1).clamp(min=0)
    # 63.f / max as C divides: a Python number over a tensor is its reciprocal times the number, rounded twice
    inv_scale = torch.where(max_scale > 0, _f32(63) / max_scale, torch.zeros_like(max_scale))
    inv_min = torch.where(max_min > 0, _f32(63) / max_min, torch.zeros_like(max_min))
    sc, m = _nearest_byte(inv_scale[:, None] * scale), _nearest_byte(inv_min[:, None] * mins)
    d, dmin = (max_scale / 63).to(torch.float16), (max_min / 63).to(torch.float16)
    sub_d = (d.to(torch.float32)[:, None] * sc).view(-1, 8, 1)
    sub_m = (dmin.to(torch.float32)[:, None] * m).view(-1, 8, 1)
    values = x.T.reshape(-1, 8, 32)
    codes = _codes((values + sub_m) / sub_d, 0, 15, rounding, generator)
    codes = torch.where(sub_d != 0, codes, fitted.T.reshape(-1, 8, 32))  # the reference keeps the fit's codes there
    stored = {"d": d.view(rows, blocks), "dmin": dmin.view(rows, blocks),
              "sub_scales": pack_scale_mins(sc, m).view(rows, blocks * 12)}
    return codes.reshape(rows, cols), stored


def quantize_q6_k(weight: torch.Tensor, rounding: str = "nearest", generator=None):
    """Grid values [N, K] (q - 32: -32..31) and the stored tensors {d, sub_scales} of Q6_K."""
    rows, cols = weight.shape
    blocks = cols // SUPER_BLOCK
    x = weight.to(torch.float32).reshape(-1, 16).T.contiguous()  # [16, sub-blocks]
    fitted, scale = fit_symmetric(x, 32)
    scale = scale.view(-1, 16)
    top = scale.gather(1, scale.abs().argmax(1, keepdim=True)).squeeze(1)
    empty = top.abs() < 1e-15
    iscale = _f32(-128) / top  # a true division (a power of two: the same as the reciprocal times -128)
    d = torch.where(empty, torch.zeros_like(top), 1 / iscale).to(torch.float16)
    sc = torch.round(iscale[:, None] * scale).clamp_(-128, 127)
    sc = torch.where(empty[:, None], torch.zeros_like(sc), sc)
    sub_d = (d.to(torch.float32)[:, None] * sc).view(-1, 16, 1)
    codes = _codes(x.T.reshape(-1, 16, 16) / sub_d, -32, 31, rounding, generator)
    codes = torch.where(sub_d != 0, codes, fitted.T.reshape(-1, 16, 16))
    codes = torch.where(empty.view(-1, 1, 1), torch.full_like(codes, -32), codes)  # an empty block: all bytes 0
    stored = {"d": d.view(rows, blocks), "sub_scales": sc.to(torch.int8).view(rows, blocks * 16)}
    return codes.reshape(rows, cols), stored
