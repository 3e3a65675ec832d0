"""The bitsandbytes engine: a frozen base in nf4 / fp4 (4-bit) or LLM.int8, by module replacement.

bitsandbytes quantizes a layer when it is moved to its device (`.to("cpu")` runs its CPU kernels, from version
0.48 on; `.to("cuda")` its GPU ones). Its 4-bit weights are stored two per byte as a flat uint8 tensor, so
parameter counts use the layer's shape, not the tensor's numel.
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn

# Bytes of quantization statistics: one fp32 absmax per block of 64 weights, or with double quantization one byte
# per block plus one fp32 per 256 blocks.
BLOCK = 64
BNB_LOGGER = "bitsandbytes.backends.cpu.ops"  # quiet until this engine is chosen (ftkit/__init__.py)


def to_bnb_linear(linear: nn.Linear, name: str, spec, generator=None) -> nn.Module:
    """The bitsandbytes engine's conversion: int4 as nf4 / fp4, int8 as LLM.int8; computes in the layer's dtype."""
    logging.getLogger(BNB_LOGGER).setLevel(logging.NOTSET)  # the engine is chosen: its notes concern the run
    import bitsandbytes as bnb

    device, compute_dtype = linear.weight.device, linear.weight.dtype
    options = spec.bitsandbytes
    if spec.format == "int4":
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                  compute_dtype=compute_dtype, quant_type=options.int4_type,
                                  compress_statistics=options.double_quant,
                                  device="meta" if device.type == "meta" else None)
    else:
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                    has_fp16_weights=False, threshold=options.int8_threshold,
                                    device="meta" if device.type == "meta" else None)
    if device.type != "meta":
        layer.load_state_dict(linear.state_dict())
        layer = layer.to(device)  # quantizes here
    layer.weight.requires_grad_(False)  # the codes are frozen; the bias stays trainable, as in native layers
    return layer


def bnb_counts(module: nn.Module) -> dict | None:
    """Logical weight count and stored bytes (codes + statistics, bias excluded) of a bitsandbytes linear layer's
    weight, from its shape; None for other modules."""
    kind = type(module).__name__
    if kind not in ("Linear4bit", "Linear8bitLt"):
        return None
    weights = module.in_features * module.out_features
    if kind == "Linear4bit":
        blocks = -(-weights // BLOCK)
        double = getattr(module.weight, "compress_statistics", False)
        stats = blocks + 4 * -(-blocks // 256) + 4 if double else 4 * blocks
        stored = weights // 2 + stats
    else:
        stored = weights + 4 * module.out_features  # int8 codes and one fp32 scale per row
    return {"weight_params": weights, "stored_bytes": stored}


def count_tensor(module: nn.Module, leaf: str, tensor: torch.Tensor):
    """The bitsandbytes engine's counting (ftkit.components.Engine.count): a weight stands for its layer's logical
    parameters and takes its codes' and statistics' bytes; it is never trained."""
    figures = bnb_counts(module)
    if figures is None or leaf != "weight":
        return None
    return figures["weight_params"], figures["stored_bytes"], False
