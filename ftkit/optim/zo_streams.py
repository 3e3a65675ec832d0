"""Random streams of the zeroth-order methods: every random tensor is a pure function of
(run seed, step, query, tensor index, stream), so nothing random is ever stored, a resumed run draws exactly what
an uninterrupted one would, and `ftkit replay` regenerates a whole run from its trace.

Streams: the Gaussian direction u, the perturbation's rounding Q1, the update direction's rounding Q2 (the same
stream as Q1 when `independent_roundings` is off, which is what the authors' public code does) and the rounding
of the update onto the weight grid.
"""

from __future__ import annotations

import torch

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
    return torch.Generator(device=device).manual_seed(seed)


def gaussian(shape, seed: int, device="cpu") -> torch.Tensor:
    return torch.randn(shape, generator=generator(seed, device), device=device, dtype=torch.float32)


# Elements per pass when noise is added to a large tensor: noise exists a chunk at a time (16 MiB), so perturbing
# a 32000 x 4096 matrix costs its direction and one chunk, not 1.5 more float copies of the matrix.
# Chunks stay large because every pass is one parallel region: thousands of small ones cost more than they save.
CHUNK_ELEMENTS = 1 << 22


def bits_to_uniform(bits: torch.Tensor) -> torch.Tensor:
    """15 of each element's bits as (k + 1/2) / 2^15: uniform in (0, 1)."""
    return (bits & 0x7FFF).to(torch.float32).mul_(2.0**-15).add_(2.0**-16)


def uniform_chunks(numel: int, seed: int, device="cpu", size: int = 0):
    """Uniform rounding noise for `numel` elements, as (slice, noise) pairs in chunks of `size` (default
    CHUNK_ELEMENTS), so the noise of a large tensor never exists whole.

    Each element is (k + 1/2) / 2^15 in (0, 1), k from 15 random bits; each 32-bit draw of the generator feeds two
    elements, a fraction of torch.rand's cost (BENCHMARKS.md), and a stochastic rounding driven by it is unbiased
    to within 2^-16 of a grid step. The numbers do not depend on the chunk size: on CPU the generator's draws are
    serial and every chunk but the last is even (two elements per draw)."""
    size = size or CHUNK_ELEMENTS
    if size % 2:
        raise ValueError(f"noise chunks hold whole draws of two elements; got a chunk of {size}")
    gen = generator(seed, device)
    for start in range(0, numel, size):
        count = min(size, numel - start)
        words = torch.empty((count + 1) // 2, dtype=torch.int32, device=device).random_(generator=gen)
        yield slice(start, start + count), bits_to_uniform(words.view(torch.int16)[:count])


def quantize_direction(u: torch.Tensor, bits: int, seed: int) -> torch.Tensor:
    """Q(u): u stochastically rounded onto a symmetric per-tensor grid of 2^bits - 1 levels (int4: -7..7 times
    max|u| / 7). Unbiased, E[Q(u) | u] = u, and never clipped, since the grid spans max|u|. bits = 0: u itself.

    In place on a contiguous u, a chunk of noise at a time (the numbers of the whole noise tensor at once)."""
    if bits == 0:
        return u
    levels = 2 ** (bits - 1) - 1
    low, high = torch.aminmax(u)  # max|u| without a full-size |u|
    step = torch.maximum(high, -low).clamp(min=1e-30) / levels
    flat = u.view(-1)
    for part, noise in uniform_chunks(u.numel(), seed, u.device):
        flat[part].div_(step).add_(noise).floor_().mul_(step)
    return u
