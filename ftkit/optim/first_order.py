"""First-order methods: backpropagation with a torch optimizer (AdamW or SGD)."""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from ftkit.data.batches import as_shard
from ftkit.data.dataset import task_kind
from ftkit.distributed import SINGLE, World
from ftkit.optim.zo_streams import derive
from ftkit.recipe.schema import Recipe

DROPOUT_DOMAIN = 0xD80  # separates dropout seeds from any other use of the run seed


class FirstOrder:
    """One optimizer step per global batch. The loop owns the schedule and passes the rate in.

    Several processes: the model is wrapped in DistributedDataParallel, each process back-propagates its chunks of
    the batch (gradients synchronised on the last one only) and DDP averages the gradients. Dropout is seeded per
    (run seed, step, chunk), so a chunk sees the same masks whichever process computes it, and in a resumed run."""

    shards_data = True

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float | None, loss,
                 seed: int = 0, world: World = SINGLE):
        self.model, self.optimizer, self.grad_clip, self.loss = model, optimizer, grad_clip, loss
        self.seed, self.world = seed, world
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        # Codes of quantized layers are buffers that never change in first-order training: no need to
        # broadcast them at every forward (DDP still syncs everything once, when it wraps the model).
        if world.size == 1:
            self.forward = model
        else:  # one GPU per process, or CPUs
            ids = [world.device.index] if getattr(world.device, "type", "cpu") == "cuda" else None
            self.forward = DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)

    def step(self, batches, lr: float) -> dict:
        """One optimizer step over a global batch: a Shard (this process's chunks), or one collated batch or a list
        of them. Each chunk contributes its mean loss weighted by its share of the global batch (gradient
        accumulation), times the process count that DDP's averaging divides by."""
        self.model.train()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        shard = as_shard(batches)
        loss_value = 0.0
        for k, (batch, position) in enumerate(zip(shard.batches, shard.positions)):
            torch.manual_seed(derive(self.seed, DROPOUT_DOMAIN, shard.step, position))
            last = k == len(shard.batches) - 1
            with nullcontext() if last or self.world.size == 1 else self.forward.no_sync():
                loss = self.loss(self.forward(batch), batch)
                share = len(batch["labels"]) / shard.total
                weight = len(batch["labels"]) * self.world.size / shard.total
                (loss * weight if weight != 1 else loss).backward()
            loss_value += loss.item() * share
        if self.world.size > 1:
            loss_value = self.world.all_sum([loss_value])[0]
        metrics = {"loss": loss_value}
        if self.grad_clip is not None:
            metrics["grad_norm"] = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip).item()
        if math.isfinite(loss_value):
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


def build_adamw(model: nn.Module, recipe: Recipe, world: World = SINGLE) -> FirstOrder:
    spec = recipe.method.adamw
    optimizer = torch.optim.AdamW(
        decay_groups(model, recipe.train.weight_decay), lr=recipe.train.lr, betas=tuple(spec.betas), eps=spec.eps
    )
    return FirstOrder(model, optimizer, recipe.train.grad_clip, task_kind(recipe).loss, recipe.train.seed, world)


def build_sgd(model: nn.Module, recipe: Recipe, world: World = SINGLE) -> FirstOrder:
    spec = recipe.method.sgd
    optimizer = torch.optim.SGD(
        decay_groups(model, recipe.train.weight_decay), lr=recipe.train.lr, momentum=spec.momentum,
        nesterov=spec.nesterov,
    )
    return FirstOrder(model, optimizer, recipe.train.grad_clip, task_kind(recipe).loss, recipe.train.seed, world)
