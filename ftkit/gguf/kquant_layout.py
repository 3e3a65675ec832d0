"""The byte layout of GGUF's K-quant super-blocks, for ftkit's q4_k and q6_k layers (ftkit.quant.kquants): a layer's
codes and stored tensors to a file's rows of blocks and back, with nothing rounded on the way (the layer stores
the file's d, dmin and sub-block scales themselves).

A row of K weights is K / 256 blocks, each laid out as llama.cpp writes it (gguf.quants reads the same):

    Q4_K  float16 d | float16 dmin | 12 bytes of 6-bit scales and minimums | 128 bytes of codes      144 bytes
          code bytes: 4 chunks of 32 bytes, chunk c holding sub-block 2c in its low nibbles and 2c + 1 in its high
    Q6_K  128 bytes ql | 64 bytes qh | 16 int8 scales | float16 d                                   210 bytes
          q (0..63) of weight j of half h (128 weights each, r = j mod 128): low four bits in nibble r // 64 of
          ql byte 64 h + r mod 64, high two bits at bit 2 (r // 32) of qh byte 32 h + r mod 32

Importing this module registers both in ftkit.gguf.layout's LAYOUTS (the package imports it).
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType

from ftkit.gguf.layout import BY_TYPE, LAYOUTS, BlockLayout
from ftkit.quant.kquants import SUPER_BLOCK

Q4_K_BYTES, Q6_K_BYTES = 144, 210


def _f16_bytes(values: torch.Tensor) -> np.ndarray:
    """float16 [rows, blocks] -> their bytes [rows, blocks, 2]."""
    return values.to(torch.float16).cpu().numpy().view(np.uint8).reshape(*values.shape, 2)


def _f16(raw: np.ndarray) -> torch.Tensor:
    """Bytes [rows, blocks, 2] -> float16 [rows, blocks]."""
    return torch.from_numpy(np.ascontiguousarray(raw).view(np.float16)[..., 0].copy())


def _codes(layer, rows: slice, offset: int) -> np.ndarray:
    """The layer's codes of `rows` as the file's q (code + offset), uint8 [rows, blocks, 256]."""
    q = (layer.code_values(rows) + offset).to(torch.uint8).cpu().numpy()
    return q.reshape(q.shape[0], -1, SUPER_BLOCK)


def q4_k_to_file(layer, rows: slice) -> np.ndarray:
    """uint8 [rows, K / 256 * 144]: the file's bytes of the layer's `rows`."""
    q = _codes(layer, rows, 0).reshape(-1, 1, 4, 2, 32)[:, 0]  # [rows * blocks, chunk, low / high, 32]
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)
    stored = layer.stored_params(rows)
    n = rows.stop - rows.start
    fields = [_f16_bytes(stored["d"]).reshape(-1, 2), _f16_bytes(stored["dmin"]).reshape(-1, 2),
              stored["sub_scales"].cpu().numpy().reshape(-1, 12), qs]
    return np.concatenate(fields, axis=-1).reshape(n, -1)


def q4_k_from_file(raw: np.ndarray, cols: int):
    """The inverse of `q4_k_to_file`: (grid values float32 [rows, cols], {d, dmin, sub_scales})."""
    n, blocks = raw.shape[0], cols // SUPER_BLOCK
    block = raw.reshape(n, blocks, Q4_K_BYTES)
    qs = block[..., 16:].reshape(n, blocks, 4, 1, 32)
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=3)  # [rows, blocks, chunk, low / high, 32]
    params = {"d": _f16(block[..., 0:2]), "dmin": _f16(block[..., 2:4]),
              "sub_scales": torch.from_numpy(np.ascontiguousarray(block[..., 4:16]).reshape(n, blocks * 12))}
    return torch.from_numpy(q.astype(np.float32).reshape(n, cols)), params


def q6_k_to_file(layer, rows: slice) -> np.ndarray:
    q = _codes(layer, rows, 32).reshape(-1, 2, 128)  # [rows * blocks, half, 128]
    ql = (q[..., :64] & 0x0F) | ((q[..., 64:] & 0x0F) << 4)
    high = (q >> 4).reshape(-1, 2, 4, 32)
    qh = high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)
    stored = layer.stored_params(rows)
    fields = [ql.reshape(-1, 128), qh.reshape(-1, 64), stored["sub_scales"].cpu().numpy().view(np.uint8).reshape(-1, 16),
              _f16_bytes(stored["d"]).reshape(-1, 2)]
    return np.concatenate(fields, axis=-1).reshape(rows.stop - rows.start, -1)


def q6_k_from_file(raw: np.ndarray, cols: int):
    n, blocks = raw.shape[0], cols // SUPER_BLOCK
    block = raw.reshape(n * blocks, Q6_K_BYTES)
    ql, qh = block[:, :128].reshape(-1, 2, 1, 64), block[:, 128:192].reshape(-1, 2, 1, 32)
    low = np.concatenate([ql & 0x0F, ql >> 4], axis=2).reshape(-1, 2, 128)
    high = np.concatenate([(qh >> s) & 0x03 for s in (0, 2, 4, 6)], axis=2).reshape(-1, 2, 128)
    q = (low | (high << 4)).astype(np.float32) - 32
    params = {"d": _f16(block[:, 208:210].reshape(n, blocks, 2)),
              "sub_scales": torch.from_numpy(np.ascontiguousarray(block[:, 192:208]).view(np.int8).reshape(n, -1))}
    return torch.from_numpy(q.reshape(n, cols)), params


KQUANT_LAYOUTS = {"q4_k": BlockLayout(GGMLQuantizationType.Q4_K, q4_k_to_file, q4_k_from_file),
                  "q6_k": BlockLayout(GGMLQuantizationType.Q6_K, q6_k_to_file, q6_k_from_file)}
LAYOUTS.update(KQUANT_LAYOUTS)
BY_TYPE.update({layout.ggml_type: fmt for fmt, layout in KQUANT_LAYOUTS.items()})
