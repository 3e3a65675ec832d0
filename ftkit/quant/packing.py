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


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """[N, K] int8 codes in -8..7 -> [padded N, K/2] uint8."""
    rows, cols = codes.shape
    if cols % 2:
        raise ValueError(f"int4 packing needs an even number of input columns, got {cols}")
    nibbles = (codes.to(torch.int16) + OFFSET).to(torch.uint8)
    if padded_rows(rows) != rows:
        pad = torch.full((padded_rows(rows) - rows, cols), OFFSET, dtype=torch.uint8, device=codes.device)
        nibbles = torch.cat([nibbles, pad])
    blocks = nibbles.view(-1, BLOCK, cols).transpose(1, 2)  # [blocks, K, 64]
    packed = blocks[..., : BLOCK // 2] | (blocks[..., BLOCK // 2 :] << 4)
    return packed.contiguous().view(padded_rows(rows), cols // 2)


def unpack_int4(packed: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """[padded N, K/2] uint8 -> [N, K] int8 codes."""
    blocks = packed.view(-1, cols, BLOCK // 2)
    low, high = blocks & 0x0F, blocks >> 4
    nibbles = torch.cat([low, high], dim=2).transpose(1, 2).reshape(-1, cols)[:rows]
    return nibbles.to(torch.int8) - OFFSET
