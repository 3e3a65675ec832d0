"""The library API: what `ftkit train` does, as calls for a training script of your own. Every function runs the
same components as the CLI (no second implementation); `ftkit/__init__.py` lists them."""

from __future__ import annotations

from pathlib import Path

import torch.nn as nn

from ftkit.recipe import Recipe, recipe_from_dict
from ftkit.recipe.load import check_recipe
from ftkit.recipe.schema import DEFAULT_QUANT_SKIP


def train(recipe: Recipe | str | Path, overrides: list[str] = (), resume: bool | str = False,
          allow_inexact: bool = False) -> dict:
    """Train a recipe exactly as `ftkit train` does: checkpoints and metrics in its run directory. `recipe`: a Recipe,
    a YAML file with dotted overrides, or a run directory (its own recipe.yaml, trained where the directory is).
    `resume`: True continues from the newest intact checkpoint, "auto" too when there is one. Returns the run's
    summary (summary.json)."""
    from ftkit.training import rundir
    from ftkit.training.loop import train as run

    if not isinstance(recipe, Recipe):
        recipe = rundir.recipe_to_train(Path(recipe), list(overrides))
    return run(recipe, resume=resume, allow_inexact=allow_inexact)


def quantize(model: nn.Module, format: str = "int4", *, group_size: int = 0, engine: str = "native",
             scale_method: str = "absmax", scale_dtype: str = "bfloat16", rounding: str = "nearest", seed: int = 0,
             skip: list[str] | None = None, kernel: str = "auto", trainable: bool = True) -> nn.Module:
    """Convert a model's linear layers in place to a low-bit format (int8, int4, fp8_e4m3, fp8_e5m2; engines
    native, bitsandbytes or straight_through), with `quant.*`'s meaning and checks; layers whose names match a
    `skip` pattern (default: heads, LM head, pooler) stay in full precision. With `trainable`, QuZO trains the new
    layers' codes (their `train_codes`, the counterpart of requires_grad). Returns the model."""
    from ftkit.quant.convert import quantize_model

    options = {"format": format, "group_size": group_size, "engine": engine, "scale_method": scale_method,
               "scale_dtype": scale_dtype, "rounding": rounding, "seed": seed, "kernel": kernel,
               "skip": list(DEFAULT_QUANT_SKIP if skip is None else skip)}
    spec = _checked({"quant": options}, "ftkit.quantize").quant
    quantize_model(model, spec)
    for module in model.modules():
        if hasattr(module, "train_codes"):
            module.train_codes = trainable
    return model


def load_model(name_or_dir: str, format: str = "none", *, device: str = "cpu", kind: str = "causal_lm",
               dtype: str = "float32", trainable: bool = True, **quant) -> nn.Module:
    """A pretrained model (a hub id, a local directory, or a packaged name such as smollm2-135m) as `ftkit train`
    loads it, with its LM head (kind causal_lm) or without a head (kind encoder), on `device`. With a low-bit
    `format` it is streamed straight into that format one module at a time, so its full-precision weights never
    all exist at once; `quant` takes quantize's options (group_size=64, ...) and `trainable` marks the low-bit
    codes for QuZO as in quantize."""
    from ftkit.devices import resolve_device
    from ftkit.models.load import load_backbone

    recipe = _checked({"model": {"name": name_or_dir, "kind": kind, "dtype": dtype},
                       "quant": {"format": format, **quant}}, "ftkit.load_model")
    model = load_backbone(recipe.model, kind, quant=recipe.quant, device=resolve_device(device))
    for module in model.modules():
        if hasattr(module, "train_codes"):
            module.train_codes = trainable
    return model


def load_quantized(name_or_dir: str, format: str = "int4", **options) -> nn.Module:
    """`load_model` in a low-bit format (int4 unless named): ftkit.load_quantized("smollm2-135m", "int4",
    group_size=64, device="cuda")."""
    return load_model(name_or_dir, format, **options)


def load_tokenizer(name_or_dir: str):
    """The tokenizer of a hub id, local directory or packaged name, as `ftkit train` loads it (a pad token set
    where the model has none)."""
    from ftkit.models.load import load_tokenizer as load

    return load(_checked({"model": {"name": name_or_dir}}, "ftkit.load_tokenizer").model)


class _Holder(nn.Module):
    """The shape adapters inject into: the model as `.backbone` (they freeze all but their own tensors)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.backbone = model


def add_adapter(model: nn.Module, name: str, **options) -> nn.Module:
    """Insert an adapter (loretta_rep, loretta_adp, lora, or one registered in ftkit.adapters.ADAPTERS) into a
    Hugging Face model in place, with its recipe section's options (e.g. r=8, tensor_rank=5, target_modules=[...]),
    and freeze everything it does not train (quantized layers' codes included). Returns the model."""
    from ftkit.adapters import ADAPTERS

    adapter = ADAPTERS.choose(name, "ftkit.add_adapter")
    if adapter.inject is None:
        raise ValueError(f"'{name}' is not an adapter: it trains the model's own parameters")
    sections = {adapter.section.name: options} if adapter.section else {}
    recipe = _checked({"method": {"adapter": name, **sections}}, "ftkit.add_adapter")
    adapter.inject(_Holder(model), getattr(recipe.method, adapter.section.name) if adapter.section else None)
    return model


def count_parameters(model: nn.Module) -> dict:
    """{"total", "trainable", "stored_bytes", "groups": {...}} as `ftkit count-params` gives them: low-bit layers
    count their logical weights and real bytes, quantized codes QuZO trains count as trainable."""
    from ftkit.models.count import count_model

    return count_model(model)


def _checked(sections: dict, where: str) -> Recipe:
    """A recipe holding `sections`, checked as a recipe file is (types, names, combinations)."""
    recipe = recipe_from_dict(sections, where)
    check_recipe(recipe, where)
    return recipe


__all__ = ["add_adapter", "count_parameters", "load_model", "load_quantized", "load_tokenizer", "quantize", "train"]
