"""Count a recipe's parameters on the meta device: total, trainable, stored bytes, per module group."""

from __future__ import annotations

import re

import torch
import torch.nn as nn

from ftkit.data.dataset import task_spec
from ftkit.recipe.schema import Recipe

# First match wins: norms sit inside attention and MLP blocks, so they are tested first.
GROUPS = [
    ("adapters", re.compile(r"loretta|lora_|adapter")),
    ("norms", re.compile(r"norm|\.ln_|ln_f|layernorm", re.I)),
    ("embeddings", re.compile(r"embed|wte|wpe|shared")),
    ("attention", re.compile(r"attn|attention|q_proj|k_proj|v_proj|o_proj|query|key|value")),
    ("mlp", re.compile(r"mlp|intermediate|\.output\.dense|fc1|fc2|feed_forward|ffn|gate_proj|up_proj|down_proj")),
    ("head", re.compile(r"^head\.|lm_head|classifier|score")),
    ("pooler", re.compile(r"pooler")),
]


def group_of(name: str) -> str:
    for group, pattern in GROUPS:
        if pattern.search(name):
            return group
    return "other"


def count_model(model: nn.Module) -> dict:
    groups: dict[str, dict] = {}
    total = trainable = stored = 0
    seen = set()
    for module_name, module in model.named_modules():
        for leaf, tensor, persistent in _own_tensors(module):
            if id(tensor) in seen or not persistent:  # tied weights count once; caches are not weights
                continue
            seen.add(id(tensor))
            numel, nbytes = tensor_figures(module, leaf, tensor)
            is_trainable = (isinstance(tensor, nn.Parameter) and tensor.requires_grad) or (
                leaf == "codes" and getattr(module, "trainable_codes", False))
            name = f"{module_name}.{leaf}" if module_name else leaf
            entry = groups.setdefault(group_of(name), {"total": 0, "trainable": 0, "stored_bytes": 0})
            entry["total"] += numel
            entry["trainable"] += numel if is_trainable else 0
            entry["stored_bytes"] += nbytes
            total += numel
            trainable += numel if is_trainable else 0
            stored += nbytes
    return {"total": total, "trainable": trainable, "stored_bytes": stored, "groups": groups}


def trainable_numel(model: nn.Module) -> int:
    """Trainable parameters, counting the codes of quantized layers a zeroth-order method trains."""
    return count_model(model)["trainable"]


def tensor_figures(module: nn.Module, leaf: str, tensor: torch.Tensor) -> tuple[int, int]:
    """(parameters it stands for, bytes it takes). Low-bit layers count their logical weights, not their codes."""
    from ftkit.quant.bnb import bnb_counts
    from ftkit.quant.linear import QuantLinear

    nbytes = tensor.numel() * tensor.element_size()
    if isinstance(module, QuantLinear) and leaf in ("codes", "scales"):
        return (module.in_features * module.out_features if leaf == "codes" else 0), nbytes
    bnb = bnb_counts(module)
    if bnb is not None and leaf == "weight":
        return bnb["weight_params"], bnb["stored_bytes"]
    return tensor.numel(), nbytes


def _own_tensors(module: nn.Module):
    for leaf, param in module.named_parameters(recurse=False):
        yield leaf, param, True
    for leaf, buffer in module.named_buffers(recurse=False):
        yield leaf, buffer, leaf not in module._non_persistent_buffers_set


def count_parameters(recipe: Recipe) -> dict:
    from ftkit.models.build import build_meta_model
    from ftkit.models.load import load_tokenizer

    vocab_size = None
    if recipe.model.config is not None and "vocab_size" not in recipe.model.config:
        vocab_size = len(load_tokenizer(recipe.model))
    model = build_meta_model(recipe, len(task_spec(recipe).label_words), vocab_size)
    counts = count_model(model)
    counts["backbone"] = count_model(model.backbone)["total"]
    return counts
