"""LoRETTA_adp as a PEFT method: `get_peft_model(model, LorettaAdpConfig(...))`, `save_pretrained` and
`PeftModel.from_pretrained` work as for any PEFT method; import `ftkit.peft` first (it registers the method).

Each targeted linear layer gets a TT bottleneck adapter on its output (default) or, for modules listed in
`input_modules`, on its input; placement defaults follow ftkit's (BERT family: attention-output and FFN-output
dense layers; LLaMA: gate/up inputs and down output; OPT: fc1 input and fc2 output). With `train_norms` the
model's normalisation layers are added to `modules_to_save`, so PEFT trains and saves them as the paper does.

The adapters are nonlinear (bottleneck, activation, residual), so they cannot be folded into a weight:
`merge_and_unload` raises; `unload()` removes them, and `ftkit export` keeps them as modules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer

from ftkit.adapters.loretta_adp.layer import NONLINEARITIES, TTAdapter
from ftkit.adapters.peft_types import LorettaPeftConfig, add_peft_type
from ftkit.adapters.targets import ADP_TARGETS, is_norm, matches

PEFT_TYPE = add_peft_type("LORETTA_ADP")

NOT_MERGEABLE = ("LoRETTA_adp adapters are nonlinear (TT bottleneck, activation, residual) and cannot be merged "
                 "into the base weights; use unload() to remove them, or keep them as modules")


@dataclass
class LorettaAdpConfig(LorettaPeftConfig):
    """Bottleneck adapters h -> bottleneck -> h whose projections are tensor trains of rank `tensor_rank`."""

    bottleneck: int = field(default=64, metadata={"help": "adapter width"})
    shapes: dict[str, list[int]] = field(default_factory=dict, metadata={"help": "TT modes: 'down' and/or 'up'"})
    nonlinearity: str = field(default="relu", metadata={"help": "relu, gelu, tanh or silu"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the adapter's input"})
    scaling: float = field(default=1.0, metadata={"help": "multiplies the adapter's update"})
    train_norms: bool = field(default=True, metadata={"help": "train and save the model's normalisation layers"})
    input_modules: Optional[list[str]] = field(default=None, metadata={"help": "targets adapted on their input"})

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PEFT_TYPE
        if self.nonlinearity not in NONLINEARITIES:
            raise ValueError(f"nonlinearity must be one of {sorted(NONLINEARITIES)}, got {self.nonlinearity!r}")


class LorettaAdpLayer(BaseTunerLayer):
    adapter_layer_names = ("loretta_adp_adapter",)
    other_param_names = ("loretta_adp_on_input",)

    def __init__(self, base_layer: nn.Module, on_input: bool) -> None:
        self.base_layer = base_layer
        self.loretta_adp_adapter = nn.ModuleDict()
        self.loretta_adp_on_input = on_input
        self._disable_adapters = False
        self.merged_adapters = []
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features

    def update_layer(self, adapter_name: str, config: LorettaAdpConfig) -> None:
        hidden = self.in_features if self.loretta_adp_on_input else self.out_features
        self.loretta_adp_adapter[adapter_name] = TTAdapter(hidden, config)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)


class LorettaAdpLinear(nn.Module, LorettaAdpLayer):
    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LorettaAdpConfig, on_input: bool) -> None:
        super().__init__()
        LorettaAdpLayer.__init__(self, base_layer, on_input)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def _adapt(self, h: torch.Tensor) -> torch.Tensor:
        if self.disable_adapters:
            return h
        for name in self.active_adapters:
            if name in self.loretta_adp_adapter:
                h = self.loretta_adp_adapter[name](h)
        return h

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.loretta_adp_on_input:
            return self.base_layer(self._adapt(x), *args, **kwargs)
        return self._adapt(self.base_layer(x, *args, **kwargs))

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        raise ValueError(NOT_MERGEABLE)

    def unmerge(self) -> None:
        pass  # never merged

    def __repr__(self) -> str:
        return "loretta_adp." + super().__repr__()


class LorettaAdpModel(BaseTuner):
    prefix: str = "loretta_adp_"
    tuner_layer_cls = LorettaAdpLayer
    target_module_mapping = {kind: sum(places.values(), []) for kind, places in ADP_TARGETS.items()}

    def _prepare_adapter_config(self, config: LorettaAdpConfig, model_config: dict) -> LorettaAdpConfig:
        if config.target_modules is None and config.input_modules is None:
            config.input_modules = ADP_TARGETS.get(model_config.get("model_type"), {}).get("input", [])
        return super()._prepare_adapter_config(config, model_config)

    def _prepare_model(self, config: LorettaAdpConfig, model: nn.Module) -> None:
        if config.train_norms:
            norms = [name for name, module in model.named_modules()
                     if name and is_norm(name) and not list(module.children())
                     and next(module.parameters(), None) is not None]
            config.modules_to_save = sorted(set(config.modules_to_save or []) | set(norms))

    def _create_and_replace(self, config, adapter_name, target, target_name, parent, current_key, **kwargs):
        if isinstance(target, LorettaAdpLayer):
            target.update_layer(adapter_name, config)
            return
        if not isinstance(target, nn.Linear):
            raise TypeError(f"LoRETTA_adp targets torch.nn.Linear layers; {current_key} is {type(target).__name__}")
        on_input = matches(current_key, config.input_modules or [])
        new_module = LorettaAdpLinear(target, adapter_name, config, on_input)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _check_merge_allowed(self):
        raise ValueError(NOT_MERGEABLE)
