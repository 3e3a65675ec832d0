"""Count a recipe's parameters on the meta device: total, trainable, stored bytes, per module group."""

from __future__ import annotations

import re

import torch
import torch.nn as nn

from ftkit.adapters import ADAPTERS
from ftkit.data.dataset import task_spec
from ftkit.quant import ENGINES
from ftkit.recipe.schema import Recipe

# After the adapters' own tensors (which wrap layers of every group), the first match wins: norms sit inside
# attention and MLP blocks, so they are tested first.
GROUPS = [
    ("norms", re.compile(r"norm|\.ln_|ln_f|layernorm", re.I)),
    ("embeddings", re.compile(r"embed|wte|wpe|shared")),
    ("attention", re.compile(r"attn|attention|q_proj|k_proj|v_proj|o_proj|query|key|value")),
    ("mlp", re.compile(r"mlp|intermediate|\.output\.dense|fc1|fc2|feed_forward|ffn|gate_proj|up_proj|down_proj")),
    ("head", re.compile(r"^head\.|lm_head|classifier|score")),
    ("pooler", re.compile(r"pooler")),
]


def group_of(name: str) -> str:
    if any(re.search(adapter.parameters, name) for adapter in ADAPTERS if adapter.parameters):
        return "adapters"
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
            numel, nbytes, is_trainable = tensor_figures(module, leaf, tensor)
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


def tensor_figures(module: nn.Module, leaf: str, tensor: torch.Tensor) -> tuple[int, int, bool]:
    """(parameters it stands for, bytes it takes, trained). A low-bit layer's engine counts its tensors: their
    logical weights, not their codes; everything else is a plain tensor, trained when it requires grad."""
    for engine in ENGINES:
        figures = engine.count(module, leaf, tensor) if engine.count is not None else None
        if figures is not None:
            return figures
    trained = isinstance(tensor, nn.Parameter) and tensor.requires_grad
    return tensor.numel(), tensor.numel() * tensor.element_size(), trained


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
        vocab_size = len(load_tokenizer(recipe.model, recipe.quant))
    model = build_meta_model(recipe, len(task_spec(recipe).label_words), vocab_size)
    counts = count_model(model)
    counts["backbone"] = count_model(model.backbone)["total"]
    return counts
