"""Four-bit codes, two per byte, in the layout PyTorch's CPU int4 kernel reads directly: the shared storage of every
codec with 4-bit codes (ftkit.quant.codecs), each of which says which integer a nibble holds.

`torch._weight_int4pack_mm_for_cpu` takes an [N, K/2] uint8 tensor in which output rows come in blocks of 64:
for block b, byte (k, r) holds row 64b + r in its low nibble and row 64b + 32 + r in its high nibble, stored
k-major. Keeping the codes in exactly that layout means the fast kernel needs no conversion and there is one copy
of the weights. Rows are padded to a multiple of 64 (with the nibble of code 0) when N is not one.

A nibble holds code + offset, 0..15: int4's codes -8..7 with offset 8, a codec of codes 0..15 with offset 0.
"""

from __future__ import annotations

import torch

BLOCK = 64
OFFSET = 8  # int4's: codes -8..7 in nibbles 0..15


def padded_rows(rows: int) -> int:
    return -(-rows // BLOCK) * BLOCK


def pack_nibbles(codes: torch.Tensor, offset: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """[N, K] codes with code + offset in 0..15 (int8, or float grid values) -> [padded N, K/2] uint8, written into
    `out` if given.

    The two nibble planes are combined row-wise and transposed into place by one copy (a QuZO step packs every
    layer once, so this is on its hot path)."""
    rows, cols = codes.shape
    if cols % 2:
        raise ValueError(f"4-bit packing needs an even number of input columns, got {cols}")
    nibbles = codes.to(torch.int8, copy=True).add_(offset).view(torch.uint8)
    if padded_rows(rows) != rows:
        nibbles = torch.cat([nibbles, nibbles.new_full((padded_rows(rows) - rows, cols), offset)])
    halves = nibbles.view(-1, 2, BLOCK // 2, cols)  # [blocks, lower / upper half, 32, K]
    if out is None:
        out = torch.empty(padded_rows(rows), cols // 2, dtype=torch.uint8, device=codes.device)
    out.view(-1, cols, BLOCK // 2).copy_((halves[:, 0] | (halves[:, 1] << 4)).transpose(1, 2))
    return out


def unpack_nibbles(packed: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """[padded N, K/2] uint8 -> the [N, K] nibbles, 0..15, as uint8.

    Each nibble plane is written straight into its rows, transposed by the copy itself: one pass over bytes (a
    QuZO step unpacks every layer three times, so this is on its hot path)."""
    blocks = packed.view(-1, cols, BLOCK // 2)  # [blocks, K, 32]: byte (k, r) holds rows r and 32 + r of its block
    nibbles = torch.empty(blocks.shape[0], 2, BLOCK // 2, cols, dtype=torch.uint8, device=packed.device)
    nibbles[:, 0].copy_((blocks & 0x0F).transpose(1, 2))
    nibbles[:, 1].copy_((blocks >> 4).transpose(1, 2))
    return nibbles.view(-1, cols)[:rows]


def unpack_codes(packed: torch.Tensor, rows: int, cols: int, offset: int, dtype: torch.dtype) -> torch.Tensor:
    """[padded N, K/2] uint8 -> [N, K] codes (nibble - offset) as `dtype` (int8, or float32 for arithmetic)."""
    return unpack_nibbles(packed, rows, cols).to(dtype).sub_(offset)


def pack_int4(codes: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """int4's codes -8..7 -> packed bytes (`pack_nibbles` with offset 8)."""
    return pack_nibbles(codes, OFFSET, out)


def unpack_int4(packed: torch.Tensor, rows: int, cols: int, dtype: torch.dtype = torch.int8) -> torch.Tensor:
    """Packed bytes -> int4's codes -8..7 as `dtype`."""
    return unpack_codes(packed, rows, cols, OFFSET, dtype)


def step_int4(packed: torch.Tensor, positions: torch.Tensor, steps: torch.Tensor, cols: int) -> None:
    """Add `steps` (whole grid steps, int) to int4 codes at flat `positions` (row * cols + column, distinct) of the
    packed codes, in place, each clamped to -8..7: only the bytes holding them are read and written."""
    step_nibbles([packed], [positions], [steps], [cols], 0, 15)


def step_int4_layers(packed: list[torch.Tensor], positions: list[torch.Tensor], steps: list[torch.Tensor],
                     cols: list[int]) -> None:
    """`step_int4` for several layers at once."""
    step_nibbles(packed, positions, steps, cols, 0, 15)


def step_nibbles(packed: list[torch.Tensor], positions: list[torch.Tensor], steps: list[torch.Tensor],
                 cols: list[int], low: int, high: int) -> None:
    """Add `steps` to the nibbles at flat `positions` of several layers' packed codes at once, each clamped to
    low..high (the codec's range, in nibbles): the arithmetic on all their moves together, then one read and one
    write of the touched bytes per layer. The codes of rows r and r + 32 share a byte: each byte's two nibbles take
    their own step (at most one each, the positions being distinct) and are clamped apart."""
    device = packed[0].device
    counts = torch.tensor([p.numel() for p in positions], device=device)
    width = torch.repeat_interleave(torch.tensor(cols, device=device), counts)  # each move's layer's K
    owner = torch.repeat_interleave(torch.arange(len(packed), device=device), counts)
    flat, by = torch.cat(positions), torch.cat(steps).to(torch.int16)
    rows = flat // width
    within = rows % BLOCK
    byte = (rows // BLOCK) * (width * (BLOCK // 2)) + (flat % width) * (BLOCK // 2) + within % (BLOCK // 2)
    span = max(p.numel() for p in packed)
    touched, slot = torch.unique(owner * span + byte, return_inverse=True)  # sorted: layer after layer
    high_half = within >= BLOCK // 2
    low_step = torch.zeros(touched.numel(), dtype=torch.int16, device=device).index_add_(0, slot[~high_half],
                                                                                        by[~high_half])
    high_step = torch.zeros_like(low_step).index_add_(0, slot[high_half], by[high_half])
    per_layer = torch.bincount(touched // span, minlength=len(packed)).tolist()
    where = (touched % span).split(per_layer)
    current = torch.cat([p.view(-1)[w] for p, w in zip(packed, where)])
    low_nibble = ((current & 0x0F).to(torch.int16) + low_step).clamp_(low, high)
    high_nibble = ((current >> 4).to(torch.int16) + high_step).clamp_(low, high)
    new = (low_nibble | (high_nibble << 4)).to(torch.uint8)
    for p, w, values in zip(packed, where, new.split(per_layer)):
        p.view(-1)[w] = values
