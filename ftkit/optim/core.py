"""The zeroth-order core: one object owns a zeroth-order estimator's targets, its direction source, the step's
seeds, the trace and the state. The loop's method (ftkit.optim.zo), the PyTorch optimizers `ftkit.optim.MeZO` /
`QuZO` (ftkit.optim.optimizers) and `ftkit.hf.ZOTrainer` wrap it; what sets MeZO and QuZO apart is data
(the `zeroth_order` rules of its ftkit.components.Optimizer declaration), and the kind of direction a module of
ftkit.optim.directions.

One step, with step seed s, query seeds s_i and projected gradients g_i, central differences (the default
estimator, ftkit.optim.estimators):

    for each query i:  w <- w + eps u1_i;  L+ = L(w);  w <- w - 2 eps u1_i;  L- = L(w);  g_i = (L+ - L-) / (2 eps)
    w <- R(w - lr * (sum_i g_i u2_i / n + wd * w))        (the last restore is folded into the update)

Another estimator visits other points (one_sided: w, then w + eps u1_i per query) and combines the losses its own
way; a momentum (ftkit.optim.momentum) folds the update into a buffer first. The core counts the forward passes
every step spends (`forwards`), so runs of different estimators compare at equal cost.
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
from ftkit.optim.config import ESTIMATORS
from ftkit.optim.estimators import EstimatorKind, estimator_kind
from ftkit.optim.estimators.central import CENTRAL
from ftkit.optim.momentum import Momentum
from ftkit.optim.trace import VERSION, TraceWriter
from ftkit.optim.zo_streams import derive
from ftkit.optim.zo_targets import Directions, FloatTarget

STEP_DOMAIN = 0x5A0  # separates step seeds from any other use of the run seed


class ZerothOrderError(UserError, ValueError):
    """A zeroth-order setup that cannot train: one line for the CLI, a ValueError for library callers."""


def directions_for(method: Optimizer, direction: str, perturb_bits: int, independent_roundings: bool,
                   update_rounding: str, **options) -> Directions:
    """The direction source a method's rules ask for: rounded directions only where they round them. `options`:
    the kind's (rank=..., refresh=...), None for its default."""
    bits = perturb_bits if method.zeroth_order.rounds_directions else 0
    chosen = tuple(sorted((key, value) for key, value in options.items() if value is not None))
    try:
        return Directions(bits=bits, independent=independent_roundings,
                          update_rounding=update_rounding, distribution=direction, options=chosen)
    except ValueError as err:
        raise ZerothOrderError(f"{method.name}: {err}") from None


class ZerothOrderCore:
    def __init__(self, targets: list, method: Optimizer, directions: Directions, eps: float, n_queries: int,
                 weight_decay: float, seed: int, estimator: str = "central", momentum: float = 0.0,
                 clip_gradient: float | None = None):
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
        if momentum and any(t.low_bit for t in targets):
            raise ZerothOrderError(f"{name}: momentum keeps a float buffer per trained tensor, and low-bit codes have "
                                   f"no float master copy to move along it: train an adapter or the norms, or set "
                                   f"momentum to 0")
        self.estimator, declared = estimator_kind(estimator), ESTIMATORS[estimator]
        if n_queries < declared.min_queries:
            raise ZerothOrderError(f"{name}: the {estimator} estimator needs n_queries >= {declared.min_queries} "
                                   f"({declared.why}), got {n_queries}")
        self.targets, self.method, self.directions = targets, method, directions
        self.eps, self.n_queries, self.weight_decay, self.seed = eps, n_queries, weight_decay, seed
        self.beta, self.momentum = momentum, Momentum(momentum, targets) if momentum else None
        self.clip_gradient = clip_gradient
        self.steps_done = self.forwards = 0
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
        self.forwards += self.estimator.forwards(self.n_queries)
        if self.trace is not None:
            self.trace.write(self.steps_done, step_seed, lr, gradients, self.directions.streams)
        return gradients, losses

    def run(self, step_seed: int, lr: float, evaluate=None, combine=None, eps: float | None = None,
            weight_decay: float | None = None, gradients: list[float] | None = None):
        return zeroth_order_step(self.targets, self.directions, step_seed, lr, self.eps if eps is None else eps,
                                 self.n_queries, self.weight_decay if weight_decay is None else weight_decay,
                                 evaluate, combine, gradients, self.estimator, self.momentum,
                                 place=(self.seed, self.steps_done), clip=self.clip_gradient)

    def replay_step(self, seed: int, lr: float, gradients: list[float]) -> None:
        self.run(seed, lr, gradients=gradients)
        self.steps_done += 1
        self.forwards += self.estimator.forwards(self.n_queries)

    # --- the trace and the state --------------------------------------------------------------------------------

    def trace_header(self, **extra) -> dict:
        """The estimator's settings, as a trace header records them, with the front end's `extra` fields."""
        return {"version": VERSION, "method": self.method.name, "n_queries": self.n_queries, "eps": self.eps,
                "estimator": self.estimator.name, "momentum": self.beta,
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
        state = {"steps_done": self.steps_done, "forwards": self.forwards}
        return state if self.momentum is None else {**state, "momentum": self.momentum.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.steps_done = int(state["steps_done"])
        # checkpoints from before the count was kept: every step so far used this estimator's forwards
        self.forwards = int(state.get("forwards", self.steps_done * self.estimator.forwards(self.n_queries)))
        if self.momentum is not None:
            if "momentum" not in state:
                raise ZerothOrderError("the checkpoint holds no momentum buffer: it was saved with momentum 0")
            self.momentum.load_state_dict(state["momentum"])


@torch.no_grad()
def zeroth_order_step(targets: list, directions: Directions, step_seed: int, lr: float, eps: float, n_queries: int,
                      weight_decay: float, evaluate=None, combine=None, gradients: list[float] | None = None,
                      estimator: EstimatorKind = CENTRAL, momentum: Momentum | None = None,
                      place: tuple[int, int] = (0, 0), clip: float | None = None):
    """One zeroth-order step on `targets`: the estimator walks the weights through its points (central: for each
    query i, w + eps u1_i then w - eps u1_i), evaluating at each, then w <- w + sum_i coef_i u2_i - lr wd w with the
    last query's restore folded in (or through the `momentum` buffer). `evaluate(i)` returns the losses computed at
    the current weights (a list; i None: the unperturbed weights); `combine` turns all of them, in order, into one
    batch loss per evaluation. A replay passes the projected `gradients` instead and evaluates nothing. `place`:
    (run seed, step number), for kinds whose draws outlive a step. `clip`: each g_i is clipped to [-clip, clip].
    Returns (gradients as applied, losses whose mean is the step's loss); with a non-finite gradient the weights
    are left as they were and the losses are [nan]."""
    query_seeds = [derive(step_seed, i) for i in range(n_queries)]
    step = directions.begin_step(*place)  # what the kind keeps through the step (random-sign words, factors)

    def move(query_seed: int, current: float, to: float) -> None:
        for target in step.pass_over(targets, query_seed):
            target.move(directions, query_seed, current, to, step)

    local, left = estimator.visit(query_seeds, eps, evaluate, move)
    losses = []
    if evaluate is not None:
        gradients, losses = estimator.estimate(combine(local), eps, n_queries)
    if not all(math.isfinite(g) for g in gradients):
        move(query_seeds[-1], left, 0.0)  # leave the weights as they were
        return gradients, [math.nan]
    if clip is not None:
        gradients = [min(max(g, -clip), clip) for g in gradients]
    if momentum is not None:
        coefs = estimator.coefficients(gradients, 1.0)
        for target in step.pass_over(targets, query_seeds[-1]):
            momentum.update(target, directions, query_seeds, coefs, lr, -left, lr * weight_decay, step)
        return gradients, losses
    coefs = estimator.coefficients(gradients, lr)
    rest = step.update_together(targets, directions, step_seed, query_seeds, coefs, lr * weight_decay)
    for target in step.pass_over(rest, query_seeds[-1]):
        target.update(directions, step_seed, query_seeds, coefs, restore=-left, decay=lr * weight_decay, step=step)
    return gradients, losses
