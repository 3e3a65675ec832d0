"""Replacing submodules by name: how formats convert layers and adapters wrap and unwrap them."""

from __future__ import annotations

import torch.nn as nn


def module_names(model: nn.Module) -> list[str]:
    """Every submodule's name. Names, not modules: a caller that replaces modules while walking them would otherwise
    keep every replaced module (say a full-precision layer) alive until the walk ends."""
    return [name for name, _ in model.named_modules()]


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where the submodule `name` of `root` is."""
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)
