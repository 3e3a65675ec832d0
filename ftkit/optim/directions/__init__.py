"""Kinds of random direction for zeroth-order steps, and the direction source a step draws from.

A kind (`DirectionKind`, one module each: gaussian.py, rademacher.py, lowrank.py; declared in ftkit.optim.DIRECTIONS)
says how the direction u of one tensor is drawn from its stream's seed, whole or a chunk at a time, and what a trace
records of it. A kind may also keep draws through a step (`StepDraws`: random-sign words drawn once and reused by a
query's three passes, low-rank factors), stand in for targets it moves its own way, and update low-bit tensors its
own way; the defaults keep nothing and leave every move and update to the targets (ftkit.optim.zo_targets).

`Directions` is a kind with the rounding the optimizer asks for (its declaration's `zeroth_order`, a
ftkit.components.ZerothOrderRules): u1 = Q1(u) for the perturbation and u2 = Q2(u) for the update, two stochastic
roundings onto a `perturb_bits` grid with independent random bits (bits 0: u1 = u2 = u). A kind whose directions
already lie on every such grid (`on_grid`, random signs) is never rounded: stochastic rounding would return it
unchanged.
"""

from __future__ import annotations

import abc
import functools
from dataclasses import dataclass

import torch

from ftkit.components import Hook
from ftkit.optim.zo_streams import (
    Q1,
    Q2,
    UPDATE,
    U,
    chunk_slices,
    derive,
    direction_step,
    quantize_direction,
    round_onto,
    uniform_chunks,
)


class DirectionKind(abc.ABC):
    """The interface of a kind of direction. `draw` and `chunks` must give the same numbers for a seed however the
    tensor is cut (chunk after chunk on a GPU), so a run, its resume and its replay draw the same directions."""

    name: str = ""
    on_grid: bool = False  # u lies on every symmetric grid that spans max|u| (QuZO then draws no rounding)

    @abc.abstractmethod
    def draw(self, shape, seed: int, device="cpu") -> torch.Tensor:
        """The whole direction of a tensor of `shape`, from the stream `seed` (float32)."""

    def chunks(self, numel: int, seed: int, device="cpu", held=None):
        """The numbers of `draw(numel, seed, device)` as (slice, values) over `chunk_slices(numel)`. `held`: what
        the kind's `StepDraws.held` kept for this direction (None: draw it)."""
        u = self.draw(numel, seed, device)
        for part in chunk_slices(numel):
            yield part, u[part]

    def trace_fields(self) -> dict:
        """What a trace header records of the kind beyond its name."""
        return {}

    def with_options(self, **options) -> DirectionKind:
        """The kind configured by its method.zo options (ftkit.optim.config.Direction.options)."""
        if options:
            raise ValueError(f"direction {self.name!r} takes no option {', '.join(options)}")
        return self

    def begin_step(self, run_seed: int = 0, step: int = 0) -> StepDraws:
        """What the kind keeps through step `step` (counted from 0) of a run seeded `run_seed`: a kind whose draws
        outlive a step derives them from these, so a resumed run and a replay draw them again."""
        return StepDraws()


class StepDraws:
    """What a kind keeps through one step, and how it updates low-bit targets; by default nothing kept, every
    direction drawn where it is used, and every target updated by itself."""

    def pass_over(self, targets: list, query_seed: int):
        """The targets in order, for one pass of query `query_seed` (a kind may draw their directions ahead, or
        yield in a target's place an object with its `move` and `update` that moves it another way)."""
        return iter(targets)

    def held(self, query_seed: int, index: int):
        """What the step holds of target `index`'s direction for `query_seed`, passed to `DirectionKind.chunks`."""
        return None

    def perturbation(self, target, query_seed: int, to: float):
        """The perturbation hook of a low-bit target (`layer -> to * u1`), or None for the general one."""
        return None

    def update_together(self, targets: list, directions: Directions, step_seed: int, query_seeds: list[int],
                        coefs: list[float], decay: float) -> list:
        """Update the low-bit targets the kind updates its own way, and return the others."""
        return targets


def direction_kind(name: str, options: tuple = ()) -> DirectionKind:
    """The kind ftkit.optim.DIRECTIONS declares as `name`, configured by `options` ((key, value) pairs)."""
    from ftkit.optim import DIRECTIONS

    if name not in DIRECTIONS:
        raise ValueError(f"direction must be one of {', '.join(d.name for d in DIRECTIONS)}; got {name!r}")
    behaviour = DIRECTIONS[name].behaviour
    kind = behaviour.resolve() if isinstance(behaviour, Hook) else behaviour
    return kind.with_options(**dict(options)) if options else kind


@dataclass(frozen=True)
class Directions:
    """How a step's directions are drawn and its updates rounded (method.zo, read through the optimizer's rules)."""

    bits: int  # 0: directions as they are (MeZO)
    independent: bool  # Q2 uses its own rounding bits (QuZO) or Q1's (the public code's variant)
    update_rounding: str  # "stochastic" or "nearest" (low-bit targets only)
    distribution: str = "gaussian"  # the kind's name in ftkit.optim.DIRECTIONS
    options: tuple = ()  # the kind's options, (key, value) pairs (method.zo.rank, ...)

    def __post_init__(self):
        direction_kind(self.distribution, self.options)  # an unknown kind or option is refused here, not at a step

    @functools.cached_property
    def kind(self) -> DirectionKind:
        return direction_kind(self.distribution, self.options)

    @property
    def rounds(self) -> bool:
        """Whether directions are rounded onto a grid: QuZO's, unless the kind's are on every grid already."""
        return self.bits > 0 and not self.kind.on_grid

    def begin_step(self, run_seed: int = 0, step: int = 0) -> StepDraws:
        return self.kind.begin_step(run_seed, step)

    @property
    def streams(self) -> tuple[int, int, int]:
        """The stream ids of the perturbation's rounding, the update direction's rounding and the update's grid
        rounding, as the trace records them."""
        return Q1, Q2 if self.independent else Q1, UPDATE

    def trace_fields(self) -> dict:
        return {"perturb_bits": self.bits, "independent_roundings": self.independent,
                "update_rounding": self.update_rounding, "direction": self.distribution, **self.kind.trace_fields()}

    def perturbation(self, query_seed: int, index: int, shape, device) -> torch.Tensor:
        u = self.kind.draw(shape, derive(query_seed, index, U), device)
        return quantize_direction(u, self.bits, derive(query_seed, index, Q1)) if self.rounds else u

    def both(self, query_seed: int, index: int, shape, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(u1, u2) from one draw of u."""
        u = self.kind.draw(shape, derive(query_seed, index, U), device)
        if not self.rounds:
            return u, u
        u1 = quantize_direction(u.clone(), self.bits, derive(query_seed, index, Q1))
        if not self.independent:
            return u1, u1
        return u1, quantize_direction(u, self.bits, derive(query_seed, index, Q2))

    def update_direction(self, query_seed: int, index: int, shape, device) -> torch.Tensor:
        u = self.kind.draw(shape, derive(query_seed, index, U), device)
        return quantize_direction(u, self.bits, derive(query_seed, index, self.update_stream)) if self.rounds else u

    @property
    def update_stream(self) -> int:
        return Q2 if self.independent else Q1

    def chunks(self, query_seed: int, index: int, numel: int, device, streams: tuple[int, ...], held=None):
        """The directions of `streams` (Q1, Q2) for a tensor of `numel` elements, a chunk at a time: (slice, [u_s
        over the slice]), each u_s the one `perturbation` / `update_direction` / `both` give, flattened. What a
        chunk holds exists once (16 MiB), not the whole tensor's direction; the grid of a rounded direction needs
        max|u| first, so a tensor of several chunks draws its direction twice. `held`: see `StepDraws.held`."""
        kind, u_seed, slices = self.kind, derive(query_seed, index, U), chunk_slices(numel)
        if not self.rounds:
            for part, u in kind.chunks(numel, u_seed, device, held):
                yield part, [u] * len(streams)
            return
        step = None
        if len(slices) > 1:
            bounds = [torch.aminmax(u) for _, u in kind.chunks(numel, u_seed, device)]
            step = direction_step(torch.stack([b[0] for b in bounds]).min(),
                                  torch.stack([b[1] for b in bounds]).max(), self.bits)
        noises = [uniform_chunks(numel, derive(query_seed, index, s), device, slices=slices) for s in streams]
        for part, u in kind.chunks(numel, u_seed, device):
            here = step if step is not None else direction_step(*torch.aminmax(u), self.bits)
            rounded = [round_onto(u if k == len(noises) - 1 else u.clone(), here, next(noise)[1])
                       for k, noise in enumerate(noises)]
            yield part, rounded
            del u, rounded  # a chunk at a time: nothing of this one is held while the next is drawn
