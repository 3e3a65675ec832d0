"""LoRETTA_rep as a PEFT method: `get_peft_model(model, LorettaRepConfig(...))`, `save_pretrained`,
`PeftModel.from_pretrained` and `merge_and_unload` work as for LoRA. Import `ftkit.peft` first (it registers
the method). The layers reuse ftkit's TTLinear, so a PEFT model computes exactly what ftkit trains.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_adapters_to_merge

from ftkit.adapters.peft_types import LorettaPeftConfig, add_peft_type
from ftkit.adapters.targets import REP_TARGETS
from ftkit.adapters.tt import TTLinear

PEFT_TYPE = add_peft_type("LORETTA_REP")


@dataclass
class LorettaRepConfig(LorettaPeftConfig):
    """LoRA whose A (in -> r) and B (r -> out) are tensor trains of rank `tensor_rank`."""

    r: int = field(default=8, metadata={"help": "LoRA rank"})
    alpha: float = field(default=16.0, metadata={"help": "scaling numerator: the update is (alpha / r) B A x"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the adapter's input"})
    shape_a: Optional[list[int]] = field(default=None, metadata={"help": "TT modes of A (default: automatic)"})
    shape_b: Optional[list[int]] = field(default=None, metadata={"help": "TT modes of B (default: automatic)"})

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PEFT_TYPE


class LorettaRepLayer(BaseTunerLayer):
    adapter_layer_names = ("loretta_rep_a", "loretta_rep_b")
    other_param_names = ("loretta_rep_scaling", "loretta_rep_dropout")

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        self.loretta_rep_a = nn.ModuleDict()
        self.loretta_rep_b = nn.ModuleDict()
        self.loretta_rep_dropout = nn.ModuleDict()
        self.loretta_rep_scaling: dict[str, float] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features

    def update_layer(self, adapter_name: str, config: LorettaRepConfig) -> None:
        self.loretta_rep_a[adapter_name] = TTLinear(self.in_features, config.r, config.tensor_rank, config.shape_a,
                                                    init="paper", modes=config.modes)
        self.loretta_rep_b[adapter_name] = TTLinear(config.r, self.out_features, config.tensor_rank, config.shape_b,
                                                    init="paper", zero_last_core=config.init == "identity",
                                                    modes=config.modes)
        self.loretta_rep_dropout[adapter_name] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.loretta_rep_scaling[adapter_name] = config.alpha / config.r
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        a, b = self.loretta_rep_a[adapter], self.loretta_rep_b[adapter]
        return self.loretta_rep_scaling[adapter] * (a.to_matrix() @ b.to_matrix()).T


class LorettaRepLinear(nn.Module, LorettaRepLayer):
    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LorettaRepConfig) -> None:
        super().__init__()
        LorettaRepLayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters and self.merged:
            self.unmerge()
        out = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters or self.merged:
            return out
        for name in self.active_adapters:
            if name not in self.loretta_rep_a:
                continue
            a, b = self.loretta_rep_a[name], self.loretta_rep_b[name]
            h = self.loretta_rep_dropout[name](x).to(a.cores[0].dtype)
            out = out + (self.loretta_rep_scaling[name] * b(a(h))).to(out.dtype)
        return out

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        weight = self.get_base_layer().weight
        for name in check_adapters_to_merge(self, adapter_names):
            if name not in self.loretta_rep_a:
                continue
            merged = weight + self.get_delta_weight(name).to(weight.dtype)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"merging adapter {name!r} gives non-finite weights")
            weight.copy_(merged)
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        weight = self.get_base_layer().weight
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            weight -= self.get_delta_weight(name).to(weight.dtype)

    def __repr__(self) -> str:
        return "loretta_rep." + super().__repr__()


class LorettaRepModel(BaseTuner):
    prefix: str = "loretta_rep_"
    tuner_layer_cls = LorettaRepLayer
    target_module_mapping = REP_TARGETS

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **kwargs):
        if isinstance(target, LorettaRepLayer):
            target.update_layer(adapter_name, config)
            return
        if not isinstance(target, nn.Linear):
            raise TypeError(f"LoRETTA_rep targets torch.nn.Linear layers; {current_key} is {type(target).__name__}")
        new_module = LorettaRepLinear(target, adapter_name, config)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)
