"""The zeroth-order core: one object owns a zeroth-order estimator's targets, its direction source, the step's
seeds, the trace and the state. The loop's method (ftkit.optim.zo), the PyTorch optimizers `ftkit.optim.MeZO` /
`QuZO` (ftkit.optim.optimizers) and `ftkit.hf.ZOTrainer` wrap it; what sets MeZO and QuZO apart is data
(the `zeroth_order` rules of its ftkit.components.Optimizer declaration), and the kind of direction a module of
ftkit.optim.directions.

One step, with step seed s, query seeds s_i and projected gradients g_i:

    for each query i:  w <- w + eps u1_i;  L+ = L(w);  w <- w - 2 eps u1_i;  L- = L(w);  g_i = (L+ - L-) / (2 eps)
    w <- R(w - lr * (sum_i g_i u2_i / n + wd * w))        (the last restore is folded into the update)

With `clip_gradient` C (QZO), each g_i is clipped to [-C, C] before the update; the trace records the clipped
g_i, so a replay (which clips again: a no-op) lands the same update.

MeZO: u1 = u2 = u, R the identity. QuZO: u1 = Q1(u), u2 = Q2(u) with independent rounding bits, and R stochastic
rounding onto the weight grid for quantized layers (whose perturbation lives in the dequantize hook, so their codes
change only at the update). All random tensors are regenerated from seeds (ftkit.optim.zo_streams), one tensor at a
time: memory is inference plus one tensor's direction, and what a kind keeps through a step within its bound.

`replay_step` runs the same arithmetic from a trace record without any forward pass (ftkit.replay).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import torch

from ftkit.errors import UserError
from ftkit.components import Optimizer
from ftkit.optim.trace import VERSION, TraceWriter
from ftkit.optim.zo_streams import derive
from ftkit.optim.zo_targets import Directions, FloatTarget

STEP_DOMAIN = 0x5A0  # separates step seeds from any other use of the run seed


class ZerothOrderError(UserError, ValueError):
    """A zeroth-order setup that cannot train: one line for the CLI, a ValueError for library callers."""


def directions_for(method: Optimizer, direction: str, perturb_bits: int, independent_roundings: bool,
                   update_rounding: str) -> Directions:
    """The direction source a method's rules ask for: rounded directions only where they round them."""
    bits = perturb_bits if method.zeroth_order.rounds_directions else 0
    return Directions(bits=bits, independent=independent_roundings,
                      update_rounding=update_rounding, distribution=direction)


class ZerothOrderCore:
    def __init__(self, targets: list, method: Optimizer, directions: Directions, eps: float, n_queries: int,
                 weight_decay: float, seed: int, clip_gradient: float | None = None):
        name, rules = method.name, method.zeroth_order
        if not targets:
            raise ZerothOrderError(f"{name}: nothing to train: no parameter requires grad and no quantized "
                                   f"layer trains its codes or scales")
        if clip_gradient is not None and not clip_gradient > 0:
            raise ZerothOrderError(f"{name}: clip_gradient must be positive (or None: no clipping), got "
                                   f"{clip_gradient}")
        if not rules.trains_low_bit and any(t.low_bit for t in targets):
            raise ZerothOrderError(f"{name} trains full-precision tensors, and the model's quantized layers "
                                   f"train their codes: use quzo for a quantized model's own weights, or train an "
                                   f"adapter over the quantized base")
        if not rules.trains_low_bit and any(isinstance(t, FloatTarget) and t.tensor.dtype == torch.bfloat16
                                            for t in targets):
            warnings.warn(f"{name} on bfloat16 weights: in-place perturbations leave rounding noise and updates "
                          f"below bf16's spacing round away; use model.dtype: float32, or quzo for low-precision "
                          f"weights", stacklevel=3)
        self.targets, self.method, self.directions = targets, method, directions
        self.eps, self.n_queries, self.weight_decay, self.seed = eps, n_queries, weight_decay, seed
        self.clip_gradient = clip_gradient
        self.steps_done = 0
        self.trace: TraceWriter | None = None

    def step_seed(self, step: int) -> int:
        return derive(self.seed, STEP_DOMAIN, step)

    def step(self, lr: float, evaluate, combine, eps: float | None = None,
             weight_decay: float | None = None) -> tuple[list[float], list[float]]:
        """The next step (see `zeroth_order_step` for `evaluate` and `combine`), recorded in the trace. `eps` and
        `weight_decay` default to the core's."""
        step_seed = self.step_seed(self.steps_done)
        gradients, losses = self.run(step_seed, lr, evaluate, combine, eps, weight_decay)
        self.steps_done += 1
        if self.trace is not None:
            self.trace.write(self.steps_done, step_seed, lr, gradients, self.directions.streams)
        return gradients, losses

    def run(self, step_seed: int, lr: float, evaluate=None, combine=None, eps: float | None = None,
            weight_decay: float | None = None, gradients: list[float] | None = None):
        return zeroth_order_step(self.targets, self.directions, step_seed, lr, self.eps if eps is None else eps,
                                 self.n_queries, self.weight_decay if weight_decay is None else weight_decay,
                                 evaluate, combine, gradients, self.clip_gradient)

    def replay_step(self, seed: int, lr: float, gradients: list[float]) -> None:
        self.run(seed, lr, gradients=gradients)
        self.steps_done += 1

    # --- the trace and the state --------------------------------------------------------------------------------

    def trace_header(self, **extra) -> dict:
        """The estimator's settings, as a trace header records them, with the front end's `extra` fields."""
        return {"version": VERSION, "method": self.method.name, "n_queries": self.n_queries, "eps": self.eps,
                **self.directions.trace_fields(), "weight_decay": self.weight_decay, "seed": self.seed,
                "trained_elements": sum(t.numel for t in self.targets),
                **({} if self.clip_gradient is None else {"clip_gradient": self.clip_gradient}), **extra}

    def begin(self, path: Path, resume_step: int | None = None, **extra) -> None:
        """Write the trace to `path` from here on (a resumed run's cut back to `resume_step` and continued)."""
        self.trace = TraceWriter(Path(path), self.trace_header(**extra), resume_step)

    def flush(self) -> None:
        if self.trace is not None:
            self.trace.flush()

    def end(self) -> None:
        if self.trace is not None:
            self.trace.close()

    def state_dict(self) -> dict:
        self.flush()  # the checkpoint never gets ahead of its trace
        return {"steps_done": self.steps_done}

    def load_state_dict(self, state: dict) -> None:
        self.steps_done = int(state["steps_done"])


@torch.no_grad()
def zeroth_order_step(targets: list, directions: Directions, step_seed: int, lr: float, eps: float, n_queries: int,
                      weight_decay: float, evaluate=None, combine=None, gradients: list[float] | None = None,
                      clip: float | None = None):
    """One zeroth-order step on `targets`: for each query i, from w to w + eps u1_i (evaluate), to w - eps u1_i
    (evaluate), then w <- w - lr (sum_i g_i u2_i / n + wd w) with the last restore folded in. `evaluate(i)` returns
    the losses computed at the current weights (a list); `combine` turns all of them, in order, into one (L+, L-)
    pair per query. A replay passes the projected `gradients` instead and evaluates nothing. `clip`: each g_i is
    clipped to [-clip, clip]. Returns (gradients as applied, mean losses); with a non-finite gradient the weights
    are left as they were and the losses are [nan]."""
    query_seeds = [derive(step_seed, i) for i in range(n_queries)]
    step = directions.begin_step()  # what the kind keeps through the step (random-sign words, within a bound)
    local = []
    for i, seed in enumerate(query_seeds):
        _move(targets, directions, step, seed, 0.0, eps)
        local += evaluate(i) if evaluate else []
        _move(targets, directions, step, seed, eps, -eps)
        local += evaluate(i) if evaluate else []
        if i < n_queries - 1:
            _move(targets, directions, step, seed, -eps, 0.0)  # the last query's restore is folded into the update
    losses = []
    if evaluate is not None:
        pairs = combine(local)
        gradients = [(plus - minus) / (2 * eps) for plus, minus in pairs]
        losses = [(plus + minus) / 2 for plus, minus in pairs]
    if not all(math.isfinite(g) for g in gradients):
        _move(targets, directions, step, query_seeds[-1], -eps, 0.0)  # leave the weights as they were
        return gradients, [math.nan]
    if clip is not None:
        gradients = [min(max(g, -clip), clip) for g in gradients]
    coefs = [-lr * g / n_queries for g in gradients]
    rest = step.update_together(targets, directions, step_seed, query_seeds, coefs, lr * weight_decay)
    for target in step.pass_over(rest, query_seeds[-1]):
        target.update(directions, step_seed, query_seeds, coefs, restore=eps, decay=lr * weight_decay, step=step)
    return gradients, losses


def _move(targets: list, directions: Directions, step, query_seed: int, current: float, to: float) -> None:
    for target in step.pass_over(targets, query_seed):
        target.move(directions, query_seed, current, to, step)
