"""Convert a model's linear layers to a low-bit format, in place or while it is being built.

`quantize_model` replaces the `nn.Linear` modules of a model that already exists. `load_quantized_backbone` builds
the model with its parameters on the meta device and then materialises one module at a time (read from the
safetensors checkpoint, or randomly initialised from a config), quantizing each linear layer as soon as its
weight exists: the full-precision model never exists in memory at once.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import torch.nn as nn

from ftkit import devices
from ftkit.devices import model_device
from ftkit.errors import UserError
from ftkit.memory import memory_returned_while_loading
from ftkit.modules import module_names, replace_module
from ftkit.quant import ENGINES, FORMATS
from ftkit.quant.linear import QuantLinear
from ftkit.quant.scales import SCALE_DTYPES


def skip_patterns(spec) -> list[re.Pattern]:
    return [re.compile(p) for p in spec.skip]


def is_skipped(name: str, patterns: list[re.Pattern]) -> bool:
    return any(p.search(name) for p in patterns)


def convert_linear(linear: nn.Linear, name: str, spec, generator: torch.Generator | None = None) -> nn.Module:
    """The low-bit replacement of one linear layer, by the recipe's engine (ftkit.quant.ENGINES)."""
    return ENGINES[spec.engine].convert(linear, name, spec, generator)


def to_quant_linear(linear: nn.Linear, name: str, spec, generator: torch.Generator | None = None) -> QuantLinear:
    """The native engine: codes and scales of the recipe's format (nearest or stochastic first rounding)."""
    options = dict(fmt=spec.format, group_size=spec.group_size, scale_dtype=SCALE_DTYPES[spec.scale_dtype],
                   kernel=spec.kernel)
    try:
        return QuantLinear.from_linear(linear, scale_method=spec.scale_method, rounding=spec.rounding,
                                       generator=generator, **options)
    except ValueError as err:
        raise UserError(f"quant: cannot quantize layer {name}: {err}") from None


def quantize_model(model: nn.Module, spec, skip_prefix: str = "") -> nn.Module:
    """Replace every nn.Linear whose name (after `skip_prefix`) matches no `quant.skip` pattern by the engine's
    layer. Returns the same model (unchanged for a full-precision format)."""
    if not FORMATS[spec.format].low_bit:
        return model
    patterns = skip_patterns(spec)
    generator = devices.generator(spec.seed, model_device(model))
    for name in module_names(model):
        module = model.get_submodule(name)
        if type(module) is nn.Linear and not is_skipped(skip_prefix + name, patterns):
            replace_module(model, name, convert_linear(module, name, spec, generator))
    return model


# --- streaming load ---------------------------------------------------------------------------------------------


def load_quantized_backbone(auto_class, config, spec, dtype: torch.dtype, weights_dir: Path | None,
                            skip_prefix: str = "", device: torch.device | str = "cpu") -> nn.Module:
    """Build `auto_class` from `config` and quantize it module by module, on `device`.

    Each module is materialised on the device, filled from the safetensors files of `weights_dir` (sharded or not,
    read one tensor at a time) or by the model's own random initialisation, and its linear layers quantized there:
    neither host memory nor the device ever holds the full-precision model. `skip_prefix` is prepended to module
    names when matching `quant.skip`, so patterns see the same names as in the assembled model.
    """
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):  # parameters on meta; buffers (rotary tables...) real
        model = auto_class.from_config(config, dtype=dtype)
    reader = _CheckpointReader(weights_dir, getattr(model, "base_model_prefix", "")) if weights_dir else None
    patterns = skip_patterns(spec)
    generator = devices.generator(spec.seed, device)
    tied = getattr(model.config, "tie_word_embeddings", False) and model.get_output_embeddings() is not None
    with memory_returned_while_loading():  # loading returns freed layers; training then reuses freed blocks
        for name in module_names(model):
            module = model.get_submodule(name)
            own = list(module.named_parameters(recurse=False))
            if not own or not any(p.is_meta for _, p in own):
                continue
            module.to_empty(device=device, recurse=False)
            if reader is not None:
                with torch.no_grad():
                    for leaf, param in module.named_parameters(recurse=False):
                        param.copy_(reader.get(f"{name}.{leaf}" if name else leaf).to(param.dtype))
            else:
                model._init_weights(module)
            if tied and module is model.get_input_embeddings():
                model.tie_weights()  # now, so the output embedding shares this weight instead of allocating its own
            if type(module) is nn.Linear and not is_skipped(skip_prefix + name, patterns):
                replace_module(model, name, convert_linear(module, name, spec, generator))
    return model.to(device)  # buffers built with the config (rotary tables, position ids) join the weights


class _CheckpointReader:
    """Reads one tensor at a time from a directory's safetensors files (memory-mapped, never all at once)."""

    def __init__(self, directory: Path, prefix: str):
        from safetensors import safe_open

        index = directory / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = [p.name for p in sorted(directory.glob("*.safetensors"))]
        if not files:
            raise UserError(f"{directory}: no safetensors weights to stream into a quantized model "
                            f"(convert the checkpoint to safetensors, or set quant.format: none)")
        self.handles = {f: safe_open(str(directory / f), framework="pt") for f in files}
        self.location = {key: f for f, handle in self.handles.items() for key in handle.keys()}
        self.prefix = prefix

    def get(self, name: str) -> torch.Tensor:
        for key in (name, f"{self.prefix}.{name}", name.removeprefix(f"{self.prefix}.")):
            if key in self.location:
                return self.handles[self.location[key]].get_tensor(key)
        raise UserError(f"checkpoint has no tensor for {name}")
