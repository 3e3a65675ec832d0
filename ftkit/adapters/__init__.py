"""Adapters. An adapter is a function that inserts its modules into a model and returns the parameters to train.

`none` trains the model's own parameters (full fine-tuning).
"""

from __future__ import annotations

import torch.nn as nn


def full_parameters(model: nn.Module, spec) -> nn.Module:
    return model


# name -> injector(model, MethodSpec) -> model
ADAPTERS = {"none": full_parameters}
