"""ftkit: fine-tune language models on a small memory budget (QuZO, MeZO, LoRETTA, first-order baselines).

The command line (`ftkit train RECIPE`) and the library are the same components. The library:

    ftkit.load_recipe(path, overrides)    a recipe file, checked, as the CLI reads it (ftkit.Recipe)
    ftkit.recipe_from_dict(data)          a recipe built in Python, checked key by key
    ftkit.train(recipe)                   what `ftkit train` runs: checkpoints, metrics, summary
    ftkit.quantize(model, "int4", ...)    a model's linear layers converted in place to a low-bit format
    ftkit.load_model(name)                a pretrained model (hub id, local directory or packaged name)
    ftkit.load_quantized(name, "int4")    a pretrained model streamed straight into a low-bit format
    ftkit.load_tokenizer(name)            its tokenizer (hub id, local directory or packaged name)
    ftkit.add_adapter(model, "loretta_rep", r=8, ...)   LoRETTA (or LoRA) inserted, the rest frozen
    ftkit.count_parameters(model)         total, trainable and stored bytes, as `ftkit count-params`
    ftkit.optim.MeZO, ftkit.optim.QuZO    zeroth-order methods as torch optimizers: step(closure)
    ftkit.hf.ZOTrainer                    a transformers.Trainer whose step is MeZO or QuZO
    ftkit.peft                            LorettaRepConfig / LorettaAdpConfig for peft.get_peft_model

Importing ftkit imports no torch: each name is imported when first touched (docs/library.md).
"""

import importlib
import logging

__version__ = "0.1.0"

# bitsandbytes logs, when imported, that an optional package for its CPU 4-bit kernel is missing. PEFT imports it
# whenever it is installed, so every adapter run would start with that line; ftkit.quant.bnb, which alone uses
# bitsandbytes' layers, lets the line through (ftkit.quant.bnb.BNB_LOGGER).
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

_LAZY = {
    **{name: "ftkit.recipe" for name in ("Recipe", "load_recipe", "recipe_from_dict", "recipe_to_dict")},
    **{name: "ftkit.api" for name in ("train", "quantize", "load_model", "load_quantized", "load_tokenizer",
                                      "add_adapter", "count_parameters")},
}
_SUBMODULES = ("optim", "hf", "peft", "recipe", "components")


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"ftkit.{name}")
    raise AttributeError(f"module 'ftkit' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_LAZY, *_SUBMODULES])


__all__ = [*_LAZY, *_SUBMODULES]
