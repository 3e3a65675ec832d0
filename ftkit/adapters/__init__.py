"""Adapters. An adapter is a function that inserts its modules into a model, freezes what it does not train,
and returns the model (`ADAPTERS`). One folder per adapter: its layers and its injection.

`none` trains the model's own parameters (full fine-tuning).
"""

from __future__ import annotations

import torch.nn as nn

from ftkit.adapters import lora, loretta_adp, loretta_rep


def full_parameters(model: nn.Module, method) -> nn.Module:
    return model


# name -> injector(model, MethodSpec) -> model
ADAPTERS = {
    "none": full_parameters,
    "loretta_adp": loretta_adp.inject,
    "loretta_rep": loretta_rep.inject,
    "lora": lora.inject,
}
