"""Zeroth-order training: MeZO (SPSA on full-precision tensors) and QuZO (low-precision weights, quantized
directions, stochastically rounded updates). Two forward passes per query, no backpropagation.

One step, with step seed s, query seeds s_i and projected gradients g_i:

    for each query i:  w <- w + eps u1_i;  L+ = L(w);  w <- w - 2 eps u1_i;  L- = L(w);  g_i = (L+ - L-) / (2 eps)
    w <- R(w - lr * (sum_i g_i u2_i / n + wd * w))        (the last restore is folded into the update)

MeZO: u1 = u2 = u ~ N(0, I), R the identity. QuZO: u1 = Q1(u), u2 = Q2(u) with independent rounding bits, and R
stochastic rounding onto the weight grid for quantized layers (whose perturbation lives in the dequantize hook,
so their codes change only at the update). All random tensors are regenerated from seeds (ftkit.optim.zo_streams),
one tensor at a time: memory is inference plus one tensor's direction (with random-sign directions, plus the words
they come from, kept through a step up to 64 MiB: ftkit.optim.zo_targets.KEEP_BYTES).

Across processes (ftkit.distributed) every process holds the whole model and applies the identical update from the
shared seeds; only the losses cross, one all-reduce of 2 x chunks x queries scalars per step. Data parallel: each
process evaluates its chunks of the batch. Query parallel: each evaluates the whole batch for its queries.

`replay_step` runs the same arithmetic from a trace record without any forward pass (ftkit.replay).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from ftkit.data.batches import Shard, as_shard
from ftkit.data.dataset import task_kind
from ftkit.devices import describe, model_device
from ftkit.distributed import SINGLE, World
from ftkit.errors import UserError
from ftkit.optim.trace import TraceWriter, encode_tensor
from ftkit.optim.zo_streams import derive
from ftkit.optim.zo_targets import (
    Directions,
    FloatTarget,
    KeptWords,
    QuantTarget,
    update_sparse_targets,
    with_sign_words,
    zo_targets,
)
from ftkit.recipe.schema import Recipe

TRACE_FILE = "trace.ftz"
STEP_DOMAIN = 0x5A0  # separates step seeds from any other use of the run seed


class ZerothOrder:
    def __init__(self, model: nn.Module, recipe: Recipe, name: str, world: World = SINGLE):
        spec = recipe.method.zo
        self.model, self.recipe, self.name, self.world = model, recipe, name, world
        self.parallel = spec.parallel
        if self.parallel == "queries" and spec.n_queries % world.size:
            raise UserError(f"method.zo.parallel queries deals the queries to the processes: method.zo.n_queries "
                            f"({spec.n_queries}) must be a multiple of the number of processes ({world.size})")
        self.eps, self.n_queries, self.weight_decay = spec.eps, spec.n_queries, spec.weight_decay
        self.directions = Directions(bits=spec.perturb_bits if name == "quzo" else 0,
                                     independent=spec.independent_roundings, update_rounding=spec.update_rounding,
                                     distribution=spec.direction)
        self.targets = zo_targets(model)
        if not self.targets:
            raise UserError(f"method.optimizer {name}: the model has nothing to train (every tensor is frozen)")
        if name == "mezo" and any(isinstance(t, QuantTarget) for t in self.targets):
            raise UserError("method.optimizer mezo trains full-precision tensors; for a quantized model's own "
                            "weights use quzo, or train an adapter over the quantized base")
        self.loss = task_kind(recipe).loss
        if name == "mezo" and any(isinstance(t, FloatTarget) and t.param.dtype == torch.bfloat16 for t in self.targets):
            warnings.warn("MeZO on bfloat16 weights: in-place perturbations leave rounding noise and updates below "
                          "bf16's spacing round away; use model.dtype: float32, or quzo for low-precision weights",
                          stacklevel=2)
        self.seed = recipe.train.seed
        self.steps_done = 0
        self.trace: TraceWriter | None = None

    # --- the step -----------------------------------------------------------------------------------------------

    @property
    def shards_data(self) -> bool:
        """Whether processes split the global batch (data parallel), or each evaluate it whole for the queries
        it owns, query i on process i mod world size (query parallel)."""
        return self.parallel == "data"

    def describe_sharing(self, processes: int) -> str:
        """How query-parallel processes share a step (see `shards_data`)."""
        return f"{self.n_queries // processes} of {self.n_queries} queries each"

    def step(self, batches, lr: float) -> dict:
        """One step on a global batch: a Shard (this process's chunks of it), or one collated batch or a list of
        them (see train.micro_batch_size).

        The loss of a query is the mean over the global batch: one chunk's mean as it is, or the sum of
        mean x size over the chunks divided by the batch size."""
        self.model.eval()  # dropout off: both passes of a query must see the same function
        step_seed = self.step_seed(self.steps_done)
        gradients, losses = self._run(step_seed, lr, shard=as_shard(batches))
        self.steps_done += 1
        if self.trace is not None:
            self.trace.write(self.steps_done, step_seed, lr, gradients, self.directions.streams)
        return {"loss": sum(losses) / len(losses), "projected_grad": gradients[0]}

    def replay_step(self, seed: int, lr: float, gradients: list[float]) -> None:
        self._run(seed, lr, gradients=gradients)
        self.steps_done += 1

    def step_seed(self, step: int) -> int:
        return derive(self.seed, STEP_DOMAIN, step)

    def _run(self, step_seed: int, lr: float, shard: Shard | None = None, gradients: list[float] | None = None):
        """The step's arithmetic on the weights, identical on every process and in a replay (shard None, the
        gradients given): every process moves the weights through every query, in order, and evaluates the ones
        it owns; the chunks' losses of all queries then cross processes in one all-reduce."""
        if shard is None:
            return zeroth_order_step(self.targets, self.directions, step_seed, lr, self.eps, self.n_queries,
                                     self.weight_decay, gradients=gradients)
        width = shard.num_chunks

        def evaluate(query: int) -> list[float]:
            owned = self.parallel == "data" or self.world.owns(query)
            return self._chunk_losses(shard) if owned else [0.0] * width

        def combine(local: list[float]) -> list[tuple[float, float]]:
            summed, k = self.world.all_sum(local), width
            return [(_batch_loss(summed[2 * i * k: (2 * i + 1) * k], shard),
                     _batch_loss(summed[(2 * i + 1) * k: (2 * i + 2) * k], shard)) for i in range(self.n_queries)]

        return zeroth_order_step(self.targets, self.directions, step_seed, lr, self.eps, self.n_queries,
                                 self.weight_decay, evaluate, combine)

    def _chunk_losses(self, shard: Shard) -> list[float]:
        """The loss of each chunk this process holds, at the chunk's place in the global batch (0.0 for chunks
        other processes hold): mean x size, or the mean itself when the batch is a single chunk."""
        values = [0.0] * shard.num_chunks
        with torch.inference_mode():
            for batch, position in zip(shard.batches, shard.positions):
                mean = self.loss(self.model(batch), batch).item()
                values[position] = mean if shard.num_chunks == 1 else mean * len(batch["labels"])
        return values

    def _move(self, query_seed: int, current: float, to: float) -> None:
        _move(self.targets, self.directions, query_seed, current, to)

    # --- run integration: trace and state -----------------------------------------------------------------------

    def begin(self, run_dir: Path, resume_step: int | None) -> None:
        if not self.recipe.method.zo.trace or not self.world.is_main:
            return
        try:
            self.trace = TraceWriter(Path(run_dir) / TRACE_FILE, self.trace_header(), resume_step)
        except ValueError as err:
            raise UserError(f"cannot resume the trace: {err}; restore it, or resume with method.zo.trace=false "
                            f"to continue without one") from None

    def trace_header(self) -> dict:
        from ftkit.recipe import recipe_to_dict

        head = {n: encode_tensor(p) for n, p in self.model.named_parameters() if n.startswith("head.")}
        return {"version": 1, "environment": describe(model_device(self.model)),
                "method": self.name, "n_queries": self.n_queries, "eps": self.eps, **self.directions.trace_fields(),
                "weight_decay": self.weight_decay,
                "seed": self.seed, "num_classes": _num_classes(self.model),
                "trained_elements": sum(t.numel for t in self.targets),
                "recipe": recipe_to_dict(self.recipe), "initial_tensors": head}

    def end(self) -> None:
        if self.trace is not None:
            self.trace.close()

    def state_dict(self) -> dict:
        if self.trace is not None:
            self.trace.flush()  # the checkpoint never gets ahead of its trace
        return {"steps_done": self.steps_done}

    def load_state_dict(self, state: dict) -> None:
        self.steps_done = int(state["steps_done"])


@torch.no_grad()
def zeroth_order_step(targets: list, directions: Directions, step_seed: int, lr: float, eps: float, n_queries: int,
                      weight_decay: float, evaluate=None, combine=None, gradients: list[float] | None = None):
    """One zeroth-order step on `targets`: for each query i, from w to w + eps u1_i (evaluate), to w - eps u1_i
    (evaluate), then w <- w - lr (sum_i g_i u2_i / n + wd w) with the last restore folded in. `evaluate(i)` returns
    the losses computed at the current weights (a list); `combine` turns all of them, in order, into one (L+, L-)
    pair per query. A replay passes the projected `gradients` instead and evaluates nothing. Returns (gradients,
    mean losses); with a non-finite gradient the weights are left as they were and the losses are [nan]."""
    query_seeds = [derive(step_seed, i) for i in range(n_queries)]
    kept = KeptWords()  # random-sign words drawn for a query's first move, kept for its next two (within a bound)
    local = []
    for i, seed in enumerate(query_seeds):
        _move(targets, directions, seed, 0.0, eps, kept)
        local += evaluate(i) if evaluate else []
        _move(targets, directions, seed, eps, -eps, kept)
        local += evaluate(i) if evaluate else []
        if i < n_queries - 1:
            _move(targets, directions, seed, -eps, 0.0, kept)  # the last query's restore is folded into the update
    losses = []
    if evaluate is not None:
        pairs = combine(local)
        gradients = [(plus - minus) / (2 * eps) for plus, minus in pairs]
        losses = [(plus + minus) / 2 for plus, minus in pairs]
    if not all(math.isfinite(g) for g in gradients):
        _move(targets, directions, query_seeds[-1], -eps, 0.0, kept)  # leave the weights as they were
        return gradients, [math.nan]
    coefs = [-lr * g / n_queries for g in gradients]
    rest = update_sparse_targets(targets, directions, step_seed, query_seeds, coefs, lr * weight_decay, kept)
    for target, words in with_sign_words(rest, directions, query_seeds[-1], kept):
        target.update(directions, step_seed, query_seeds, coefs, restore=eps, decay=lr * weight_decay, words=words,
                      kept=kept)
    return gradients, losses


def _move(targets: list, directions: Directions, query_seed: int, current: float, to: float,
          kept: KeptWords | None = None) -> None:
    for target, words in with_sign_words(targets, directions, query_seed, kept):
        if isinstance(target, QuantTarget):
            target.move(directions, query_seed, current, to, kept=kept)
        else:
            target.move(directions, query_seed, current, to, words)


def _batch_loss(chunk_losses: list[float], shard: Shard) -> float:
    """The global batch's mean loss from its chunks' (see `_chunk_losses`), added in chunk order."""
    return chunk_losses[0] if shard.num_chunks == 1 else sum(chunk_losses) / shard.total


def _num_classes(model: nn.Module) -> int:
    head = getattr(model, "head", None)
    return head.out_features if head is not None else model.num_classes


def build_mezo(model: nn.Module, recipe: Recipe, world: World = SINGLE) -> ZerothOrder:
    return ZerothOrder(model, recipe, "mezo", world)


def build_quzo(model: nn.Module, recipe: Recipe, world: World = SINGLE) -> ZerothOrder:
    return ZerothOrder(model, recipe, "quzo", world)
