"""Scales: one per output channel or per group of input columns, from the absolute maximum or an MSE search."""

from __future__ import annotations

import torch

# quant.scale_dtype -> torch dtype
SCALE_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
# Clipping ratios tried by the MSE search (fractions of the group's absolute maximum).
CLIP_RATIOS = tuple(1.0 - 0.05 * i for i in range(11))  # 1.00, 0.95, ..., 0.50


def group_view(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """[N, K] -> [N, groups, group size]; group_size 0 means one group per output channel."""
    rows, cols = weight.shape
    size = group_size or cols
    if cols % size:
        raise ValueError(f"group size {size} does not divide the {cols} input columns")
    return weight.reshape(rows, cols // size, size)


def compute_scales(weight: torch.Tensor, codec, group_size: int, method: str, dtype: torch.dtype) -> torch.Tensor:
    """Scales [N, groups] in `dtype`, such that weight / scale spans the codec's grid."""
    groups = group_view(weight.to(torch.float32), group_size)
    absmax = groups.abs().amax(dim=-1)
    # An all-zero group quantizes to zero codes whatever its scale; 1 avoids dividing by zero.
    absmax = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    if method == "absmax":
        return (absmax / codec.max_value).to(dtype)
    best_scale = (absmax / codec.max_value).to(dtype)
    best_error = _error(groups, best_scale, codec)
    for ratio in CLIP_RATIOS[1:]:
        scale = (ratio * absmax / codec.max_value).to(dtype)
        error = _error(groups, scale, codec)
        better = error < best_error
        best_scale = torch.where(better, scale, best_scale)
        best_error = torch.where(better, error, best_error)
    return best_scale


def _error(groups: torch.Tensor, scale: torch.Tensor, codec) -> torch.Tensor:
    s = scale.to(torch.float32).unsqueeze(-1)
    return (codec.round(groups / s) * s - groups).pow(2).sum(-1)

