"""Where adapters go, per architecture, and how module names are matched."""

from __future__ import annotations

import re

import torch.nn as nn

from ftkit.errors import UserError

# LoRA-style targets (LoRETTA_rep, LoRA): the query and value projections.
REP_TARGETS = {
    "bert": ["query", "value"], "roberta": ["query", "value"], "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"], "deberta": ["in_proj"], "deberta-v2": ["query_proj", "value_proj"],
    "llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "opt": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
}

# Bottleneck adapters (LoRETTA_adp): "output" adapters transform a layer's output, "input" adapters its input.
# BERT family: after the attention output and FFN output dense layers; LLaMA / OPT: in the MLP.
ADP_TARGETS = {
    **{t: {"output": ["output.dense"]} for t in ("bert", "roberta", "xlm-roberta", "electra", "deberta", "deberta-v2")},
    **{t: {"input": ["gate_proj", "up_proj"], "output": ["down_proj"]} for t in ("llama", "mistral", "qwen2")},
    "opt": {"input": ["fc1"], "output": ["fc2"]},
}


def default_targets(table: dict, model_type: str, key: str):
    if model_type not in table:
        raise UserError(f"{key}: no default target modules for model_type '{model_type}' "
                        f"(known: {', '.join(sorted(table))}); set {key} explicitly")
    return table[model_type]


def matches(name: str, targets: list[str]) -> bool:
    """PEFT's rule: a target is a suffix of the module name on a dot boundary, or a regular expression that
    matches the whole name."""
    return any(name == t or name.endswith("." + t) or re.fullmatch(t, name) for t in targets)


def find_linears(root: nn.Module, targets: list[str]) -> list[str]:
    return [name for name, module in root.named_modules() if isinstance(module, nn.Module)
            and hasattr(module, "in_features") and hasattr(module, "out_features") and matches(name, targets)]


def freeze_all_but(model: nn.Module, keep) -> None:
    """Freeze every parameter whose name does not satisfy keep(name), and the codes of quantized layers likewise
    (a layer's `train_codes` flag stands for requires_grad on its codes, see ftkit.quant.linear)."""
    for name, param in model.named_parameters():
        param.requires_grad_(bool(keep(name)))
    for name, module in model.named_modules():
        if hasattr(module, "train_codes"):
            module.train_codes = bool(keep(f"{name}.codes"))


def is_norm(name: str) -> bool:
    return bool(re.search(r"norm|\.ln_|ln_f", name, re.I))
