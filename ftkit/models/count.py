"""Count a recipe's parameters on the meta device: total, trainable, stored bytes, per module group."""

from __future__ import annotations

import re

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
    for name, tensor in _weights(model):
        if id(tensor) in seen:  # tied weights count once
            continue
        seen.add(id(tensor))
        numel = logical_numel(tensor)
        nbytes = stored_bytes(tensor)
        is_trainable = isinstance(tensor, nn.Parameter) and tensor.requires_grad
        entry = groups.setdefault(group_of(name), {"total": 0, "trainable": 0, "stored_bytes": 0})
        entry["total"] += numel
        entry["trainable"] += numel if is_trainable else 0
        entry["stored_bytes"] += nbytes
        total += numel
        trainable += numel if is_trainable else 0
        stored += nbytes
    return {"total": total, "trainable": trainable, "stored_bytes": stored, "groups": groups}


def logical_numel(tensor) -> int:
    """Parameters a tensor stands for; packed low-bit formats say so through `logical_numel`."""
    return getattr(tensor, "logical_numel", tensor.numel())


def stored_bytes(tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _weights(model: nn.Module):
    yield from model.named_parameters(remove_duplicate=False)
    for name, buffer in model.named_buffers(remove_duplicate=False):
        # Persistent buffers are stored with the weights (quantized codes and scales, for example).
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name) if module_name else model
        if leaf not in module._non_persistent_buffers_set:
            yield name, buffer


def count_parameters(recipe: Recipe) -> dict:
    from ftkit.models.build import build_meta_model
    from ftkit.models.load import load_tokenizer

    vocab_size = None
    if recipe.model.config is not None and "vocab_size" not in recipe.model.config:
        vocab_size = len(load_tokenizer(recipe.model))
    model = build_meta_model(recipe, len(task_spec(recipe).label_words), vocab_size)
    counts = count_model(model)
    counts["backbone"] = sum(logical_numel(p) for p in model.backbone.parameters())
    return counts
