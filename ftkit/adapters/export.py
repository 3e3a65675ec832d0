"""Take adapters out of a model for export: merge them into the base weights where that is exact, or set them
aside as tensors of their own, leaving a plain Hugging Face model behind."""

from __future__ import annotations

import torch
import torch.nn as nn

from ftkit.adapters.loretta_adp import OutputAdapter
from ftkit.adapters.loretta_rep import LorettaRepLinear
from ftkit.adapters.targets import replace_module
from ftkit.errors import UserError
from ftkit.quant.io import dequantize_model


def unwrap_adapters(model: nn.Module, merge: bool) -> dict[str, torch.Tensor]:
    """Replace every adapter wrapper in `model` by its base layer (dequantized if it was quantized).

    With `merge`, LoRETTA_rep and LoRA updates are added to the base weights (exact up to float rounding) and
    nothing is returned; LoRETTA_adp cannot merge (it has a nonlinearity). Without `merge`, the adapter tensors
    are returned under their names in the wrapped model, and the base is left as it was."""
    from peft.tuners.lora import LoraLayer

    set_aside: dict[str, torch.Tensor] = {}
    for name in [n for n, _ in model.named_modules()]:
        try:
            module = model.get_submodule(name)
        except AttributeError:  # inside a wrapper already replaced
            continue
        if isinstance(module, (OutputAdapter, LorettaRepLinear)) or isinstance(module, LoraLayer):
            if merge and isinstance(module, OutputAdapter):
                raise UserError("LoRETTA_adp adapters have a nonlinearity and cannot be merged into the base "
                                "weights; export without --merge to keep them as their own tensors")
            base = module.get_base_layer() if isinstance(module, LoraLayer) else module.base
            if not isinstance(base, nn.Linear):
                holder = nn.Module()
                holder.layer = base
                base = dequantize_model(holder).layer
                if isinstance(module, LoraLayer):
                    module.base_layer = base
                else:
                    module.base = base
            if merge:
                module.merge()
            else:
                set_aside.update({f"{name}.{k}": v.detach().contiguous() for k, v in module.state_dict().items()
                                  if "loretta_" in k or "lora_" in k})
            replace_module(model, name, base)
    return set_aside
