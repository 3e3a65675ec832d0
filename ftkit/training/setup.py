"""What a run is made of, built in one place and one order: the task's data, the tokenizer, the model (weight
format, head, adapter, what trains), the splits tokenised, and the method that steps the model. Training,
evaluation, export, replay and the scripts build through `build_run`, so each of them sees the model training saw.

The order is part of the arithmetic: building the model seeds torch with train.seed before drawing random weights
and the head, and the prototype head reads the train split, so the data is loaded first and the method is built
last (ftkit.models.build)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from ftkit.data.batches import encode as encode_examples
from ftkit.data.dataset import SPLITS, TaskData, load_task_data
from ftkit.devices import CPU
from ftkit.distributed import SINGLE, World
from ftkit.eval import evaluate
from ftkit.models.build import assemble_model, build_model
from ftkit.models.load import load_tokenizer
from ftkit.optim import OPTIMIZERS
from ftkit.recipe import Recipe


@dataclass
class Run:
    """A recipe's parts, as build_run makes them; the model and method are the ones training steps."""

    recipe: Recipe
    task: TaskData | None  # None where the model was built without data (replay: the trace gives the head's size)
    tokenizer: Any
    model: nn.Module
    kind: str  # "encoder" or "causal_lm"
    facts: dict  # what building found worth logging: the kind, the prototype head's scale
    device: torch.device
    method: Any = None  # what steps the model (ftkit.optim): set by build_run(method=True) or build_method
    features: dict[str, list[dict]] = field(default_factory=dict)  # tokenised splits, by name

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    def encoded(self, split: str) -> list[dict]:
        """The split's examples as features, tokenised on first use."""
        if split not in self.features:
            self.features[split] = encode_examples(self.task.splits[split], self.tokenizer, self.kind, self.task,
                                                   self.recipe.data.max_seq_len)
        return self.features[split]

    def evaluate(self, split: str, world: World = SINGLE, progress=None) -> dict:
        """The task's metrics on `split` (ftkit.eval), shared among `world`'s processes; `progress` as there."""
        return evaluate(self.model, self.encoded(split), self.task.spec.kind, self.recipe.train.eval_batch_size,
                        self.pad_id, len(self.task.labels), self.tokenizer, world, progress)


def build_run(recipe: Recipe, device: torch.device = CPU, *, splits: tuple[str, ...] = SPLITS,
              task: TaskData | None = None, encode: tuple[str, ...] = (), method: bool = False,
              world: World = SINGLE, num_classes: int | None = None, recorded: dict | None = None) -> Run:
    """The recipe's task data (`splits` of it, or `task` when the caller has loaded it), tokenizer and model on
    `device`; the `encode` splits tokenised now (others on first use); with `method`, the method, which `world`'s
    processes share. `num_classes` builds the model without reading any data: its head has that many classes and
    starts from its seeded random weights (replay restores a prototype head from its trace). `recorded` is a run
    directory's data record (ftkit.data.provenance): the data is read where the run read it."""
    if num_classes is not None:
        tokenizer = load_tokenizer(recipe.model, recipe.quant)
        model, kind = assemble_model(recipe, tokenizer, num_classes, device=device)
        run = Run(recipe, None, tokenizer, model, kind, {"kind": kind}, device)
    else:
        task = task if task is not None else load_task_data(recipe, splits, recorded)
        tokenizer = load_tokenizer(recipe.model, recipe.quant)
        model, kind, facts = build_model(recipe, task, tokenizer, device)
        run = Run(recipe, task, tokenizer, model, kind, facts, device)
        for split in encode:
            if split in task.splits:
                run.encoded(split)
    if method:
        run.method = build_method(run, world)
    return run


def build_method(run: Run, world: World = SINGLE):
    """The recipe's optimizer over the run's model, as `ftkit train` steps it."""
    return OPTIMIZERS[run.recipe.method.optimizer].build(run.model, run.recipe, world=world)
