"""The training loop's zeroth-order method (MeZO, QuZO): the zeroth-order core (ftkit.optim.core) fed the run's
batches, with its trace in the run directory. Two forward passes per query (central differences) or one per query
and one unperturbed (one_sided), no backpropagation.

Across processes (ftkit.distributed) every process holds the whole model and applies the identical update from the
shared seeds; only the losses cross, one all-reduce of chunks x forwards scalars per step. Data parallel: each
process evaluates its chunks of the batch. Query parallel: each evaluates the whole batch for its queries (and the
first process the unperturbed weights, where the estimator asks for them).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from ftkit.data.batches import Shard, as_shard
from ftkit.data.dataset import task_kind
from ftkit.devices import describe, model_device
from ftkit.distributed import SINGLE, World
from ftkit.errors import UserError
from ftkit.optim import OPTIMIZERS
from ftkit.optim.config import direction_options
from ftkit.optim.core import ZerothOrderCore, directions_for
from ftkit.optim.trace import encode_tensor
from ftkit.optim.zo_targets import zo_targets
from ftkit.recipe.schema import Recipe

TRACE_FILE = "trace.ftz"


class ZerothOrder:
    def __init__(self, model: nn.Module, recipe: Recipe, world: World = SINGLE):
        spec = recipe.method.zo
        self.model, self.recipe, self.world = model, recipe, world
        self.parallel = spec.parallel
        if self.parallel == "queries" and spec.n_queries % world.size:
            raise UserError(f"method.zo.parallel queries deals the queries to the processes: method.zo.n_queries "
                            f"({spec.n_queries}) must be a multiple of the number of processes ({world.size})")
        method = OPTIMIZERS[recipe.method.optimizer]
        directions = directions_for(method, spec.direction, spec.perturb_bits, spec.independent_roundings,
                                    spec.update_rounding, **direction_options(spec))
        self.core = ZerothOrderCore(zo_targets(model), method, directions, spec.eps, spec.n_queries,
                                    spec.weight_decay, recipe.train.seed, spec.estimator, spec.momentum,
                                    spec.clip_gradient)
        self.loss = task_kind(recipe).loss

    @property
    def targets(self) -> list:
        return self.core.targets

    @property
    def directions(self):
        return self.core.directions

    # --- the step -----------------------------------------------------------------------------------------------

    @property
    def shards_data(self) -> bool:
        """Whether processes split the global batch (data parallel), or each evaluate it whole for the queries
        it owns, query i on process i mod world size (query parallel)."""
        return self.parallel == "data"

    def describe_sharing(self, processes: int) -> str:
        """How query-parallel processes share a step (see `shards_data`)."""
        n = self.core.n_queries
        return f"{n // processes} of {n} queries each"

    def step(self, batches, lr: float) -> dict:
        """One step on a global batch: a Shard (this process's chunks of it), or one collated batch or a list of
        them (see train.micro_batch_size).

        The loss of a query is the mean over the global batch: one chunk's mean as it is, or the sum of
        mean x size over the chunks divided by the batch size. Every process moves the weights through every query,
        in order, and evaluates the ones it owns; the chunks' losses of all queries then cross processes in one
        all-reduce."""
        self.model.eval()  # dropout off: both passes of a query must see the same function
        gradients, losses = self.core.step(lr, *self._queries(as_shard(batches)))
        return {"loss": sum(losses) / len(losses), "projected_grad": gradients[0], "forwards": self.core.forwards}

    def replay_step(self, seed: int, lr: float, gradients: list[float]) -> None:
        self.core.replay_step(seed, lr, gradients)

    def _queries(self, shard: Shard):
        """`evaluate` and `combine` of ftkit.optim.core.zeroth_order_step for this process's part of `shard`."""
        width = shard.num_chunks

        def evaluate(query: int | None) -> list[float]:
            owned = self.parallel == "data" or self.world.owns(0 if query is None else query)
            return self._chunk_losses(shard) if owned else [0.0] * width

        def combine(local: list[float]) -> list[float]:
            summed, k = self.world.all_sum(local), width
            return [_batch_loss(summed[j * k: (j + 1) * k], shard) for j in range(len(summed) // k)]

        return evaluate, combine

    def _chunk_losses(self, shard: Shard) -> list[float]:
        """The loss of each chunk this process holds, at the chunk's place in the global batch (0.0 for chunks
        other processes hold): mean x size, or the mean itself when the batch is a single chunk."""
        values = [0.0] * shard.num_chunks
        with torch.inference_mode():
            for batch, position in zip(shard.batches, shard.positions):
                mean = self.loss(self.model(batch), batch).item()
                values[position] = mean if shard.num_chunks == 1 else mean * len(batch["labels"])
        return values

    # --- run integration: trace and state -----------------------------------------------------------------------

    def begin(self, run_dir: Path, resume_step: int | None) -> None:
        if not self.recipe.method.zo.trace or not self.world.is_main:
            return
        try:
            self.core.begin(Path(run_dir) / TRACE_FILE, resume_step, **self.trace_fields())
        except ValueError as err:
            raise UserError(f"cannot resume the trace: {err}; restore it, or resume with method.zo.trace=false "
                            f"to continue without one") from None

    def trace_fields(self) -> dict:
        """What a replay needs beyond the core's settings: the recipe, the environment and the step-0 head."""
        from ftkit.recipe import recipe_to_dict

        head = {n: encode_tensor(p) for n, p in self.model.named_parameters() if n.startswith("head.")}
        return {"environment": describe(model_device(self.model)), "num_classes": _num_classes(self.model),
                "recipe": recipe_to_dict(self.recipe), "initial_tensors": head}

    def end(self) -> None:
        self.core.end()

    def state_dict(self) -> dict:
        return self.core.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.core.load_state_dict(state)


def _batch_loss(chunk_losses: list[float], shard: Shard) -> float:
    """The global batch's mean loss from its chunks' (see `_chunk_losses`), added in chunk order."""
    return chunk_losses[0] if shard.num_chunks == 1 else sum(chunk_losses) / shard.total


def _num_classes(model: nn.Module) -> int:
    head = getattr(model, "head", None)
    return head.out_features if head is not None else model.num_classes


def build_zeroth_order(model: nn.Module, recipe: Recipe, world: World = SINGLE) -> ZerothOrder:
    """The `build` of every zeroth-order optimizer: its rules are its declaration's `zeroth_order`."""
    return ZerothOrder(model, recipe, world)
