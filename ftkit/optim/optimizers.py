"""MeZO and QuZO as PyTorch optimizers, for training scripts of your own: `step(closure)` evaluates the closure
(the current batch's loss, without backward) twice per query direction and updates the weights, with the same
random streams and arithmetic as `ftkit train` (ftkit.optim.zo.zeroth_order_step), so a run through either is
bit-identical given the same model, batches and seed.

    model = ftkit.quantize(model, "int4", group_size=64)
    optimizer = ftkit.optim.QuZO(model, lr=1e-6, eps=1e-3)
    for batch in loader:
        optimizer.step(lambda: model(**batch).loss)
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from ftkit.optim.trace import TraceWriter
from ftkit.optim.zo import STEP_DOMAIN, zeroth_order_step
from ftkit.optim.zo_streams import derive
from ftkit.optim.zo_targets import Directions, FloatTarget, QuantTarget, zo_targets


class ZerothOrderOptimizer(torch.optim.Optimizer):
    """What MeZO and QuZO share: targets, directions, the step count that seeds each step, the trace."""

    def __init__(self, model_or_params, lr: float, eps: float, n_queries: int, weight_decay: float, seed: int,
                 directions: Directions, trace: str | Path | None):
        self.model = model_or_params if isinstance(model_or_params, nn.Module) else None
        if self.model is not None:
            targets = zo_targets(model_or_params)
        else:
            params = [p for p in model_or_params if p.requires_grad]
            targets = [FloatTarget(f"params[{i}]", p, i, decay=p.ndim >= 2) for i, p in enumerate(params)]
        if not targets:
            raise ValueError("nothing to train: no parameter requires grad and no quantized layer trains its codes")
        if n_queries < 1 or eps <= 0 or lr < 0:
            raise ValueError(f"need n_queries >= 1, eps > 0 and lr >= 0; got {n_queries}, {eps}, {lr}")
        tensors = [t.param if isinstance(t, FloatTarget) else t.layer.codes for t in targets]
        super().__init__(tensors, {"lr": lr, "eps": eps, "weight_decay": weight_decay})
        self.targets, self.directions, self.n_queries, self.seed = targets, directions, n_queries, seed
        self.steps_done = 0
        self.trace = None
        if trace is not None:
            header = {"version": 1, "method": type(self).__name__.lower(), "n_queries": n_queries, "eps": eps,
                      **directions.trace_fields(), "weight_decay": weight_decay, "seed": seed,
                      "trained_elements": sum(t.numel for t in targets), "recipe": None, "initial_tensors": {}}
            self.trace = TraceWriter(Path(trace), header)

    @torch.no_grad()
    def step(self, closure):
        """One step: `closure()` returns the loss of the current batch at the current weights (a tensor or a number;
        called 2 x n_queries times, with autograd off). Returns the mean of those losses.

        Given a model, the optimizer holds it in eval mode during the step (dropout off: both evaluations of a
        direction must see the same function) and gives each module its mode back after; given tensors, that is
        the caller's part."""
        if closure is None:
            raise ValueError(f"{type(self).__name__}.step needs a closure that returns the loss of the current batch")
        modes = {} if self.model is None else {m: m.training for m in self.model.modules()}
        if self.model is not None:
            self.model.eval()
        try:
            return self._step(closure)
        finally:
            for module, training in modes.items():
                module.training = training

    def _step(self, closure) -> float:
        group = self.param_groups[0]
        step_seed = derive(self.seed, STEP_DOMAIN, self.steps_done)

        def evaluate(query: int) -> list[float]:
            with torch.inference_mode():
                return [float(closure())]

        def combine(local: list[float]) -> list[tuple[float, float]]:
            return [(local[2 * i], local[2 * i + 1]) for i in range(self.n_queries)]

        gradients, losses = zeroth_order_step(self.targets, self.directions, step_seed, group["lr"], group["eps"],
                                              self.n_queries, group["weight_decay"], evaluate, combine)
        self.steps_done += 1
        if self.trace is not None:
            self.trace.write(self.steps_done, step_seed, group["lr"], gradients, self.directions.streams)
            self.trace.flush()
        self.last_projected_gradients = gradients
        return sum(losses) / len(losses)

    def state_dict(self) -> dict:
        """The torch state (rates, hyper-parameters) and the step count: all a resume needs, since every random
        number is a function of the seed and the step."""
        state = super().state_dict()
        state["zeroth_order"] = {"steps_done": self.steps_done, "seed": self.seed}
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        ours = state_dict.pop("zeroth_order")
        super().load_state_dict(state_dict)
        self.steps_done, self.seed = int(ours["steps_done"]), int(ours["seed"])


class MeZO(ZerothOrderOptimizer):
    """MeZO (Malladi et al.): zeroth-order SGD on full-precision tensors. `params`: a model (its parameters that
    require grad) or an iterable of tensors. Per step and query, u ~ N(0, I) from the seed,
    g = (L(w + eps u) - L(w - eps u)) / (2 eps), w <- w - lr (g u + wd w); no direction is ever stored.
    `direction="rademacher"` draws random signs for u instead (cheaper to draw, see method.zo.direction)."""

    def __init__(self, params, lr: float = 1e-6, eps: float = 1e-3, n_queries: int = 1, weight_decay: float = 0.0,
                 seed: int = 0, direction: str = "gaussian", trace: str | Path | None = None):
        super().__init__(params, lr, eps, n_queries, weight_decay, seed,
                         Directions(bits=0, independent=True, update_rounding="stochastic",
                                    distribution=_distribution(direction)), trace)
        if any(isinstance(t, QuantTarget) for t in self.targets):
            raise ValueError("MeZO trains full-precision tensors; for quantized layers' own weights use QuZO")


class QuZO(ZerothOrderOptimizer):
    """QuZO (Zhou et al.): zeroth-order training of low-precision weights. `model_or_params`: a model (the codes
    of its quantized layers marked trainable, see ftkit.quantize, and its parameters that require grad) or an
    iterable of tensors. Directions are stochastically rounded onto a grid of 2^perturb_bits - 1 levels with
    independent bits for the perturbation and the update (unbiased), and updates land on the weights' own grid by
    stochastic rounding (`update_rounding="nearest"` and `independent_roundings=False` are the ablations).
    `direction="rademacher"` draws random signs instead of Gaussians (no rounding needed, see method.zo.direction)."""

    def __init__(self, model_or_params, lr: float = 1e-6, eps: float = 1e-3, n_queries: int = 1,
                 weight_decay: float = 0.0, seed: int = 0, perturb_bits: int = 4, independent_roundings: bool = True,
                 update_rounding: str = "stochastic", direction: str = "gaussian", trace: str | Path | None = None):
        if update_rounding not in ("stochastic", "nearest"):
            raise ValueError(f"update_rounding must be 'stochastic' or 'nearest', got {update_rounding!r}")
        super().__init__(model_or_params, lr, eps, n_queries, weight_decay, seed,
                         Directions(bits=perturb_bits, independent=independent_roundings,
                                    update_rounding=update_rounding, distribution=_distribution(direction)), trace)


def _distribution(direction: str) -> str:
    if direction not in ("gaussian", "rademacher"):
        raise ValueError(f"direction must be 'gaussian' or 'rademacher', got {direction!r}")
    return direction
