"""MeZO and QuZO as PyTorch optimizers, for training scripts of your own: `step(closure)` evaluates the closure
(the current batch's loss, without backward) twice per query direction and updates the weights through the same
zeroth-order core as `ftkit train` (ftkit.optim.core), so a run through either is bit-identical given the same model,
batches and seed.

    model = ftkit.quantize(model, "int4", group_size=64)
    optimizer = ftkit.optim.QuZO(model, lr=1e-6, eps=1e-3)
    for batch in loader:
        optimizer.step(lambda: model(**batch).loss)
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from ftkit.components import Optimizer
from ftkit.optim.config import MEZO, QUZO
from ftkit.optim.core import ZerothOrderCore, directions_for
from ftkit.optim.zo_targets import FloatTarget, mark_low_bit, zo_targets
from ftkit.quant.linear import QuantLinear


class ZerothOrderOptimizer(torch.optim.Optimizer):
    """A zeroth-order optimizer of the given declaration (`ftkit.optim.OPTIMIZERS`, whose `zeroth_order` rules it
    follows) over a model or tensors. `direction` names a kind in ftkit.optim.DIRECTIONS, `rank` and `refresh`
    configure `direction="lowrank"` (None: its defaults); `perturb_bits`, `independent_roundings` and
    `update_rounding` are read where the rules round directions and train low-bit codes (QuZO). `estimator` names
    one in ftkit.optim.ESTIMATORS (central; one_sided: FZOO's, n_queries + 1 closure calls a step) and `momentum` a
    momentum on the projected gradient (full-precision tensors only), as method.zo's. `low_bit`: what the low-bit
    layers marked trainable (ftkit.quantize's `trainable`) train, "codes" or their per-group "scales" (QZO),
    switching the layers' flags; None leaves them as marked. `clip_gradient`: clip each projected gradient to
    [-C, C] (None: off)."""

    def __init__(self, model_or_params, method: Optimizer, lr: float = 1e-6, eps: float = 1e-3,
                 n_queries: int = 1, weight_decay: float = 0.0, seed: int = 0, direction: str = "gaussian",
                 perturb_bits: int = 4, independent_roundings: bool = True, update_rounding: str = "stochastic",
                 trace: str | Path | None = None, estimator: str = "central", momentum: float = 0.0,
                 rank: int | None = None, refresh: int | None = None, low_bit: str | None = None,
                 clip_gradient: float | None = None):
        if update_rounding not in ("stochastic", "nearest"):
            raise ValueError(f"update_rounding must be 'stochastic' or 'nearest', got {update_rounding!r}")
        if n_queries < 1 or eps <= 0 or lr < 0 or not 0 <= momentum < 1:
            raise ValueError(f"need n_queries >= 1, eps > 0, lr >= 0 and 0 <= momentum < 1; got {n_queries}, {eps}, "
                             f"{lr}, {momentum}")
        self.model = model_or_params if isinstance(model_or_params, nn.Module) else None
        if self.model is not None:
            if low_bit is not None:
                _choose_low_bit(self.model, low_bit)
            targets = zo_targets(model_or_params)
        else:
            params = [p for p in model_or_params if p.requires_grad]
            targets = [FloatTarget(f"params[{i}]", p, i, decay=p.ndim >= 2) for i, p in enumerate(params)]
        directions = directions_for(method, direction, perturb_bits, independent_roundings, update_rounding,
                                    rank=rank, refresh=refresh)
        self.core = ZerothOrderCore(targets, method, directions, eps, n_queries, weight_decay, seed, estimator,
                                    momentum, clip_gradient)
        super().__init__([t.tensor for t in targets], {"lr": lr, "eps": eps, "weight_decay": weight_decay})
        if trace is not None:
            self.core.begin(Path(trace), recipe=None, initial_tensors={})
        self.last_projected_gradients: list[float] = []

    @property
    def targets(self) -> list:
        return self.core.targets

    @property
    def steps_done(self) -> int:
        return self.core.steps_done

    @property
    def forwards(self) -> int:
        """Closure calls (forward passes) so far."""
        return self.core.forwards

    @torch.no_grad()
    def step(self, closure):
        """One step: `closure()` returns the loss of the current batch at the current weights (a tensor or a number;
        called 2 x n_queries times with central differences, n_queries + 1 with one_sided, with autograd off).
        Returns the step's loss: the mean of those losses (central), the unperturbed one (one_sided).

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

        def evaluate(query: int | None) -> list[float]:
            with torch.inference_mode():
                return [float(closure())]

        gradients, losses = self.core.step(group["lr"], evaluate, list, eps=group["eps"],
                                           weight_decay=group["weight_decay"])
        self.core.flush()
        self.last_projected_gradients = gradients
        return sum(losses) / len(losses)

    def state_dict(self) -> dict:
        """The torch state (rates, hyper-parameters) and the step count: all a resume needs, since every random
        number is a function of the seed and the step."""
        state = super().state_dict()
        state["zeroth_order"] = {**self.core.state_dict(), "seed": self.core.seed}
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        ours = state_dict.pop("zeroth_order")
        super().load_state_dict(state_dict)
        self.core.load_state_dict(ours)
        self.core.seed = int(ours["seed"])


def _choose_low_bit(model: nn.Module, low_bit: str) -> None:
    """Switch the trainable low-bit layers of `model` to train their codes or their scales (ftkit.quantize marks
    their codes)."""
    if low_bit not in ("codes", "scales"):
        raise ValueError(f"low_bit must be 'codes' or 'scales', got {low_bit!r}")
    for module in model.modules():
        if isinstance(module, QuantLinear) and (module.train_codes or module.train_scales):
            mark_low_bit(module, low_bit)


class MeZO(ZerothOrderOptimizer):
    """MeZO (Malladi et al.): zeroth-order SGD on full-precision tensors. `params`: a model (its parameters that
    require grad) or an iterable of tensors. Per step and query, u ~ N(0, I) from the seed,
    g = (L(w + eps u) - L(w - eps u)) / (2 eps), w <- w - lr (g u + wd w); no direction is ever stored.
    `direction="rademacher"` draws random signs for u instead (cheaper to draw, see method.zo.direction);
    `estimator="one_sided"` is FZOO's batched one-sided estimate and `momentum` a momentum on the projected gradient
    (see ZerothOrderOptimizer); `direction="lowrank", rank=2, refresh=50` a direction U V^T / sqrt(rank) per
    matrix, V kept for `refresh` steps (LOZO); `low_bit="scales"` trains the scales of a quantized model's layers
    (QZO); `clip_gradient` clips g to [-C, C]."""

    def __init__(self, params, lr: float = 1e-6, eps: float = 1e-3, n_queries: int = 1, weight_decay: float = 0.0,
                 seed: int = 0, direction: str = "gaussian", trace: str | Path | None = None,
                 estimator: str = "central", momentum: float = 0.0, rank: int | None = None,
                 refresh: int | None = None, low_bit: str | None = None, clip_gradient: float | None = None):
        super().__init__(params, MEZO, lr, eps, n_queries, weight_decay, seed, direction, trace=trace,
                         estimator=estimator, momentum=momentum, rank=rank, refresh=refresh, low_bit=low_bit,
                         clip_gradient=clip_gradient)


class QuZO(ZerothOrderOptimizer):
    """QuZO (Zhou et al.): zeroth-order training of low-precision weights. `model_or_params`: a model (the codes
    of its quantized layers marked trainable, see ftkit.quantize, and its parameters that require grad) or an
    iterable of tensors. Directions are stochastically rounded onto a grid of 2^perturb_bits - 1 levels with
    independent bits for the perturbation and the update (unbiased), and updates land on the weights' own grid by
    stochastic rounding (`update_rounding="nearest"` and `independent_roundings=False` are the ablations).
    `direction="rademacher"` draws random signs instead of Gaussians (no rounding needed, see method.zo.direction);
    `direction="lowrank", rank=2, refresh=50` a direction U V^T / sqrt(rank) per matrix with U and V rounded (LOZO;
    a quantized layer adds eps (x V) U^T to its own kernel's output). `low_bit="scales"` trains the layers' per-group
    scales instead of their codes (QZO); `clip_gradient` clips each projected gradient to [-C, C]."""

    def __init__(self, model_or_params, lr: float = 1e-6, eps: float = 1e-3, n_queries: int = 1,
                 weight_decay: float = 0.0, seed: int = 0, perturb_bits: int = 4, independent_roundings: bool = True,
                 update_rounding: str = "stochastic", direction: str = "gaussian", trace: str | Path | None = None,
                 estimator: str = "central", momentum: float = 0.0, rank: int | None = None,
                 refresh: int | None = None, low_bit: str | None = None, clip_gradient: float | None = None):
        super().__init__(model_or_params, QUZO, lr, eps, n_queries, weight_decay, seed, direction, perturb_bits,
                         independent_roundings, update_rounding, trace, estimator=estimator, momentum=momentum,
                         rank=rank, refresh=refresh, low_bit=low_bit, clip_gradient=clip_gradient)
