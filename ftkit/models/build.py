"""Assemble the model a recipe describes: backbone, task head, weight format, adapter, frozen parameters.

The same assembly runs on the meta device for `count-params`, so counts are those of the trained model.
"""

from __future__ import annotations

import re

import torch
import torch.nn as nn

from ftkit.adapters import ADAPTERS
from ftkit.data.batches import collate, encode
from ftkit.data.dataset import Example, TaskData
from ftkit.models.heads import CausalLMScorer, EncoderClassifier, init_prototype_head
from ftkit.models.load import DTYPES, load_backbone, load_config, model_kind
from ftkit.quant import FORMATS
from ftkit.recipe.schema import Recipe


def wrap_backbone(backbone: nn.Module, kind: str, num_classes: int) -> nn.Module:
    return EncoderClassifier(backbone, num_classes) if kind == "encoder" else CausalLMScorer(backbone, num_classes)


def finish_model(model: nn.Module, recipe: Recipe) -> nn.Module:
    """Weight format, adapter, and the recipe's frozen parameters, in that order."""
    model = FORMATS[recipe.quant.format](model, recipe.quant)
    model = ADAPTERS[recipe.method.adapter](model, recipe.method)
    patterns = [re.compile(p) for p in recipe.method.freeze]
    for name, param in model.named_parameters():
        if any(p.search(name) for p in patterns):
            param.requires_grad_(False)
    return model


def build_model(recipe: Recipe, task: TaskData, tokenizer) -> tuple[nn.Module, str, dict]:
    """The trainable model with real weights. Returns (model, kind, facts worth logging)."""
    config = load_config(recipe.model)
    kind = model_kind(recipe.model, config)
    torch.manual_seed(recipe.train.seed)  # config-built weights and a random head depend on the seed only
    backbone = load_backbone(recipe.model, kind, vocab_size=len(tokenizer), quant=recipe.quant)
    model = wrap_backbone(backbone, kind, len(task.labels))
    facts = {"kind": kind}
    if kind == "encoder" and recipe.model.head_init == "prototype":
        facts["prototype_scale"] = _init_prototypes(model, recipe, task, tokenizer)
    return finish_model(model, recipe), kind, facts


def build_meta_model(recipe: Recipe, num_classes: int, vocab_size: int | None) -> nn.Module:
    """The same model on the meta device: shapes and dtypes, no memory, no weights read."""
    config = load_config(recipe.model)
    kind = model_kind(recipe.model, config)
    if recipe.model.config is not None and vocab_size is not None and "vocab_size" not in recipe.model.config:
        config.vocab_size = vocab_size
    from transformers import AutoModel, AutoModelForCausalLM

    auto = AutoModel if kind == "encoder" else AutoModelForCausalLM
    with torch.device("meta"):
        backbone = auto.from_config(config, dtype=DTYPES[recipe.model.dtype])
        model = wrap_backbone(backbone, kind, num_classes)
        return finish_model(model, recipe)


def _init_prototypes(model: EncoderClassifier, recipe: Recipe, task: TaskData, tokenizer) -> float:
    phrases = [Example(texts=(p,), label=i) for i, p in enumerate(task.label_phrases)]
    phrase_batch = collate(encode(phrases, tokenizer, "encoder", task, recipe.data.max_seq_len), tokenizer.pad_token_id)
    train = task.splits["train"]
    generator = torch.Generator().manual_seed(recipe.data.data_seed)
    picked = torch.randperm(len(train), generator=generator)[: recipe.data.calibration_examples].tolist()
    features = encode([train[i] for i in picked], tokenizer, "encoder", task, recipe.data.max_seq_len)
    batches = [collate(features[i : i + 128], tokenizer.pad_token_id) for i in range(0, len(features), 128)]
    return init_prototype_head(model, phrase_batch, batches)
