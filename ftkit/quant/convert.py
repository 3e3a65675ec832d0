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

from ftkit.errors import UserError
from ftkit.quant.linear import QuantLinear
from ftkit.quant.scales import SCALE_DTYPES



def skip_patterns(spec) -> list[re.Pattern]:
    return [re.compile(p) for p in spec.skip]


def is_skipped(name: str, patterns: list[re.Pattern]) -> bool:
    return any(p.search(name) for p in patterns)


def convert_linear(linear: nn.Linear, name: str, spec, generator: torch.Generator | None = None) -> nn.Module:
    """The low-bit replacement of one linear layer, by the recipe's engine."""
    if spec.engine == "bitsandbytes":
        from ftkit.quant.bnb import to_bnb_linear

        return to_bnb_linear(linear, spec, compute_dtype=linear.weight.dtype)
    if spec.engine == "straight_through":
        from ftkit.quant.straight_through import StraightThroughLinear

        try:
            return StraightThroughLinear.from_linear(linear, spec)
        except ValueError as err:
            raise UserError(f"quant: cannot quantize layer {name}: {err}") from None
    return to_quant_linear(linear, name, spec, generator)


def to_quant_linear(linear: nn.Linear, name: str, spec, generator: torch.Generator | None = None) -> QuantLinear:
    options = dict(fmt=spec.format, group_size=spec.group_size, scale_dtype=SCALE_DTYPES[spec.scale_dtype],
                   kernel=spec.kernel)
    try:
        if linear.weight.is_meta:
            return QuantLinear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                               device="meta", **options)
        return QuantLinear.from_linear(linear, scale_method=spec.scale_method, rounding=spec.rounding,
                                       generator=generator, **options)
    except ValueError as err:
        raise UserError(f"quant: cannot quantize layer {name}: {err}") from None


def quantize_model(model: nn.Module, spec) -> nn.Module:
    """Replace every nn.Linear whose name matches no `quant.skip` pattern. Returns the same model."""
    patterns = skip_patterns(spec)
    generator = torch.Generator().manual_seed(spec.seed)
    for name in _module_names(model):
        module = model.get_submodule(name)
        if type(module) is nn.Linear and not is_skipped(name, patterns):
            _replace(model, name, convert_linear(module, name, spec, generator))
    return model


def _module_names(model: nn.Module) -> list[str]:
    # Names, not modules: holding the modules would keep every replaced full-precision layer alive.
    return [name for name, _ in model.named_modules()]


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


# --- streaming load ---------------------------------------------------------------------------------------------


def load_quantized_backbone(auto_class, config, spec, dtype: torch.dtype, weights_dir: Path | None,
                            skip_prefix: str = "") -> nn.Module:
    """Build `auto_class` from `config` and quantize it module by module.

    With `weights_dir` the weights come from its safetensors files (sharded or not); without it, from the model's
    own random initialisation. `skip_prefix` is prepended to module names when matching `quant.skip`, so patterns
    see the same names as in the assembled model.
    """
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):  # parameters on meta; buffers (rotary tables...) real
        model = auto_class.from_config(config, dtype=dtype)
    reader = _CheckpointReader(weights_dir, getattr(model, "base_model_prefix", "")) if weights_dir else None
    patterns = skip_patterns(spec)
    generator = torch.Generator().manual_seed(spec.seed)
    tied = getattr(model.config, "tie_word_embeddings", False) and model.get_output_embeddings() is not None
    return_freed_memory_to_the_system()
    for name in _module_names(model):
        module = model.get_submodule(name)
        own = list(module.named_parameters(recurse=False))
        if not own or not any(p.is_meta for _, p in own):
            continue
        module.to_empty(device="cpu", recurse=False)
        if reader is not None:
            with torch.no_grad():
                for leaf, param in module.named_parameters(recurse=False):
                    param.copy_(reader.get(f"{name}.{leaf}" if name else leaf).to(param.dtype))
        else:
            model._init_weights(module)
        if tied and module is model.get_input_embeddings():
            model.tie_weights()  # now, so the output embedding shares this weight instead of allocating its own
        if type(module) is nn.Linear and not is_skipped(skip_prefix + name, patterns):
            _replace(model, name, convert_linear(module, name, spec, generator))
    return model


def return_freed_memory_to_the_system() -> None:
    """Fix glibc's mmap and trim thresholds at 128 KiB.

    By default glibc raises its mmap threshold after large blocks are freed, so the next fp32 layers come from the
    heap and stay resident after they are freed: loading grows by a layer's size per layer. Fixed thresholds keep
    large tensors in their own mappings, returned to the system as soon as a layer is quantized (OPT-125m shape
    into int4: 482 MB resident after loading with the defaults, 326 MB with this).
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD: give back the heap top too
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


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
