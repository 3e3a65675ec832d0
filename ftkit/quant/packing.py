"""int4 codes, two per byte, in the layout PyTorch's CPU int4 kernel reads directly.

`torch._weight_int4pack_mm_for_cpu` takes an [N, K/2] uint8 tensor in which output rows come in blocks of 64:
for block b, byte (k, r) holds row 64b + r in its low nibble and row 64b + 32 + r in its high nibble, stored
k-major. Keeping the codes in exactly that layout means the fast kernel needs no conversion and there is one copy
of the weights. Rows are padded to a multiple of 64 (with zero codes) when N is not one.

Nibbles hold code + 8, so codes -8..7 become 0..15.
"""

from __future__ import annotations

import torch

BLOCK = 64
OFFSET = 8


def padded_rows(rows: int) -> int:
    return -(-rows // BLOCK) * BLOCK


def pack_int4(codes: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """[N, K] codes in -8..7 (int8, or float grid values) -> [padded N, K/2] uint8, written into `out` if given.

    The two nibble planes are combined row-wise and transposed into place by one copy (a QuZO step packs every
    layer once, so this is on its hot path)."""
    rows, cols = codes.shape
    if cols % 2:
        raise ValueError(f"int4 packing needs an even number of input columns, got {cols}")
    nibbles = codes.to(torch.int8, copy=True).add_(OFFSET).view(torch.uint8)
    if padded_rows(rows) != rows:
        nibbles = torch.cat([nibbles, nibbles.new_full((padded_rows(rows) - rows, cols), OFFSET)])
    halves = nibbles.view(-1, 2, BLOCK // 2, cols)  # [blocks, lower / upper half, 32, K]
    if out is None:
        out = torch.empty(padded_rows(rows), cols // 2, dtype=torch.uint8, device=codes.device)
    out.view(-1, cols, BLOCK // 2).copy_((halves[:, 0] | (halves[:, 1] << 4)).transpose(1, 2))
    return out


def unpack_int4(packed: torch.Tensor, rows: int, cols: int, dtype: torch.dtype = torch.int8) -> torch.Tensor:
    """[padded N, K/2] uint8 -> [N, K] codes (-8..7) as `dtype` (int8, or float32 for arithmetic on the grid).

    Each nibble plane is written straight into its rows, transposed by the copy itself: one pass over bytes,
    then one conversion into `dtype` (a QuZO step unpacks every layer three times, so this is on its hot path)."""
    blocks = packed.view(-1, cols, BLOCK // 2)  # [blocks, K, 32]: byte (k, r) holds rows r and 32 + r of its block
    nibbles = torch.empty(blocks.shape[0], 2, BLOCK // 2, cols, dtype=torch.uint8, device=packed.device)
    nibbles[:, 0].copy_((blocks & 0x0F).transpose(1, 2))
    nibbles[:, 1].copy_((blocks >> 4).transpose(1, 2))
    return nibbles.view(-1, cols)[:rows].to(dtype).sub_(OFFSET)


def step_int4(packed: torch.Tensor, positions: torch.Tensor, steps: torch.Tensor, cols: int) -> None:
    """Add `steps` (whole grid steps, int) to the codes at flat `positions` (row * cols + column, distinct) of the
    packed codes, in place, each clamped to -8..7: only the bytes holding them are read and written. The codes of
    rows r and r + 32 share a byte, so the low nibbles are rewritten first, then the high ones."""
    rows = positions // cols
    within = rows % BLOCK
    byte = (rows // BLOCK) * (cols * (BLOCK // 2)) + (positions % cols) * (BLOCK // 2) + within % (BLOCK // 2)
    high = within >= BLOCK // 2
    flat = packed.view(-1)
    for shift, pick in ((0, ~high), (4, high)):
        where, by = byte[pick], steps[pick].to(torch.int16)
        current = flat[where]
        nibble = ((current >> shift) & 0x0F).to(torch.int16).add_(by).clamp_(0, 15).to(torch.uint8)
        flat[where] = (current & (0xF0 >> shift)) | (nibble << shift)
