"""The byte layout of GGUF's quantized blocks, for ftkit's layers of the same format: a layer's codes and per-group
tensors to a file's rows of blocks and back, with nothing rounded on the way.

A quantized tensor [N, K] in a GGUF file is N rows of K / block_size blocks, each block's bytes in a row as
llama.cpp writes them (gguf.quants reads the same layout):

    Q4_0  float16 d,            16 bytes: byte j holds nibble q_j low, q_(j+16) high      18 bytes per 32
    Q4_1  float16 d, float16 m, the same 16 bytes                                         20 bytes per 32
    Q5_0  float16 d, 4 bytes qh: bit j the high bit of q_j (little-endian), then the
          16 bytes of Q4_0 holding the low four bits of each q                            22 bytes per 32
    Q8_0  float16 d,            32 int8 codes                                             34 bytes per 32

ftkit's layers hold the same numbers (ftkit.quant.gguf_blocks): Q4_0's code is q - 8, Q4_1's q, Q5_0's q - 16,
Q8_0's q, and the scales and minimums are the blocks' float16 d and m. The one difference is a block whose d is 0
(all its weights equal): the layer keeps d = 1 (with d's sign: Q4_0 and Q5_0 write -0) and the same codes, all
zero, so that zeroth-order updates stay finite; its weights are those of d = 0 either way, and writing such a block
puts d = 0 back, so an untouched tensor's bytes come back as they were read.

LAYOUTS maps a format name to its BlockLayout; the K-quants register theirs from kquant_layout.py.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np
import torch
from gguf import GGMLQuantizationType

from ftkit.quant.linear import QuantLinear

BLOCK = 32
# The float tensor types of a GGUF file (norms; a model's unquantized weights): read and written as floats.
FLOAT_TYPES = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)


class BlockLayout(NamedTuple):
    ggml_type: GGMLQuantizationType
    to_file: Callable  # (layer: QuantLinear, rows: slice) -> uint8 [rows, bytes per row]
    from_file: Callable  # (raw uint8 [rows, bytes per row], cols) -> (grid values float32 [rows, cols], {name: tensor})


def _halves(q: np.ndarray) -> np.ndarray:
    """Nibbles 0..15 [rows, blocks, 32] -> the 16 bytes of each block: low nibble q_j, high nibble q_(j+16)."""
    return (q[..., :16] | (q[..., 16:] << 4)).astype(np.uint8)


def _nibbles(packed: np.ndarray) -> np.ndarray:
    """The inverse of _halves: [rows, blocks, 16] bytes -> [rows, blocks, 32] nibbles."""
    return np.concatenate([packed & 0x0F, packed >> 4], axis=-1)


def _f16_bytes(values: torch.Tensor) -> np.ndarray:
    """float16 [rows, blocks] -> their bytes [rows, blocks, 2]."""
    return values.to(torch.float16).numpy().view(np.uint8).reshape(*values.shape, 2)


def _f16(raw: np.ndarray) -> torch.Tensor:
    """Bytes [rows, blocks, 2] -> float16 [rows, blocks]."""
    return torch.from_numpy(np.ascontiguousarray(raw).view(np.float16)[..., 0].copy())


def _zero_blocks_back(scales: torch.Tensor, q: torch.Tensor, zero_code: int) -> torch.Tensor:
    """The file's d: +-0 where the layer keeps d = +-1 for a block whose codes are all `zero_code` (a d of 0 on
    reading, or from ftkit's quantizer)."""
    all_zero = (q == zero_code).all(dim=-1)
    return torch.where(all_zero & (scales.abs() == 1), torch.zeros_like(scales).copysign(scales), scales)


def _blocks(layer: QuantLinear, rows: slice) -> torch.Tensor:
    """The layer's file codes of `rows` as int64 [rows, blocks, 32] (Q4_0: q = code + 8, Q5_0: code + 16; Q8_0's
    file codes are signed, as the layer's)."""
    values = layer.code_values(rows) - layer.codec.qmin if layer.codec.bits < 8 else layer.code_values(rows)
    return values.to(torch.int64).view(values.shape[0], -1, BLOCK)


def _q4_to_file(layer: QuantLinear, rows: slice) -> np.ndarray:
    q = _blocks(layer, rows)
    zero = 8 if layer.codec.signed else 0  # the nibble of code 0
    fields = [_f16_bytes(_zero_blocks_back(layer.scales[rows], q, zero))]
    if not layer.codec.signed:
        fields.append(_f16_bytes(layer.minimums[rows]))
    fields.append(_halves(q.numpy().astype(np.uint8)))
    return np.concatenate(fields, axis=-1).reshape(q.shape[0], -1)


def _q5_to_file(layer: QuantLinear, rows: slice) -> np.ndarray:
    q = _blocks(layer, rows).numpy().astype(np.uint8)
    d = _f16_bytes(_zero_blocks_back(layer.scales[rows], torch.from_numpy(q), 16))
    qh = np.packbits(q >> 4, axis=-1, bitorder="little")  # bit j of the 32 is q_j's fifth bit: 4 bytes
    return np.concatenate([d, qh, _halves(q & 0x0F)], axis=-1).reshape(q.shape[0], -1)


def _q8_to_file(layer: QuantLinear, rows: slice) -> np.ndarray:
    q = _blocks(layer, rows)
    codes = q.numpy().astype(np.int8).view(np.uint8)
    return np.concatenate([_f16_bytes(_zero_blocks_back(layer.scales[rows], q, 0)), codes], -1).reshape(len(q), -1)


def _file_scales(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, torch.ones_like(d).copysign(d), d)  # the module docstring: d = +-0 kept as +-1


def _q4_from_file(signed: bool) -> Callable:
    def read(raw: np.ndarray, cols: int):
        blocks = raw.reshape(raw.shape[0], cols // BLOCK, -1)
        params = {"scales": _file_scales(_f16(blocks[..., 0:2]))}
        if not signed:
            params["minimums"] = _f16(blocks[..., 2:4])
        q = torch.from_numpy(_nibbles(blocks[..., -16:]).astype(np.float32))
        return (q - 8 if signed else q).reshape(raw.shape[0], cols), params
    return read


def _q5_from_file(raw: np.ndarray, cols: int):
    blocks = raw.reshape(raw.shape[0], cols // BLOCK, -1)
    high = np.unpackbits(blocks[..., 2:6], axis=-1, bitorder="little")
    q = torch.from_numpy((_nibbles(blocks[..., 6:]) | (high << 4)).astype(np.float32))
    return (q - 16).reshape(raw.shape[0], cols), {"scales": _file_scales(_f16(blocks[..., 0:2]))}


def _q8_from_file(raw: np.ndarray, cols: int):
    blocks = raw.reshape(raw.shape[0], cols // BLOCK, -1)
    q = torch.from_numpy(np.ascontiguousarray(blocks[..., 2:]).view(np.int8).astype(np.float32))
    return q.reshape(raw.shape[0], cols), {"scales": _file_scales(_f16(blocks[..., 0:2]))}


LAYOUTS: dict[str, BlockLayout] = {
    "q4_0": BlockLayout(GGMLQuantizationType.Q4_0, _q4_to_file, _q4_from_file(signed=True)),
    "q4_1": BlockLayout(GGMLQuantizationType.Q4_1, _q4_to_file, _q4_from_file(signed=False)),
    "q5_0": BlockLayout(GGMLQuantizationType.Q5_0, _q5_to_file, _q5_from_file),
    "q8_0": BlockLayout(GGMLQuantizationType.Q8_0, _q8_to_file, _q8_from_file),
}
BY_TYPE = {layout.ggml_type: fmt for fmt, layout in LAYOUTS.items()}


def layer_from_file(fmt: str, raw: np.ndarray, cols: int, bias: torch.Tensor | None = None,
                    kernel: str = "auto") -> QuantLinear:
    """A `fmt` layer holding the blocks `raw` (uint8 [N, bytes per row], a file's tensor as gguf's reader gives it)
    as they are: its weights are gguf.quants.dequantize's of `raw`, exactly."""
    layer = QuantLinear(cols, raw.shape[0], fmt, bias=bias is not None, kernel=kernel)
    for block in layer.row_blocks():  # a block of rows at a time: temporaries stay small on large layers
        grid_values, params = LAYOUTS[fmt].from_file(raw[block], cols)
        for name, value in params.items():
            getattr(layer, name)[block] = value
        layer.set_code_values(grid_values, block)
    if bias is not None:
        layer.bias.data.copy_(bias)
    return layer


def layer_to_file(layer: QuantLinear) -> np.ndarray:
    """The layer's codes and per-group tensors as the file's blocks, uint8 [N, bytes per row]."""
    return np.concatenate([LAYOUTS[layer.fmt].to_file(layer, rows) for rows in layer.row_blocks()])
