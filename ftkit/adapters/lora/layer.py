"""LoRA through PEFT: injection and export.

PEFT wraps full-precision and bitsandbytes layers; ftkit's native low-bit layers are not PEFT layer types, so
LoRA over a native quantized base is refused with a clear message (LoRETTA_rep covers that case).
"""

from __future__ import annotations

import torch.nn as nn

from ftkit.adapters.export import unwrap_layers
from ftkit.adapters.targets import REP_TARGETS, default_targets, freeze_all_but
from ftkit.errors import UserError, first_line


def inject(model: nn.Module, spec) -> nn.Module:
    """PEFT's LoRA layers on the targets of `spec` (method.lora); only they and the task head train."""
    from peft import LoraConfig, inject_adapter_in_model

    backbone = model.backbone
    targets = spec.target_modules or default_targets(REP_TARGETS, backbone.config.model_type,
                                                     "method.lora.target_modules")
    config = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=targets,
                        bias="none")
    try:
        inject_adapter_in_model(config, backbone)
    except ValueError as err:
        raise UserError(f"method.adapter lora: {first_line(err)}") from None
    freeze_all_but(model, lambda n: "lora_" in n or n.startswith(("head.", "pre_head.")))
    return model


def unwrap(model: nn.Module, merge: bool) -> dict:
    from peft.tuners.lora import LoraLayer

    def set_base(layer, base):
        layer.base_layer = base

    return unwrap_layers(model, LoraLayer, lambda layer: layer.get_base_layer(), set_base,
                         lambda layer: layer.merge(), merge, r"lora_")
