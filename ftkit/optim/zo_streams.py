"""Random streams of the zeroth-order methods: every random tensor is a pure function of
(run seed, step, query, tensor index, stream), so nothing random is ever stored, a resumed run draws exactly what
an uninterrupted one would, and `ftkit replay` regenerates a whole run from its trace.

Streams: the Gaussian direction u, the perturbation's rounding Q1, the update direction's rounding Q2 (the same
stream as Q1 when `independent_roundings` is off, which is what the authors' public code does) and the rounding
of the update onto the weight grid.
"""

from __future__ import annotations

import torch

from ftkit import devices

U, Q1, Q2, UPDATE = 0, 1, 2, 3
MASK64 = (1 << 64) - 1


def splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def derive(*parts: int) -> int:
    """A 63-bit seed from a tuple of integers (each part mixed in turn, so (1, 2) and (2, 1) differ)."""
    x = 0
    for part in parts:
        x = splitmix64(x ^ (part & MASK64))
    return x >> 1


def generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    return devices.generator(seed, device)


def gaussian(shape, seed: int, device="cpu") -> torch.Tensor:
    return torch.randn(shape, generator=generator(seed, device), device=device, dtype=torch.float32)


# Elements per pass when noise is added to a large tensor: noise exists a chunk at a time (16 MiB), so perturbing
# a 32000 x 4096 matrix costs its direction and one chunk, not 1.5 more float copies of the matrix.
# Chunks stay large because every pass is one parallel region: thousands of small ones cost more than they save.
CHUNK_ELEMENTS = 1 << 22


def bits_to_uniform(bits: torch.Tensor) -> torch.Tensor:
    """15 of each element's bits as (k + 1/2) / 2^15: uniform in (0, 1)."""
    return (bits & 0x7FFF).to(torch.float32).mul_(2.0**-15).add_(2.0**-16)


def chunk_slices(numel: int, size: int = 0) -> list[slice]:
    """Consecutive ranges of `size` (default CHUNK_ELEMENTS) elements covering `numel`; a tail shorter than 16 joins
    the range before it. The CPU generator draws normals 16 at a time, so ranges on multiples of 16 ending in one of
    16 or more give the numbers of one whole draw; even sizes do the same for the rounding noise (two per draw)."""
    size = size or CHUNK_ELEMENTS
    starts = list(range(0, numel, size))
    if len(starts) > 1 and numel - starts[-1] < 16:
        starts.pop()
    return [slice(start, stop) for start, stop in zip(starts, starts[1:] + [numel])]


def gaussian_chunks(numel: int, seed: int, device="cpu"):
    """N(0, 1) numbers for `numel` elements as (slice, values) pairs over `chunk_slices`: on the CPU the numbers of
    `gaussian(numel, seed)`, drawn a chunk at a time."""
    gen = generator(seed, device)
    for part in chunk_slices(numel):
        yield part, torch.randn(part.stop - part.start, generator=gen, device=device, dtype=torch.float32)


def uniform_chunks(numel: int, seed: int, device="cpu", size: int = 0, slices: list[slice] | None = None):
    """Uniform rounding noise for `numel` elements, as (slice, noise) pairs in chunks of `size` (default
    CHUNK_ELEMENTS), so the noise of a large tensor never exists whole.

    Each element is (k + 1/2) / 2^15 in (0, 1), k from 15 random bits; each 32-bit draw of the generator feeds two
    elements, a fraction of torch.rand's cost (BENCHMARKS.md), and a stochastic rounding driven by it is unbiased
    to within 2^-16 of a grid step. The numbers do not depend on the chunk size: on CPU the generator's draws are
    serial and every chunk but the last is even (two elements per draw). `slices` gives the chunks explicitly."""
    size = size or CHUNK_ELEMENTS
    if size % 2 or any((part.stop - part.start) % 2 for part in (slices or [])[:-1]):
        raise ValueError(f"noise chunks hold whole draws of two elements; got a chunk of {size}")
    gen = generator(seed, device)
    for part in slices or [slice(start, min(start + size, numel)) for start in range(0, numel, size)]:
        count = part.stop - part.start
        words = torch.empty((count + 1) // 2, dtype=torch.int32, device=device).random_(generator=gen)
        noise = bits_to_uniform(words.view(torch.int16)[:count])
        del words  # not held while the caller uses the chunk
        yield part, noise
        del noise  # nor while the next one is drawn


def direction_step(low: torch.Tensor, high: torch.Tensor, bits: int) -> torch.Tensor:
    """The spacing of a direction's grid of 2^bits - 1 levels, from its smallest and largest values."""
    return torch.maximum(high, -low).clamp(min=1e-30) / (2 ** (bits - 1) - 1)


def round_onto(u: torch.Tensor, step: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """u stochastically rounded onto multiples of `step` with uniform `noise`, in place."""
    return u.div_(step).add_(noise).floor_().mul_(step)


def quantize_direction(u: torch.Tensor, bits: int, seed: int) -> torch.Tensor:
    """Q(u): u stochastically rounded onto a symmetric per-tensor grid of 2^bits - 1 levels (int4: -7..7 times
    max|u| / 7). Unbiased, E[Q(u) | u] = u, and never clipped, since the grid spans max|u|. bits = 0: u itself.

    In place on a contiguous u, a chunk of noise at a time (the numbers of the whole noise tensor at once)."""
    if bits == 0:
        return u
    step = direction_step(*torch.aminmax(u), bits)  # max|u| without a full-size |u|
    flat = u.view(-1)
    for part, noise in uniform_chunks(u.numel(), seed, u.device):
        round_onto(flat[part], step, noise)
    return u
