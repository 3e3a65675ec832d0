"""The optimizers' declarations and options (torch-free): `method.adamw`, `method.sgd` and `method.zo`, and what each
optimizer checks of the recipe around it. Their behaviour is in first_order.py and zo.py."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional

from ftkit.components import Hook, Optimizer, Registry, Section, ZerothOrderRules, option


@dataclass
class AdamWSpec:
    betas: list[float] = option(factory=lambda: [0.9, 0.999], help="Coefficients of the running averages of the "
                                                                   "gradient and its square.")
    eps: float = option(1e-8, help="Added to the denominator.")


@dataclass
class SGDSpec:
    momentum: float = option(0.0, help="Momentum factor.")
    nesterov: bool = option(False, help="Nesterov momentum (needs momentum > 0).")


@dataclass
class ZOSpec:
    """Zeroth-order options (MeZO, QuZO); see ftkit/optim/zo.py."""

    eps: float = option(1e-3, help="Perturbation scale: the loss is evaluated at w + eps u and w - eps u.")
    n_queries: int = option(1, help="Random directions averaged per step (two forward passes each with central "
                                    "differences; one each, plus one unperturbed, with one_sided).")
    estimator: str = option("central", help="How a step's losses estimate the gradient.",
                            choices=lambda: ESTIMATORS)
    momentum: float = option(0.0, help="Momentum on the projected gradient, m <- momentum m + g u, w <- w - lr m (0: "
                                       "off): one float32 buffer the size of the trained tensors; full-precision "
                                       "targets only.")
    direction: str = option("gaussian", help="Kind of random direction.", choices=lambda: DIRECTIONS)
    rank: Optional[int] = option(None, help="direction lowrank: the rank r of each matrix's direction U V^T / sqrt(r) "
                                            "(default 2).")
    refresh: Optional[int] = option(None, help="direction lowrank: steps a matrix keeps its V (LOZO's lazy sampling; U "
                                               "is redrawn every step; default 50).")
    perturb_bits: int = option(4, help="QuZO: directions are stochastically rounded onto a per-tensor grid of "
                                       "2^bits - 1 levels (0: unrounded).")
    independent_roundings: bool = option(True, help="QuZO: the perturbation and the update round the same Gaussian "
                                                    "with independent random bits (unbiased); false reuses the "
                                                    "perturbation's rounding for the update (the authors' public "
                                                    "code).")
    update_rounding: Literal["stochastic", "nearest"] = option(
        "stochastic", help="QuZO: how an update lands on a low-precision weight grid (and, for either optimizer, on "
                           "bf16 scales trained by low_bit: scales).")
    weight_decay: float = option(0.0, help="Decoupled weight decay, not applied to biases and norms.")
    train_embeddings: bool = option(False, help="Train the word embeddings too (a batch touches few rows, so random "
                                                "directions mostly add noise there).")
    trace: bool = option(True, computes=False, help="Write the trajectory (seeds, projected gradients, learning "
                                                    "rates) to <run>/trace.ftz for `ftkit replay`.")
    low_bit: Literal["codes", "scales"] = option(
        "codes", help="What a native low-bit layer trains without an adapter: its codes (QuZO), or its per-group "
                      "scales with the codes frozen (QZO), perturbed while dequantizing and updated on the scales' "
                      "dtype (quant.scale_dtype). mezo trains scales too (unrounded directions).")
    clip_gradient: Optional[float] = option(None, help="Clip each projected gradient to [-C, C] before the update "
                                                       "(QZO's clipping of the directional derivative); null: off.")
    parallel: Literal["data", "queries"] = option(
        "data", computes=False, help="Several processes: split each batch between them (data), or give each the "
                                     "whole batch and n_queries / processes of the queries (queries). Same result.")


def _check_adamw(spec: AdamWSpec, recipe, chosen, fail) -> None:
    if len(spec.betas) != 2 or not all(0 <= b < 1 for b in spec.betas):
        fail("method.adamw.betas", f"must be two numbers in [0, 1), got {spec.betas}")


def _check_sgd(spec: SGDSpec, recipe, chosen, fail) -> None:
    if spec.momentum < 0:
        fail("method.sgd.momentum", f"must be at least 0, got {spec.momentum}")
    if spec.nesterov and spec.momentum == 0:
        fail("method.sgd.nesterov", "Nesterov momentum needs method.sgd.momentum > 0")


def _check_zo(zo: ZOSpec, recipe, chosen, fail) -> None:
    if zo.eps <= 0:
        fail("method.zo.eps", f"must be positive, got {zo.eps}")
    if zo.n_queries < 1:
        fail("method.zo.n_queries", f"must be at least 1, got {zo.n_queries}")
    if zo.weight_decay < 0:
        fail("method.zo.weight_decay", f"must be at least 0, got {zo.weight_decay}")
    if zo.perturb_bits != 0 and not 2 <= zo.perturb_bits <= 16:
        fail("method.zo.perturb_bits", f"must be 0 (unrounded directions) or 2..16, got {zo.perturb_bits}")
    if zo.estimator not in ESTIMATORS:
        fail("method.zo.estimator", f"unknown estimator {zo.estimator!r} (available: "
                                    f"{', '.join(e.name for e in ESTIMATORS)})")
    elif zo.n_queries < ESTIMATORS[zo.estimator].min_queries:
        fail("method.zo.n_queries", f"the {zo.estimator} estimator needs at least "
                                    f"{ESTIMATORS[zo.estimator].min_queries} queries ({ESTIMATORS[zo.estimator].why})")
    if not 0 <= zo.momentum < 1:
        fail("method.zo.momentum", f"must be in [0, 1), got {zo.momentum}")
    if zo.clip_gradient is not None and not zo.clip_gradient > 0:
        fail("method.zo.clip_gradient", f"must be positive (or null: no clipping), got {zo.clip_gradient}")
    if zo.direction not in DIRECTIONS:
        fail("method.zo.direction", f"unknown direction {zo.direction!r} (available: "
                                    f"{', '.join(d.name for d in DIRECTIONS)})")
    for key in direction_options(zo):
        takes = [d.name for d in DIRECTIONS if key in d.options]
        if zo.direction not in takes:
            fail(f"method.zo.{key}", f"applies to direction {' or '.join(takes)}, and method.zo.direction is "
                                     f"{zo.direction}")
        if getattr(zo, key) < 1:
            fail(f"method.zo.{key}", f"must be at least 1, got {getattr(zo, key)}")


def direction_options(zo: ZOSpec) -> dict[str, int]:
    """The options of a kind of direction `zo` sets (method.zo.rank, ...; unset ones are the kind's defaults)."""
    keys = {key for d in DIRECTIONS for key in d.options}
    return {key: getattr(zo, key) for key in sorted(keys) if getattr(zo, key) is not None}


def _check_zeroth_order(recipe, chosen, fail) -> None:
    """What a zeroth-order optimizer needs of the rest of the recipe."""
    name, quant = chosen.optimizer.name, recipe.quant
    full, low_bit = chosen.adapter.trains_base, chosen.format.low_bit
    if recipe.train.weight_decay:
        fail("train.weight_decay", f"applies to first-order optimizers; set method.zo.weight_decay for {name}")
    if recipe.train.grad_clip is not None:
        fail("train.grad_clip", f"clips a backpropagated gradient's norm, which {name} does not have; remove it (a "
             f"zeroth-order run that blows up wants a lower train.lr or method.zo.eps)")
    scales = recipe.method.zo.low_bit == "scales"
    if scales:
        _check_scales(recipe, chosen, fail)
    if full and low_bit and not scales and not chosen.optimizer.trains_low_bit:
        fail("method.optimizer", f"{name} trains full-precision weights, and quant.format is {quant.format}: use quzo "
             f"for the quantized weights themselves, or set method.adapter to train an adapter over the quantized "
             f"base")
    # With method.freeze the codes may all be frozen (the norms alone train): which tensors train is known once the
    # model is built, where the core refuses momentum on codes in one line.
    if full and low_bit and recipe.method.zo.momentum and not recipe.method.freeze:
        fail("method.zo.momentum", f"keeps a float buffer per trained tensor, and the {quant.format} codes {name} "
             f"trains have no float master copy to move along it; train an adapter or the norms, or set it to 0")
    if full and low_bit and not chosen.engine.zo_trains_weights:
        fail("method.adapter", f"{quant.engine} weights are frozen; zeroth-order training over them needs an "
             f"adapter (lora, loretta_rep or loretta_adp), or use quant.engine: native to train the weights with quzo")


def _check_scales(recipe, chosen, fail) -> None:
    """method.zo.low_bit: scales trains the scales of the model's own native low-bit layers."""
    quant = recipe.quant
    if not chosen.format.low_bit:
        fail("method.zo.low_bit", f"scales trains the per-group scales of low-bit layers, and quant.format is "
             f"{quant.format}: set quant.format (int4, int8, fp8_*)")
    if chosen.format.low_bit and not chosen.format.scales_trainable:
        fail("method.zo.low_bit", f"{quant.format}'s sub-block scales are 6- or 8-bit integers times a float16 "
             f"super-block scale, which scale updates cannot stay on: use method.zo.low_bit: codes, or q4_1 / q4_0 "
             f"to train scales")
    if not chosen.engine.zo_trains_weights:
        fail("method.zo.low_bit", f"scales trains the scales of ftkit's own low-bit layers; {quant.engine} layers "
             f"are frozen: use quant.engine: native")
    if not chosen.adapter.trains_base:
        fail("method.zo.low_bit", f"scales trains the base model's scales, and method.adapter {recipe.method.adapter} "
             f"freezes the base: set method.adapter: none, or method.zo.low_bit: codes to train the adapter alone")


# --- zeroth-order estimators: what sets the optimizers apart, and the kinds of direction (read by ftkit.optim.core) ---


@dataclass(frozen=True)
class Direction:
    """A kind of random direction (method.zo.direction). `behaviour`: the kind itself, or a Hook to it, an
    ftkit.optim.directions.DirectionKind (how it draws, perturbs, updates and what a trace records of it).
    `options`: the method.zo keys that configure it (integers >= 1, unset: the kind's defaults)."""

    name: str
    summary: str
    behaviour: Any
    options: tuple[str, ...] = ()


DIRECTIONS: Registry = Registry("method.zo.direction", [
    Direction("gaussian", "N(0, I), one Gaussian per element (MeZO, QuZO)",
              Hook("ftkit.optim.directions.gaussian:GAUSSIAN")),
    Direction("rademacher", "random signs +-1 (SPSA's): one random bit per element instead of a Gaussian, several "
                            "times cheaper to draw, and already on QuZO's grid, so no rounding is drawn",
              Hook("ftkit.optim.directions.rademacher:RADEMACHER")),
    Direction("lowrank", "U V^T / sqrt(r) per matrix, V kept for `refresh` steps (LOZO); vectors Gaussian",
              Hook("ftkit.optim.directions.lowrank:LOWRANK"), options=("rank", "refresh")),
])

@dataclass(frozen=True)
class Estimator:
    """How a step's losses estimate the gradient (method.zo.estimator). `behaviour`: an
    ftkit.optim.estimators.EstimatorKind or a Hook to one; `min_queries` and `why`: what validation asks of
    method.zo.n_queries."""

    name: str
    summary: str
    behaviour: Any
    min_queries: int = 1
    why: str = ""


ESTIMATORS: Registry = Registry("method.zo.estimator", [
    Estimator("central", "central differences (L(w + eps u) - L(w - eps u)) / 2 eps, two forwards per query",
              Hook("ftkit.optim.estimators.central:CENTRAL")),
    Estimator("one_sided", "FZOO: one-sided differences against L(w), n + 1 forwards, normalised by their deviation",
              Hook("ftkit.optim.estimators.one_sided:ONE_SIDED"), min_queries=2,
              why="its step is divided by the standard deviation of the queries' estimates"),
])

ADAMW_SECTION = Section("adamw", AdamWSpec, _check_adamw)
SGD_SECTION = Section("sgd", SGDSpec, _check_sgd)
ZO_SECTION = Section("zo", ZOSpec, _check_zo)

ADAMW = Optimizer("adamw", "AdamW, backpropagation", build=Hook("ftkit.optim.first_order:build_adamw"),
                  section=ADAMW_SECTION)
SGD = Optimizer("sgd", "SGD with optional (Nesterov) momentum, backpropagation",
                build=Hook("ftkit.optim.first_order:build_sgd"), section=SGD_SECTION)
MEZO = Optimizer("mezo", "MeZO: zeroth-order SGD on full-precision tensors, two forward passes per query",
                 build=Hook("ftkit.optim.zo:build_zeroth_order"), section=ZO_SECTION,
                 zeroth_order=ZerothOrderRules(rounds_directions=False, trains_low_bit=False),
                 prepare=Hook("ftkit.optim.zo_targets:prepare_model"), validate=_check_zeroth_order)
QUZO = Optimizer("quzo", "QuZO: zeroth-order on low-precision weights, quantized directions, stochastically "
                         "rounded updates", build=Hook("ftkit.optim.zo:build_zeroth_order"), section=ZO_SECTION,
                 zeroth_order=ZerothOrderRules(rounds_directions=True, trains_low_bit=True),
                 prepare=Hook("ftkit.optim.zo_targets:prepare_model"),
                 validate=_check_zeroth_order)
