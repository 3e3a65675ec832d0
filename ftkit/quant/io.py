"""Saving quantized layers (codes + per-group tensors + format metadata) and exporting a dequantized Hugging Face
model (each layer decoded by its codec)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from ftkit.modules import replace_module
from ftkit.quant.linear import QuantLinear

METADATA_KEY = "ftkit.quant"


def quant_layers(model: nn.Module) -> dict[str, QuantLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}


def quant_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every quantized layer's codes and per-group tensors (scales, and minimums where its codec has them), and a
    metadata entry describing their formats."""
    tensors, layout = {}, {}
    for name, layer in quant_layers(model).items():
        tensors[f"{name}.codes"] = layer.codes
        tensors.update({f"{name}.{param}": value for param, value in layer.stored_params().items()})
        layout[name] = {"format": layer.fmt, "group_size": layer.group_size, "in": layer.in_features,
                        "out": layer.out_features, "scale_dtype": str(layer.scales.dtype).removeprefix("torch.")}
    return tensors, ({METADATA_KEY: json.dumps(layout, sort_keys=True)} if layout else {})


def check_layout(model: nn.Module, metadata: dict | None, source: str) -> None:
    """Refuse to load codes written for another format or shape."""
    saved = json.loads((metadata or {}).get(METADATA_KEY, "{}"))
    current = json.loads(quant_state(model)[1].get(METADATA_KEY, "{}"))
    if saved != current:
        differing = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
        name = differing[0]
        raise ValueError(f"{source}: layer {name} was saved as {saved.get(name)} but the model has {current.get(name)}")


def dequantize_model(model: nn.Module) -> nn.Module:
    """Replace every QuantLinear (and straight-through layer) by an nn.Linear holding the weight the layer computes
    with, dequantized (in place)."""
    from ftkit.quant.straight_through import StraightThroughLinear

    layers = {name: m for name, m in model.named_modules() if isinstance(m, (QuantLinear, StraightThroughLinear))}
    for name, layer in layers.items():
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
        weight = layer.dequantize() if isinstance(layer, QuantLinear) else layer.quantized_weight()
        with torch.no_grad():
            linear.weight.copy_(weight)
            if layer.bias is not None:
                linear.bias.copy_(layer.bias)
        replace_module(model, name, linear)
    return model


def export_hf(backbone: nn.Module, tokenizer, out_dir: Path) -> None:
    """Write a plain Hugging Face model directory (dequantized weights) that `from_pretrained` loads."""
    dequantize_model(backbone)
    backbone.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
