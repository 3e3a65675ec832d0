"""First-order methods: backpropagation with a torch optimizer (AdamW or SGD)."""

from __future__ import annotations

import torch
import torch.nn as nn

from ftkit.models.heads import task_loss
from ftkit.recipe.schema import Recipe


class FirstOrder:
    """One optimizer step per batch. The loop owns the schedule and passes the rate in."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float | None, loss):
        self.model, self.optimizer, self.grad_clip, self.loss = model, optimizer, grad_clip, loss
        self.params = [p for group in optimizer.param_groups for p in group["params"]]

    def step(self, batches: list[dict], lr: float) -> dict:
        """One optimizer step over the micro-batches of a global batch (gradient accumulation): each contributes
        its mean loss weighted by its share of the examples."""
        self.model.train()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batches = batches if isinstance(batches, list) else [batches]
        total = sum(len(b["labels"]) for b in batches)
        loss_value = 0.0
        for batch in batches:
            loss = self.loss(self.model(batch), batch)
            weight = len(batch["labels"]) / total
            (loss * weight if len(batches) > 1 else loss).backward()
            loss_value += loss.item() * weight
        loss = torch.tensor(loss_value)
        metrics = {"loss": loss_value}
        if self.grad_clip is not None:
            metrics["grad_norm"] = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip).item()
        if torch.isfinite(loss):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return metrics

    def begin(self, run_dir, resume_step) -> None:
        pass

    def end(self) -> None:
        pass

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: biases and norm scales (1-D tensors) are left alone."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameters")
    return [
        {"params": [p for p in trainable if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0},
    ]


def build_adamw(model: nn.Module, recipe: Recipe) -> FirstOrder:
    spec = recipe.method.adamw
    optimizer = torch.optim.AdamW(
        decay_groups(model, recipe.train.weight_decay), lr=recipe.train.lr, betas=tuple(spec.betas), eps=spec.eps
    )
    return FirstOrder(model, optimizer, recipe.train.grad_clip, task_loss(recipe))


def build_sgd(model: nn.Module, recipe: Recipe) -> FirstOrder:
    spec = recipe.method.sgd
    optimizer = torch.optim.SGD(
        decay_groups(model, recipe.train.weight_decay), lr=recipe.train.lr, momentum=spec.momentum,
        nesterov=spec.nesterov,
    )
    return FirstOrder(model, optimizer, recipe.train.grad_clip, task_loss(recipe))
