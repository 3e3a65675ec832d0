"""Five-bit codes in 5/8 of a byte each: the storage of Q5_0's codes (ftkit.quant.gguf_blocks), so a layer holds the
22 bytes per block of 32 weights that a GGUF file holds.

A stored row of K codes is K/2 + K/8 uint8 bytes: first the low four bits of each code, two per byte (column 2j in
byte j's low nibble, 2j + 1 in its high nibble), then the fifth bits, eight per byte (column c in bit c % 8 of byte
K/2 + c // 8). Each code is held as code + offset, 0..31 (Q5_0's -16..15 as the file's q). A row whose K is no
multiple of 8 is padded to one with zero bits (Q5_0's rows are blocks of 32). Rows are independent, so any range of
rows is a slice of the storage. No kernel reads this layout: the codes are unpacked to dequantize.

`FIVE_BITS` bundles the four functions an integer codec asks of its storage (ftkit.quant.codecs.IntCodec.storage).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch


class CodeStorage(NamedTuple):
    empty: Callable  # (rows, cols, device) -> zero storage
    pack: Callable  # (codes [n, K], offset, out) -> None, writing code + offset into `out`
    unpack: Callable  # (stored, rows, cols, offset) -> float32 codes [rows, cols]
    step: Callable  # (stored list, positions list, steps list, cols list, low, high) -> None, in stored values


def padded(cols: int) -> int:
    return -(-cols // 8) * 8


def row_bytes(cols: int) -> int:
    return padded(cols) // 2 + padded(cols) // 8


def empty_5bit(rows: int, cols: int, device=None) -> torch.Tensor:
    return torch.zeros(rows, row_bytes(cols), dtype=torch.uint8, device=device)


def pack_5bit(codes: torch.Tensor, offset: int, out: torch.Tensor) -> None:
    """[n, K] codes with code + offset in 0..31 (float grid values or integers) into `out` [n, K/2 + K/8] uint8."""
    rows, cols = codes.shape[0], padded(codes.shape[1])
    q = torch.zeros(rows, cols, dtype=torch.uint8, device=codes.device)
    q[:, :codes.shape[1]] = codes.to(torch.int16).add_(offset)
    low = q & 0x0F
    out[:, :cols // 2] = low[:, 0::2] | (low[:, 1::2] << 4)
    bits = (q >> 4).view(rows, cols // 8, 8) << torch.arange(8, dtype=torch.uint8, device=q.device)
    out[:, cols // 2:] = bits.sum(dim=-1, dtype=torch.uint8)  # disjoint bits: the sum is their OR


def unpack_5bit(stored: torch.Tensor, rows: int, cols: int, offset: int) -> torch.Tensor:
    """Storage [rows, K/2 + K/8] -> the codes [rows, K] as float32 (stored value - offset)."""
    width = padded(cols)
    half = stored[:rows, :width // 2]
    q = torch.empty(rows, width // 2, 2, dtype=torch.uint8, device=stored.device)  # nibbles written in place
    torch.bitwise_and(half, 0x0F, out=q[..., 0])
    torch.bitwise_right_shift(half, 4, out=q[..., 1])
    shifts = torch.arange(8, dtype=torch.uint8, device=stored.device)
    high = (stored[:rows, width // 2:].unsqueeze(-1) >> shifts).bitwise_and_(1).bitwise_left_shift_(4)
    return q.view(rows, -1, 8).bitwise_or_(high).view(rows, width)[:, :cols].to(torch.float32).sub_(offset)


def step_5bit(stored: list[torch.Tensor], positions: list[torch.Tensor], steps: list[torch.Tensor],
              cols: list[int], low: int, high: int) -> None:
    """Add `steps` to the stored values (code + offset) at flat `positions` (row * K + column, distinct) of each
    layer's storage, each clamped to low..high, in place: one read and one write of the bytes that hold them. A move
    across 15 / 16 carries between a code's nibble and its fifth bit; both bytes are rewritten."""
    for flat_codes, where, by, width in zip(stored, positions, steps, cols):
        flat = flat_codes.view(-1)
        row, col = where // width, where % width
        start = row * row_bytes(width)
        nibble_at, bit_at = start + col // 2, start + padded(width) // 2 + col // 8
        nibble_unit, bit_unit = 1 << (col % 2) * 4, 1 << col % 8  # a field's lowest bit within its byte
        touched, slot = torch.unique(torch.cat([nibble_at, bit_at]), return_inverse=True)
        current = flat[touched].to(torch.int16)
        old_low = current[slot[:where.numel()]] // nibble_unit & 0x0F
        old_high = current[slot[where.numel():]] // bit_unit & 1
        new = (old_low | (old_high << 4)).add_(by.to(torch.int16)).clamp_(low, high)
        # Each code owns its bits, so a byte's new value is its old one plus the changes of the fields it holds.
        change = torch.cat([((new & 0x0F) - old_low) * nibble_unit, ((new >> 4) - old_high) * bit_unit])
        flat[touched] = current.index_add_(0, slot, change.to(torch.int16)).to(torch.uint8)


FIVE_BITS = CodeStorage(empty_5bit, pack_5bit, unpack_5bit, step_5bit)
