"""`ZOTrainer`: a `transformers.Trainer` whose training step is zeroth-order (QuZO or MeZO), with the Trainer's data,
logging, evaluation, callbacks, learning-rate schedule and checkpoints. An existing fine-tuning script switches by
changing two lines:

    model = ftkit.quantize(model, "int4", group_size=64)        # optional: low-bit weights that QuZO trains
    trainer = ZOTrainer(model=model, args=args, train_dataset=..., method="quzo", eps=1e-3)   # was: Trainer(...)

Each training step evaluates `compute_loss` (the model's loss on the batch, unless you override it) twice per query
direction with autograd off and dropout off, and updates the weights (ftkit.optim.MeZO / QuZO: the same zeroth-order
core as `ftkit train`). The optimizer's state is its step count, which the Trainer saves with every
checkpoint: a resumed run continues bit-exactly. Gradient accumulation has no meaning here (set it to 1).
"""

from __future__ import annotations

import torch
from transformers import Trainer

from ftkit.optim import OPTIMIZERS
from ftkit.optim.optimizers import ZerothOrderOptimizer


class _SteppedInTrainingStep(torch.optim.Optimizer):
    """What the Trainer steps after `training_step`: the zeroth-order step has already happened there (it needs the
    batch). Sharing the real optimizer's parameter groups, the Trainer's learning-rate schedule still sets its rate;
    its state is the real optimizer's, so checkpoints save and restore it."""

    def __init__(self, zeroth_order: torch.optim.Optimizer):
        super().__init__([torch.zeros(1)], {})
        self.zeroth_order = zeroth_order
        self.param_groups = zeroth_order.param_groups
        self.state = zeroth_order.state

    def step(self, closure=None):
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass

    def state_dict(self) -> dict:
        return self.zeroth_order.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.zeroth_order.load_state_dict(state_dict)


class ZOTrainer(Trainer):
    """A Trainer whose step is a zeroth-order optimizer of ftkit.optim.OPTIMIZERS: QuZO
    (`method="quzo"`, the default: low-bit codes and full-precision parameters alike) or MeZO (`method="mezo"`,
    full-precision parameters). The rate, weight decay and seed come from the TrainingArguments; `eps`, `n_queries`,
    `direction` (a kind in ftkit.optim.DIRECTIONS; `rank` and `refresh` for "lowrank"), `estimator` (in
    ftkit.optim.ESTIMATORS), `momentum`, QuZO's `perturb_bits`, `independent_roundings`, `update_rounding`,
    `low_bit` ("codes" or "scales": what the quantized layers train; None: as marked) and `clip_gradient` are keyword
    arguments."""

    def __init__(self, *args, method: str = "quzo", eps: float = 1e-3, n_queries: int = 1, perturb_bits: int = 4,
                 independent_roundings: bool = True, update_rounding: str = "stochastic", direction: str = "gaussian",
                 estimator: str = "central", momentum: float = 0.0, rank: int | None = None,
                 refresh: int | None = None, low_bit: str | None = None, clip_gradient: float | None = None,
                 **kwargs):
        zeroth_order = [o.name for o in OPTIMIZERS if o.zeroth_order]
        if method not in zeroth_order:
            raise ValueError(f"method must be a zeroth-order optimizer ({', '.join(zeroth_order)}), got {method!r}")
        self.method = OPTIMIZERS[method]
        self.zo_options = {"eps": eps, "n_queries": n_queries, "perturb_bits": perturb_bits,
                           "independent_roundings": independent_roundings, "update_rounding": update_rounding,
                           "direction": direction, "estimator": estimator, "momentum": momentum, "rank": rank,
                           "refresh": refresh, "low_bit": low_bit, "clip_gradient": clip_gradient}
        self.zeroth_order = None
        super().__init__(*args, **kwargs)
        if self.args.gradient_accumulation_steps != 1:
            raise ValueError("ZOTrainer: gradient_accumulation_steps must be 1 (a zeroth-order step evaluates the "
                             "whole batch; use a larger per-device batch)")

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            self.zeroth_order = ZerothOrderOptimizer(model or self.model, self.method, lr=self.args.learning_rate,
                                                     weight_decay=self.args.weight_decay, seed=self.args.seed,
                                                     **self.zo_options)
            self.optimizer = _SteppedInTrainingStep(self.zeroth_order)
        return self.optimizer

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        inputs = self._prepare_inputs(inputs)
        loss = self.zeroth_order.step(lambda: self.compute_loss(model, inputs))
        return torch.tensor(loss, device=self.args.device)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Training logs carry the last step's projected gradient (its first query's) in place of a gradient norm,
        which a zeroth-order step does not have, and the forward passes spent so far."""
        if "loss" in logs and self.zeroth_order is not None and self.zeroth_order.steps_done:
            logs.pop("grad_norm", None)
            logs["projected_grad"] = self.zeroth_order.last_projected_gradients[0]
            logs["forwards"] = self.zeroth_order.forwards
        super().log(logs, start_time)
