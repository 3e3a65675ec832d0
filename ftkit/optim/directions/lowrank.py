"""Low-rank directions (LOZO: Chen et al., "Enhancing Zeroth-order Fine-tuning for Language Models with Low-rank
Structures", ICLR 2025): each matrix W (m x n) of a step is perturbed along Z = U V^T / sqrt(r), U (m x r) and V
(n x r) Gaussian, instead of along m n independent Gaussians. Vectors (norms, biases) and tensors of other ranks keep
full Gaussian directions.

Lazy sampling, as LOZO does: V is kept for `refresh` steps and U redrawn every step. Nothing is stored for it: V of
matrix k is drawn from the seed (run seed, k, step // refresh), U from the query's seed, so a resumed run and a
replay draw them again from the step number.

Scale. With U, V standard Gaussian, E[vec(U V^T) vec(U V^T)^T] = r I (entry (i, j) is a sum of r products of
independent unit Gaussians), so Z = U V^T / sqrt(r) has E[z z^T] = I like a full Gaussian direction: `eps` and the
rate carry over from Gaussian runs, and E[g z] = E[z z^T] grad = grad to first order in eps. LOZO writes its
perturbation as eps' U V^T and its step as lr g' U V^T / r (g' its projected gradient at eps'); that is this
estimator with eps = eps' sqrt(r), step for step the same update. Within one window V is fixed and the estimate is
the gradient projected onto the span of V (E over U alone gives V V^T / r on the right); over windows E[V V^T] = r I
and the projection averages out, as in LOZO.

QuZO's rounding. The factors are rounded as Gaussian directions are (ftkit.optim.directions.Directions): U and V
each stochastically rounded onto its own per-tensor grid of 2^bits - 1 levels, the perturbation with the bits of
stream Q1, the update with those of Q2, every element with its own independent bit (U's and V's from separate
sub-streams). Then z1 = Q1(U) Q1(V)^T / sqrt(r) and z2 = Q2(U) Q2(V)^T / sqrt(r), and:
- E[z1 | U, V] = z: each entry sum_a Q1(U)_ia Q1(V)_ja / sqrt(r) is a sum of products of two roundings of
  different elements, independent and each unbiased, so the expectation factorises;
- z1 and z2 are independent given (U, V) (disjoint bits), so E[z1 z2^T | U, V] = z z^T and E[z1 z2^T] = I: the
  estimate g z2 with g along z1 is unbiased, as for Gaussian QuZO.
Rounding the product U V^T instead would need it dense; rounding U and V with the same bits for both factors would
still be unbiased in the mean but not independent across streams; and one rounding for perturbation and update
(`independent_roundings: false`) gives E[z1 z1^T | U, V] = z z^T + (the rounding variances of U and V, and their
product, on the diagonal blocks), the inflated diagonal of the public code's variant.

Where the direction lands:
- a quantized layer is never given a dense perturbed weight: its forward runs its own low-bit kernel and adds
  eps (x Q1(V)) Q1(U)^T / sqrt(r) (`QuantLinear.output_perturbation`); its update is drawn as the few codes it
  moves (ftkit.optim.lowrank_update) or, where that does not apply, built a block of rows at a time and rounded like
  a Gaussian update (ftkit.optim.zo_targets.land);
- a full-precision matrix (nn.Linear weights, adapters' matrices) is moved in place, a block of rows of U V^T at a
  time, each block summed over the rank elementwise in a fixed order (the same bits at any thread count, which a
  replay relies on).
"""

from __future__ import annotations

import contextlib
import math

import torch

from ftkit.optim import lowrank_update
from ftkit.optim.directions import DirectionKind, Directions, StepDraws
from ftkit.optim.zo_streams import CHUNK_ELEMENTS, Q1, Q2, U, derive, gaussian, gaussian_chunks, quantize_direction
from ftkit.optim.zo_targets import land

@contextlib.contextmanager
def one_thread(device):
    """Torch on one thread for the block: a step's factors and its thinned update are many operations on small
    tensors (a matrix's factors hold (m + n) r numbers), where waking the other threads costs more than the work
    (on a busy machine, milliseconds an operation). The numbers are the same at any thread count."""
    threads = torch.get_num_threads() if torch.device(device).type == "cpu" else 1
    if threads > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if threads > 1:
            torch.set_num_threads(threads)


LOWRANK_DOMAIN = 0x10C0  # separates the seeds of the V windows from any other use of the run seed
FACTOR_U, FACTOR_V = 0, 1  # the sub-streams of a rounding's bits for each factor


class LowRank(DirectionKind):
    name = "lowrank"

    def __init__(self, rank: int = 2, refresh: int = 50):
        if rank < 1 or refresh < 1:
            raise ValueError(f"direction 'lowrank' needs rank >= 1 and refresh >= 1, got {rank} and {refresh}")
        self.rank, self.refresh = rank, refresh

    def with_options(self, rank: int | None = None, refresh: int | None = None, **others) -> LowRank:
        if others:
            raise ValueError(f"direction 'lowrank' takes rank and refresh, not {', '.join(others)}")
        return LowRank(self.rank if rank is None else rank, self.refresh if refresh is None else refresh)

    def draw(self, shape, seed: int, device="cpu") -> torch.Tensor:
        """The Gaussian direction of a vector; a matrix's needs the step (`begin_step`), which knows its window."""
        if isinstance(shape, (tuple, list, torch.Size)) and len(shape) == 2:
            raise ValueError("a low-rank direction of a matrix is drawn within a step (LowRank.begin_step)")
        return gaussian(shape, seed, device)

    def chunks(self, numel: int, seed: int, device="cpu", held=None):
        return gaussian_chunks(numel, seed, device)

    def trace_fields(self) -> dict:
        return {"rank": self.rank, "refresh": self.refresh}

    def begin_step(self, run_seed: int = 0, step: int = 0) -> LowRankStep:
        return LowRankStep(self.rank, derive(run_seed, LOWRANK_DOMAIN, step // self.refresh))


LOWRANK = LowRank()


def is_matrix(target) -> bool:
    """Low-bit codes and full-precision matrices move along U V^T; vectors, and the scales of low-bit layers
    (method.zo.low_bit: scales: a delta the layer dequantizes with, few numbers), keep full Gaussian directions."""
    param = getattr(target, "param", None)
    return target.low_bit or (param is not None and param.ndim == 2)


class LowRankStep(StepDraws):
    """The factors of one step: V of each matrix from the window's seed, U from the query's; those of the query a
    pass has reached kept for its other passes ((m + n) r numbers a matrix)."""

    def __init__(self, rank: int, window_seed: int):
        self.rank, self.window = rank, window_seed
        self.scale = 1.0 / math.sqrt(rank)
        self.query, self.kept = None, {}

    def pass_over(self, targets: list, query_seed: int):
        """The targets in order, each matrix in the place of a stand-in that moves it along U V^T."""
        if query_seed != self.query:
            self.query, self.kept = query_seed, {}
        for target in targets:
            if not is_matrix(target):
                yield target
            else:
                yield QuantMatrix(target, self) if target.low_bit else FloatMatrix(target, self)

    def factors(self, d: Directions, query_seed: int, index: int, shape, device, stream: int | None):
        """(U, V) of matrix `index` of `shape` for `query_seed`: as drawn (stream None, or unrounded directions), or
        rounded with the bits of `stream` (Q1: the perturbation's, Q2: the update's)."""
        stream = stream if d.rounds else None
        key = (query_seed, index, stream)
        found = self.kept.get(key)
        if found is not None:
            return found
        if stream is None:
            rows, cols = shape
            with one_thread(device):
                found = (gaussian((rows, self.rank), derive(query_seed, index, U), device),
                         gaussian((cols, self.rank), derive(self.window, index), device))
        else:
            u, v = self.factors(d, query_seed, index, shape, device, None)
            with one_thread(device):
                found = (quantize_direction(u.clone(), d.bits, derive(query_seed, index, stream, FACTOR_U)),
                         quantize_direction(v.clone(), d.bits, derive(query_seed, index, stream, FACTOR_V)))
        if query_seed == self.query:
            self.kept[key] = found
        return found

    def update_together(self, targets: list, directions: Directions, step_seed: int, query_seeds: list[int],
                        coefs: list[float], decay: float) -> list:
        """Update the quantized layers whose update is drawn as its moves (ftkit.optim.lowrank_update), and return
        the others."""
        if len(coefs) != 1 or decay or not any(t.low_bit for t in targets):
            return targets
        entries = [(t.layer, t.index, *self.factors(directions, query_seeds[0], t.index, t.shape, t.device,
                                                    directions.update_stream)) for t in targets if t.low_bit]
        with one_thread(targets[0].device):
            done = lowrank_update.update(entries, directions.update_rounding, step_seed, coefs[0] * self.scale)
        for layer in done:
            layer.output_perturbation = None
        return [t for t in targets if not (t.low_bit and t.layer in done)]


def outer_rows(u: torch.Tensor, v_t: torch.Tensor, rows: slice) -> torch.Tensor:
    """(U V^T)[rows] from U [m, r] and V^T [r, n] (float32): the rank's products added elementwise in order."""
    out = u[rows, :1] * v_t[:1]
    for a in range(1, u.shape[1]):
        out.add_(u[rows, a:a + 1] * v_t[a:a + 1])
    return out


def row_blocks(rows: int, cols: int) -> list[slice]:
    """Blocks of rows of about CHUNK_ELEMENTS elements (read at each call: tests shrink it)."""
    step = max(1, CHUNK_ELEMENTS // max(cols, 1))
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]


class FloatMatrix:
    """A full-precision matrix moved in place along U V^T / sqrt(r), a block of rows at a time."""

    low_bit = False

    def __init__(self, target, step: LowRankStep):
        self.target, self.step = target, step

    def move(self, d: Directions, query_seed: int, current: float, to: float, step=None) -> None:
        self.add(d, query_seed, [(Q1, to - current)])

    def update(self, d: Directions, step_seed: int, query_seeds: list[int], coefs: list[float], restore: float,
               decay: float, step=None) -> None:
        """As FloatTarget.update: the last query's restore and update in one pass, decay between them; then the
        earlier queries' updates."""
        *earlier, (last_seed, last_coef) = list(zip(query_seeds, coefs))
        stream = Q2 if d.independent else Q1
        if decay and self.target.decay:
            self.add(d, last_seed, [(Q1, restore)], decay=decay)
            self.add(d, last_seed, [(stream, last_coef)])
        elif not d.rounds or not d.independent:
            self.add(d, last_seed, [(Q1, restore + last_coef)])  # u1 = u2: restore and update in one pass
        else:
            self.add(d, last_seed, [(Q1, restore), (Q2, last_coef)])
        for seed, coef in earlier:
            self.add(d, seed, [(stream, coef)])

    def add(self, d: Directions, query_seed: int, terms: list[tuple[int, float]], decay: float = 0.0) -> None:
        """w += sum over terms (stream, alpha) of alpha U_s V_s^T / sqrt(r), then w *= 1 - decay if decay."""
        p = self.target.flat().view(self.target.param.shape)
        rows, cols = p.shape
        pairs = [(*self.step.factors(d, query_seed, self.target.index, p.shape, p.device, stream), alpha)
                 for stream, alpha in terms]
        pairs = [(u, v.T.contiguous(), alpha * self.step.scale) for u, v, alpha in pairs]
        for block in row_blocks(rows, cols):
            chunk = p[block]
            for u, v_t, alpha in pairs:
                chunk.add_(outer_rows(u, v_t, block).to(p.dtype), alpha=alpha)
            if decay:
                chunk.mul_(1.0 - decay)


class QuantMatrix:
    """A quantized layer perturbed at its output (its own kernel plus eps (x V) U^T / sqrt(r)); its codes change only
    at the update."""

    low_bit = True

    def __init__(self, target, step: LowRankStep):
        self.target, self.step = target, step

    def move(self, d: Directions, query_seed: int, current: float, to: float, step=None) -> None:
        layer = self.target.layer
        layer.perturbation = None
        if to == 0.0:
            layer.output_perturbation = None
            return
        u, v = self.step.factors(d, query_seed, self.target.index, self.target.shape, self.target.device, Q1)
        layer.output_perturbation = (u, v, to * self.step.scale)

    @torch.no_grad()
    def update(self, d: Directions, step_seed: int, query_seeds: list[int], coefs: list[float], restore: float,
               decay: float, step=None) -> None:
        """The general path: sum_i coef_i U2_i V2_i^T / sqrt(r) built a block of rows at a time, then rounded onto
        the grid as a Gaussian update is (several queries, weight decay, FP8 grids, large moves)."""
        layer, target = self.target.layer, self.target
        layer.output_perturbation = None
        change = torch.empty(target.shape, dtype=torch.float32, device=target.device)
        factors = [(*self.step.factors(d, seed, target.index, target.shape, target.device, d.update_stream), coef)
                   for seed, coef in zip(query_seeds, coefs)]
        factors = [(u, v.T.contiguous(), coef * self.step.scale) for u, v, coef in factors]
        for block in row_blocks(*target.shape):
            (u, v_t, coef), *rest = factors
            change[block] = outer_rows(u, v_t, block).mul_(coef)
            for u, v_t, coef in rest:
                change[block].add_(outer_rows(u, v_t, block), alpha=coef)
        land(layer, target.index, change, step_seed, d.update_rounding, decay)
