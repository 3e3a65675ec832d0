"""Q5_0's five-bit code storage (ftkit.quant.bitplanes): the file's 22 bytes per block of 32, an exact round trip,
and whole-step moves equal to the same moves on codes one per int8 byte."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn as nn

from ftkit.quant.gguf_blocks import Q5_0
from ftkit.quant.linear import QuantLinear

BYTES = dataclasses.replace(Q5_0, storage=None)  # the reference: the same grid, one int8 byte a code


def test_a_q5_0_layer_holds_22_bytes_per_block_of_32():
    assert Q5_0.empty(3, 64).numel() == 3 * 2 * 20  # codes: 20 bytes a block of 32, its float16 d the other 2
    source = nn.Linear(256, 96, bias=False)
    layer = QuantLinear.from_linear(source, "q5_0")
    assert layer.codes.dtype == torch.uint8 and layer.codes.shape == (96, 128 + 32)
    assert layer.stored_bytes == 96 * 256 // 32 * 22


def test_all_32_codes_round_trip_exactly_in_any_column():
    gen = torch.Generator().manual_seed(0)
    codes = torch.stack([torch.randperm(32, generator=gen) - 16 for _ in range(40)]).float()  # each row: all 32
    stored = Q5_0.empty(40, 32)
    Q5_0.pack(codes, stored)
    assert torch.equal(Q5_0.unpack(stored, 40, 32), codes)
    one = Q5_0.empty(1, 8)  # the layout: nibbles two per byte (low first), then the fifth bits, column c in bit c
    Q5_0.pack(torch.tensor([[15.0, -16, -1, 0, 1, 2, 3, 4]]), one)
    assert one.tolist() == [[0x0F | 0x00 << 4, 0x0F | 0x00 << 4, 0x1 | 0x2 << 4, 0x3 | 0x4 << 4, 0b11111001]]
    ragged = torch.tensor([[-16.0, 15, 0, -1, 7, -8, 3, 2, 1, -2, 15, -16]])  # padded to 16 columns with zero bits
    stored = Q5_0.empty(1, 12)
    Q5_0.pack(ragged, stored)
    assert stored.shape == (1, 10) and torch.equal(Q5_0.unpack(stored, 1, 12), ragged)
    assert stored[0, 6:8].tolist() == [0, 0] and stored[0, 9] == 0b0101


def moved(codes: torch.Tensor, positions: torch.Tensor, steps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The codes after the moves in five-bit storage and in int8 storage, and which stored bytes changed."""
    rows, cols = codes.shape
    stored, reference = Q5_0.empty(rows, cols), BYTES.empty(rows, cols)
    Q5_0.pack(codes, stored)
    BYTES.pack(codes, reference)
    before = stored.clone()
    Q5_0.step([stored], [positions], [steps], [cols])
    BYTES.step([reference], [positions], [steps], [cols])
    assert torch.equal(Q5_0.unpack(stored, rows, cols), BYTES.unpack(reference, rows, cols))
    return Q5_0.unpack(stored, rows, cols).view(-1), (stored != before).view(-1).nonzero().view(-1)


def test_steps_carry_across_the_nibble_both_ways_and_clamp_at_both_ends():
    codes = torch.tensor([[-1.0, 0, 15, -16, -1, 0, 14, -15] * 2])
    positions = torch.arange(16)
    steps = torch.tensor([1, -1, 1, -1, 3, -3, 5, -5, 2, -2, 0, 0, 1, -1, -1, 1])
    after, changed = moved(codes, positions, steps)
    # -1 -> 0 is the file's q 15 -> 16 (nibble 15 -> 0, fifth bit set), 0 -> -1 the reverse; 15 + 1 and -16 - 1 stay
    assert after.tolist() == [0, -1, 15, -16, 2, -3, 15, -16, 1, -2, 15, -16, 0, -1, 13, -14]
    assert changed.tolist() == [0, 2, 3, 4, 6, 7, 8, 9]  # not bytes 1 (both clamped) and 5 (steps of 0)
    _, one_changed = moved(codes, torch.tensor([0]), torch.tensor([1]))
    assert one_changed.tolist() == [0, 8]  # a carry rewrites the code's nibble byte and its fifth-bit byte only


@pytest.mark.parametrize("rows, cols", [(3, 32), (17, 256)])
def test_random_moves_match_codes_one_per_byte(rows, cols):
    """Many moves at once, neighbours sharing nibble and fifth-bit bytes, some pushed past the ends."""
    gen = torch.Generator().manual_seed(rows)
    codes = (torch.randint(0, 32, (rows, cols), generator=gen) - 16).float()
    positions = torch.randperm(rows * cols, generator=gen)[: rows * cols // 2]
    steps = torch.randint(-17, 18, (positions.numel(),), generator=gen)
    after, _ = moved(codes, positions, steps)
    expected = codes.view(-1).clone()
    expected[positions] = (expected[positions] + steps).clamp(-16, 15)
    assert torch.equal(after, expected)
