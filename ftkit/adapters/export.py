"""Take adapters out of a model for export: merge them into the base weights where that is exact, or set them aside
as tensors of their own, leaving a plain Hugging Face model behind. Each adapter's `unwrap` (ftkit.components.Adapter)
calls `unwrap_layers` with what is particular to its layers."""

from __future__ import annotations

import re
from typing import Callable

import torch
import torch.nn as nn

from ftkit.modules import module_names, replace_module
from ftkit.quant.io import dequantize_model


def unwrap_layers(model: nn.Module, layer_type: type, base_of: Callable, set_base: Callable,
                  merge_layer: Callable | None, merge: bool, own: str) -> dict[str, torch.Tensor]:
    """Replace every `layer_type` module of `model` by its base layer, dequantized if it was quantized.

    With `merge`, `merge_layer(layer)` adds the layer's update to its (now full-precision) base weight first and
    nothing is returned; without, the layer's own tensors (state-dict keys matching `own`) are returned under their
    names in the wrapped model."""
    set_aside: dict[str, torch.Tensor] = {}
    for name in module_names(model):
        try:
            layer = model.get_submodule(name)
        except AttributeError:  # inside a layer already replaced
            continue
        if not isinstance(layer, layer_type):
            continue
        base = base_of(layer)
        if not isinstance(base, nn.Linear):
            holder = nn.Module()
            holder.layer = base
            base = dequantize_model(holder).layer
            set_base(layer, base)
        if merge:
            merge_layer(layer)
        else:
            set_aside.update({f"{name}.{key}": value.detach().contiguous()
                              for key, value in layer.state_dict().items() if re.search(own, key)})
        replace_module(model, name, base)
    return set_aside
