"""Assemble the model a recipe describes: backbone (in its weight format), task head, adapter, what the optimizer
trains, frozen parameters.

The same assembly runs on the meta device for `count-params`, so counts are those of the trained model.
"""

from __future__ import annotations

import re

import torch
import torch.nn as nn

from ftkit.adapters import ADAPTERS
from ftkit.data.batches import collate, encode
from ftkit.data.dataset import Example, TaskData
from ftkit.data.tasks import candidate_scoring
from ftkit.devices import CPU, model_device, to_device
from ftkit.errors import RecipeError, UserError
from ftkit.models.heads import CausalLMScorer, EncoderClassifier, init_prototype_head
from ftkit.models.load import DTYPES, gguf_source, load_backbone, load_config, model_kind, random_weights
from ftkit.optim import OPTIMIZERS
from ftkit.quant import FORMATS
from ftkit.quant.convert import quantize_model
from ftkit.quant.linear import QuantLinear
from ftkit.recipe.checks import check_architecture
from ftkit.recipe.schema import Recipe
from ftkit.task_kinds import TASK_KINDS


def wrap_backbone(backbone: nn.Module, kind: str, num_classes: int, scoring: str = "mean") -> nn.Module:
    """The task head over the backbone; a causal LM scores candidates by `scoring` (data.scoring, resolved)."""
    if kind == "encoder":
        return EncoderClassifier(backbone, num_classes)
    return CausalLMScorer(backbone, num_classes, scoring)


def finish_model(model: nn.Module, recipe: Recipe) -> nn.Module:
    """Adapter, what the optimizer trains, and the recipe's frozen parameters, in that order (the weight format was
    applied when the backbone was built)."""
    adapter = ADAPTERS[recipe.method.adapter]
    if adapter.inject is not None:
        model = adapter.inject(model, getattr(recipe.method, adapter.section.name) if adapter.section else None)
    optimizer = OPTIMIZERS[recipe.method.optimizer]
    if optimizer.prepare is not None:
        optimizer.prepare(model, recipe)
    freeze(model, [re.compile(p) for p in recipe.method.freeze])
    return model


def freeze(model: nn.Module, patterns: list[re.Pattern]) -> None:
    """Freeze the parameters (and low-bit codes or scales) whose names match one of `patterns`."""
    for name, param in model.named_parameters():
        if any(p.search(name) for p in patterns):
            param.requires_grad_(False)
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear) and module.train_codes and any(p.search(f"{name}.codes") for p in patterns):
            module.train_codes = False
        if isinstance(module, QuantLinear) and module.train_scales and any(p.search(f"{name}.scales")
                                                                           for p in patterns):
            module.train_scales = False


def build_model(recipe: Recipe, task: TaskData, tokenizer, device: torch.device = CPU) -> tuple[nn.Module, str, dict]:
    """The trainable model with real weights, on `device`. Returns (model, kind, facts worth logging)."""
    model, kind = assemble_model(recipe, tokenizer, len(task.labels), finish=False, device=device)
    if kind == "encoder" and not TASK_KINDS[task.spec.kind].encoders:
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


def assemble_model(recipe: Recipe, tokenizer, num_classes: int, finish: bool = True,
                   device: torch.device = CPU) -> tuple[nn.Module, str]:
    """Backbone (built or loaded straight into its weight format) and head with their initial weights, without the
    data-dependent prototype head (replay restores that from the trace); `finish` applies the adapter and decides
    what is trained."""
    config = load_config(recipe.model, recipe.quant)
    check_architecture(recipe, config.to_dict(), _fail_for(recipe))  # before any weight is read
    kind = model_kind(recipe.model, config)
    torch.manual_seed(recipe.train.seed)  # config-built weights and a random head depend on the seed only
    backbone = load_backbone(recipe.model, kind, vocab_size=len(tokenizer), quant=recipe.quant, device=device)
    model = wrap_backbone(backbone, kind, num_classes, candidate_scoring(recipe.data))
    return (finish_model(model, recipe) if finish else model), kind


def _fail_for(recipe: Recipe):
    def fail(key: str, message: str):
        raise RecipeError(f"{recipe.source or 'recipe'}: {key}: {message} (model {recipe.model.name})")

    return fail


def build_meta_model(recipe: Recipe, num_classes: int, vocab_size: int | None) -> nn.Module:
    """The same model on the meta device: shapes and dtypes, no memory, no weights read."""
    config = load_config(recipe.model, recipe.quant)
    kind = model_kind(recipe.model, config)
    if recipe.model.config is not None and vocab_size is not None and "vocab_size" not in recipe.model.config:
        config.vocab_size = vocab_size
    from transformers import AutoModel, AutoModelForCausalLM

    auto = AutoModel if kind == "encoder" else AutoModelForCausalLM
    with torch.device("meta"):
        backbone = auto.from_config(config, dtype=DTYPES[recipe.model.dtype])
        skip = "encoder." if kind == "encoder" else "lm."
        gguf = None if random_weights(recipe.model) else gguf_source(recipe.model, recipe.quant)
        if gguf is not None and FORMATS[recipe.quant.format].from_file:  # each layer's format is the file's
            from ftkit.gguf.read import quantize_meta

            backbone = quantize_meta(backbone, gguf, recipe.quant, skip_prefix=skip)
        else:
            backbone = quantize_model(backbone, recipe.quant, skip_prefix=skip)
        model = wrap_backbone(backbone, kind, num_classes, candidate_scoring(recipe.data))
        return finish_model(model, recipe)


def _init_prototypes(model: EncoderClassifier, recipe: Recipe, task: TaskData, tokenizer) -> float:
    phrases = [Example(texts=(p,), label=i) for i, p in enumerate(task.label_phrases)]
    device = model_device(model)
    phrase_batch = to_device(collate(encode(phrases, tokenizer, "encoder", task, recipe.data.max_seq_len),
                                     tokenizer.pad_token_id), device)
    train = task.splits["train"]
    generator = torch.Generator().manual_seed(recipe.data.data_seed)
    picked = torch.randperm(len(train), generator=generator)[: recipe.data.calibration_examples].tolist()
    features = encode([train[i] for i in picked], tokenizer, "encoder", task, recipe.data.max_seq_len)
    batches = [to_device(collate(features[i : i + 128], tokenizer.pad_token_id), device)
               for i in range(0, len(features), 128)]
    return init_prototype_head(model, phrase_batch, batches)
