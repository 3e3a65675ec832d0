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
from ftkit.errors import UserError
from ftkit.models.heads import CausalLMScorer, EncoderClassifier, init_prototype_head
from ftkit.models.load import DTYPES, load_backbone, load_config, model_kind
from ftkit.quant import FORMATS
from ftkit.quant.linear import QuantLinear
from ftkit.recipe.schema import ZEROTH_ORDER, Recipe


def wrap_backbone(backbone: nn.Module, kind: str, num_classes: int) -> nn.Module:
    return EncoderClassifier(backbone, num_classes) if kind == "encoder" else CausalLMScorer(backbone, num_classes)


def finish_model(model: nn.Module, recipe: Recipe) -> nn.Module:
    """Weight format, adapter, and the recipe's frozen parameters, in that order."""
    model = FORMATS[recipe.quant.format](model, recipe.quant)
    model = ADAPTERS[recipe.method.adapter](model, recipe.method)
    zeroth_order = recipe.method.optimizer in ZEROTH_ORDER
    if zeroth_order and recipe.method.adapter == "none":
        # Full-parameter zeroth-order training of a quantized model trains the codes themselves (QuZO).
        for module in model.modules():
            if isinstance(module, QuantLinear):
                module.trainable_codes = True
    if zeroth_order and not recipe.method.zo.train_embeddings:
        # The word embeddings: most rows are absent from any one batch, so a random direction moves them with no
        # signal (pure noise) and costs random numbers for half of a small model's parameters.
        embeddings = model.backbone.get_input_embeddings()
        if embeddings is not None:
            embeddings.weight.requires_grad_(False)
    patterns = [re.compile(p) for p in recipe.method.freeze]
    for name, param in model.named_parameters():
        if any(p.search(name) for p in patterns):
            param.requires_grad_(False)
    for name, module in model.named_modules():
        if getattr(module, "trainable_codes", False) and any(p.search(f"{name}.codes") for p in patterns):
            module.trainable_codes = False
    return model


def build_model(recipe: Recipe, task: TaskData, tokenizer) -> tuple[nn.Module, str, dict]:
    """The trainable model with real weights. Returns (model, kind, facts worth logging)."""
    model, kind = assemble_model(recipe, tokenizer, len(task.labels), finish=False)
    if kind == "encoder" and task.spec.kind != "classification":
        raise UserError(f"data.task {task.name}: {task.spec.kind} tasks need a causal language model; "
                        f"{recipe.model.name} is an encoder (it classifies with a head over label phrases)")
    if kind == "encoder" and len(task.spec.text_columns) > 2:
        raise UserError(f"data.task {task.name}: an encoder reads one sentence or a pair, and the task has "
                        f"{len(task.spec.text_columns)} text columns; use a causal language model")
    if kind == "causal_lm":
        model.max_new_tokens = task.spec.max_new_tokens
    facts = {"kind": kind}
    if kind == "encoder" and recipe.model.head_init == "prototype":
        facts["prototype_scale"] = _init_prototypes(model, recipe, task, tokenizer)
    return finish_model(model, recipe), kind, facts


def assemble_model(recipe: Recipe, tokenizer, num_classes: int, finish: bool = True) -> tuple[nn.Module, str]:
    """Backbone and head with their initial weights, without the data-dependent prototype head (replay restores
    that from the trace); `finish` applies the format, adapter and freezing."""
    config = load_config(recipe.model)
    kind = model_kind(recipe.model, config)
    torch.manual_seed(recipe.train.seed)  # config-built weights and a random head depend on the seed only
    backbone = load_backbone(recipe.model, kind, vocab_size=len(tokenizer), quant=recipe.quant)
    model = wrap_backbone(backbone, kind, num_classes)
    return (finish_model(model, recipe) if finish else model), kind


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
