"""Random streams of the zeroth-order methods: every random tensor is a pure function of
(run seed, step, query, tensor index, stream), so nothing random is ever stored, a resumed run draws exactly what
an uninterrupted one would, and `ftkit replay` regenerates a whole run from its trace.

Streams: the Gaussian direction u, the perturbation's rounding Q1, the update direction's rounding Q2 (the same
stream as Q1 when `independent_roundings` is off, which is what the authors' public code does) and the rounding
of the update onto the weight grid (with the places of its moves, when it is drawn sparsely).
"""

from __future__ import annotations

import functools
import math
from concurrent.futures import ThreadPoolExecutor

import torch

from ftkit import devices

U, Q1, Q2, UPDATE = 0, 1, 2, 3
UPDATE_PLACES = 4  # where a sparse update's moves fall within their groups (ftkit.optim.sparse_update)
UPDATE_ACCEPT = 5  # which candidate moves of a low-rank update are made (ftkit.optim.lowrank_update)
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


# A stream of random numbers for a tensor (its Gaussian direction, a rounding's bits) is cut into blocks of BLOCK
# elements, block b drawn from its own generator seeded with (stream seed, b): any range of elements is drawn by
# itself, and on the CPU the blocks are drawn by every core at once, each number the same whatever the thread count.
# On a GPU one generator draws a tensor's stream (chunk after chunk): a single kernel per chunk, and numbers that
# are a function of the seed on that device kind.
BLOCK = 1 << 16
# Elements per pass when noise is added to a large tensor: noise exists a chunk at a time (16 MiB), so perturbing
# a 32000 x 4096 matrix costs its direction and one chunk, not 1.5 more float copies of the matrix.
CHUNK_ELEMENTS = 1 << 22

_pool: list = [None, 0]  # a thread pool for drawing blocks, and its size


def _workers() -> ThreadPoolExecutor | None:
    """A pool of torch's intra-op thread count (None for one thread): the threads draw blocks side by side (torch
    releases the GIL while it fills a tensor)."""
    threads = torch.get_num_threads()
    if threads < 2:
        return None
    if _pool[1] != threads:
        if _pool[0] is not None:
            _pool[0].shutdown(wait=False)
        _pool[:] = [ThreadPoolExecutor(max_workers=threads, thread_name_prefix="ftkit-rng"), threads]
    return _pool[0]


# A block's numbers come out of its generator in order, Gaussians 16 at a time (torch's Box-Muller pairs numbers
# within groups of 16), so the first n numbers of a block, n a multiple of 16, are those of a draw of n alone
# (tests/test_zo.py checks it): a tensor of a few hundred elements draws a few hundred numbers, not a whole block.
DRAW_GRANULE = 16


def _draw_blocks(seed: int, start: int, stop: int, dtype: torch.dtype, fill, parallel: bool = True) -> torch.Tensor:
    """Elements [start, stop) of the CPU stream `seed`: the blocks covering them are drawn (in parallel unless
    `parallel` is off: a pool thread must not wait on the pool), each by `fill(out, generator)` up to the last
    element needed, then the range is cut out of them."""
    first, last = start // BLOCK, (stop - 1) // BLOCK
    tail = min(BLOCK, -(-(stop - last * BLOCK) // DRAW_GRANULE) * DRAW_GRANULE)  # what the last block must draw
    out = torch.empty((last - first) * BLOCK + tail, dtype=dtype)
    # Inference mode is per thread: the pool's threads must write `out` in the mode it was made in (a perturbed
    # forward draws its direction inside the caller's inference_mode).
    inference = torch.is_inference_mode_enabled()

    def draw(block: int) -> None:
        offset = (block - first) * BLOCK
        with torch.inference_mode(inference):
            fill(out[offset: offset + (tail if block == last else BLOCK)], devices.generator(derive(seed, block)))

    pool = _workers() if parallel else None
    if pool is None or last == first:
        for block in range(first, last + 1):
            draw(block)
    else:
        list(pool.map(draw, range(first, last + 1)))
    return out[start - first * BLOCK: stop - first * BLOCK]


def _normal(out: torch.Tensor, gen: torch.Generator) -> None:
    torch.randn(out.shape, generator=gen, out=out)


def _words(out: torch.Tensor, gen: torch.Generator) -> None:
    out.random_(generator=gen)


def gaussian(shape, seed: int, device="cpu") -> torch.Tensor:
    """N(0, 1) numbers of the stream `seed`, shaped `shape`, drawn on `device`."""
    numel = math.prod(shape) if isinstance(shape, (tuple, list, torch.Size)) else int(shape)
    if torch.device(device).type in ("cpu", "meta"):
        if torch.device(device).type == "meta":
            return torch.empty(shape, device="meta")
        return _draw_blocks(seed, 0, numel, torch.float32, _normal).view(shape) if numel else torch.empty(shape)
    return torch.randn(shape, generator=generator(seed, device), device=device, dtype=torch.float32)


# Signs per random word: its 16 low bits (`random_` on int32 draws 0..2^31 - 1, so the top bit is always 0), each
# shifted into the sign bit of a float32 (see `words_to_signs`).
SIGNS_PER_WORD = 16
_SIGN_SHIFTS = [31 - i for i in range(SIGNS_PER_WORD)]
_SIGN = -(1 << 31)  # the sign bit, as an int32


def words_to_signs(words: torch.Tensor, first: int, count: int, value: float = 1.0) -> torch.Tensor:
    """+-value (float32) for `count` elements from random words, element j taking bit j % 16 of word j // 16 (set:
    the sign flipped), starting at element `first` of `words`: each bit is moved into a float32's sign bit and the
    bits of `value` laid over it, three integer passes and no arithmetic (the same numbers as +-1.0 times value)."""
    pattern = int(torch.tensor(value, dtype=torch.float32).view(torch.int32).item())
    signs = torch.bitwise_left_shift(words.view(-1, 1), _sign_shifts(words.device))  # [words, 16]
    signs.bitwise_and_(_SIGN).bitwise_xor_(pattern)
    return signs.view(-1)[first: first + count].view(torch.float32)


@functools.lru_cache(maxsize=None)
def _sign_shifts(device: torch.device) -> torch.Tensor:
    return torch.tensor(_SIGN_SHIFTS, dtype=torch.int32, device=device)


def signs(shape, seed: int, device="cpu") -> torch.Tensor:
    """Random signs +-1 (Rademacher) of the stream `seed`, shaped `shape`, drawn on `device`: one random bit per
    element, a 16th of the words a Gaussian of the same size costs."""
    numel = math.prod(shape) if isinstance(shape, (tuple, list, torch.Size)) else int(shape)
    if torch.device(device).type == "meta":
        return torch.empty(shape, device="meta")
    if not numel:
        return torch.empty(shape, device=device)
    chunks = [chunk for _, chunk in sign_chunks(numel, seed, device)]
    return (chunks[0] if len(chunks) == 1 else torch.cat(chunks)).view(shape)


def sign_chunks(numel: int, seed: int, device="cpu", words: torch.Tensor | None = None):
    """The numbers of `signs(numel, seed, device)` as (slice, values) pairs over `chunk_slices`, a chunk at a time.
    Element i takes bit i % 16 of word i // 16 of the stream, so the numbers do not depend on how the range is cut
    (on the CPU; on a GPU one generator draws the chunks in turn). `words`: the stream's words for a tensor of one
    chunk, drawn ahead by `sign_words`."""
    if words is not None:
        if numel > CHUNK_ELEMENTS:
            raise ValueError(f"words drawn ahead serve a tensor of one chunk, not {numel} elements")
        yield slice(0, numel), words_to_signs(words, 0, numel)
        return
    for part, words in _sign_word_chunks(numel, seed, device):
        yield part, words_to_signs(words, part.start % SIGNS_PER_WORD, part.stop - part.start)


def _sign_word_chunks(numel: int, seed: int, device):
    """(slice, words) over `chunk_slices(numel)`: the words holding the signs of the slice's elements, the first
    holding element `slice.start` at bit `slice.start % 16` (CHUNK_ELEMENTS is a multiple of 16, so a chunk's words
    are its own)."""
    per = SIGNS_PER_WORD
    if torch.device(device).type == "cpu":
        for part in chunk_slices(numel):
            yield part, _draw_blocks(seed, part.start // per, -(-part.stop // per), torch.int32, _words)
        return
    gen = generator(seed, device)
    for part in chunk_slices(numel):
        words = torch.empty(-(-(part.stop - part.start) // per), dtype=torch.int32, device=device)
        yield part, words.random_(generator=gen)


def tensor_sign_words(numel: int, seed: int, device="cpu") -> torch.Tensor:
    """All the words of `signs(numel, seed, device)`: element i is negative where bit i % 16 of word i // 16 is set
    (`sign_at`). A 16th of the direction's elements, for reading the signs of a few elements."""
    return torch.cat([words for _, words in _sign_word_chunks(numel, seed, device)])


def sign_at(words: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """+-1 (int16) of the elements at flat `positions` of the direction whose words are `words`."""
    bits = (words[positions // SIGNS_PER_WORD] >> (positions % SIGNS_PER_WORD).to(torch.int32)) & 1
    return (1 - 2 * bits).to(torch.int16)


def sign_words(requests: list[tuple[int, int]]) -> list[torch.Tensor]:
    """The CPU words of `signs(numel, seed)` for each (numel, seed) in `requests`, tensors of at most one chunk,
    drawn by every thread of the pool at once (`stream_words`)."""
    return stream_words([(-(-numel // SIGNS_PER_WORD), seed) for numel, seed in requests])


def stream_words(requests: list[tuple[int, int]], device="cpu") -> list[torch.Tensor]:
    """The first `count` random words (int32, 31 bits) of the stream `seed`, for each (count, seed) in `requests`.

    On the CPU, drawn by every thread of the pool at once, each thread a run of whole requests of about equal size.
    A tensor of a model like SmolLM2-135M needs less than one block of words (55,296 signs' words for a 1536 x 576
    matrix), which one core draws quickly, and handing tensors to the pool one at a time costs about as much as
    their draws (BENCHMARKS.md has the step times), so each thread takes a run of them. The same numbers at any
    thread count. On a GPU, each request's words come from one draw of its stream's generator."""
    if torch.device(device).type != "cpu":
        return [torch.empty(count, dtype=torch.int32, device=device).random_(generator=generator(seed, device))
                for count, seed in requests]
    pool = _workers()
    inference = torch.is_inference_mode_enabled()

    def draw(indices: range) -> list[torch.Tensor]:
        with torch.inference_mode(inference):
            return [_draw_blocks(requests[i][1], 0, requests[i][0], torch.int32, _words, parallel=False)
                    if requests[i][0] else torch.empty(0, dtype=torch.int32) for i in indices]

    if pool is None or len(requests) < 2:  # one request: its blocks drawn side by side
        return [_draw_blocks(seed, 0, count, torch.int32, _words) if count else torch.empty(0, dtype=torch.int32)
                for count, seed in requests]
    runs = _balanced_runs([count for count, _ in requests], _pool[1])
    return [words for run in pool.map(draw, runs) for words in run]


def _balanced_runs(sizes: list[int], parts: int) -> list[range]:
    """`parts` consecutive runs of indices into `sizes` (or fewer), each ending where the running total passes its
    share of the whole."""
    total, runs, start, done = sum(sizes), [], 0, 0
    for i, size in enumerate(sizes):
        done += size
        if done * parts >= total * (len(runs) + 1) or i == len(sizes) - 1:
            runs.append(range(start, i + 1))
            start = i + 1
    return runs


def bits_to_uniform(bits: torch.Tensor) -> torch.Tensor:
    """15 of each element's bits as (k + 1/2) / 2^15: uniform in (0, 1)."""
    return (bits & 0x7FFF).to(torch.float32).mul_(2.0**-15).add_(2.0**-16)


def uniform64(count: int, seed: int, device="cpu") -> torch.Tensor:
    """`count` uniform numbers in (0, 1) as float64 from the stream `seed` (`words_to_uniform64`)."""
    return words_to_uniform64(stream_words([(count, seed)], device)[0])


def words_to_uniform64(words: torch.Tensor) -> torch.Tensor:
    """(k + 1/2) / 2^31 for 31-bit words k, as float64: fine enough to draw events of probability down to about
    1e-9 (ftkit.optim.sparse_update), where the 15 bits of `uniform_chunks` stop at 2^-15."""
    return words.to(torch.float64).add_(0.5).mul_(2.0**-31)


def chunk_slices(numel: int, size: int = 0) -> list[slice]:
    """Consecutive ranges of `size` (default CHUNK_ELEMENTS) elements covering `numel`."""
    size = size or CHUNK_ELEMENTS
    return [slice(start, min(start + size, numel)) for start in range(0, numel, size)]


def gaussian_chunks(numel: int, seed: int, device="cpu"):
    """The numbers of `gaussian(numel, seed, device)` as (slice, values) pairs over `chunk_slices`, a chunk at a
    time."""
    if torch.device(device).type == "cpu":
        for part in chunk_slices(numel):
            yield part, _draw_blocks(seed, part.start, part.stop, torch.float32, _normal)
        return
    gen = generator(seed, device)
    for part in chunk_slices(numel):
        yield part, torch.randn(part.stop - part.start, generator=gen, device=device, dtype=torch.float32)


def uniform_chunks(numel: int, seed: int, device="cpu", size: int = 0, slices: list[slice] | None = None):
    """Uniform rounding noise for `numel` elements, as (slice, noise) pairs in chunks of `size` (default
    CHUNK_ELEMENTS) or over `slices`, so the noise of a large tensor never exists whole.

    Each element is (k + 1/2) / 2^15 in (0, 1), k from 15 random bits; each 32-bit draw feeds two elements, a
    fraction of torch.rand's cost (BENCHMARKS.md), and a stochastic rounding driven by it is unbiased to within
    2^-16 of a grid step. Element i takes half of word i // 2 of the stream, so the numbers do not depend on how
    the range is cut (on the CPU; on a GPU the chunks must be even but for the last)."""
    cuts = slices or chunk_slices(numel, size)
    if torch.device(device).type == "cpu":
        for part in cuts:
            words = _draw_blocks(seed, part.start // 2, (part.stop + 1) // 2, torch.int32, _words)
            halves = words.view(torch.int16)[part.start % 2: part.start % 2 + part.stop - part.start]
            noise = bits_to_uniform(halves)
            del words, halves  # not held while the caller uses the chunk
            yield part, noise
            del noise  # nor while the next one is drawn
        return
    if any((part.stop - part.start) % 2 for part in cuts[:-1]):
        raise ValueError("noise chunks hold whole draws of two elements: every chunk but the last must be even")
    gen = generator(seed, device)
    for part in cuts:
        count = part.stop - part.start
        words = torch.empty((count + 1) // 2, dtype=torch.int32, device=device).random_(generator=gen)
        noise = bits_to_uniform(words.view(torch.int16)[:count])
        del words
        yield part, noise
        del noise


def direction_step(low: torch.Tensor, high: torch.Tensor, bits: int) -> torch.Tensor:
    """The spacing of a direction's grid of 2^bits - 1 levels, from its smallest and largest values."""
    return torch.maximum(high, -low).clamp(min=1e-30) / (2 ** (bits - 1) - 1)


def round_onto(u: torch.Tensor, step: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """u stochastically rounded onto multiples of `step` with uniform `noise`, in place."""
    return u.div_(step).add_(noise).floor_().mul_(step)


def quantize_direction(u: torch.Tensor, bits: int, seed: int) -> torch.Tensor:
    """Q(u): u stochastically rounded onto a symmetric per-tensor grid of 2^bits - 1 levels (int4: -7..7 times
    max|u| / 7). Unbiased, E[Q(u) | u] = u, and never clipped, since the grid spans max|u|. bits = 0: u itself.

    In place on a contiguous u, a chunk of noise at a time."""
    if bits == 0:
        return u
    step = direction_step(*torch.aminmax(u), bits)  # max|u| without a full-size |u|
    flat = u.view(-1)
    for part, noise in uniform_chunks(u.numel(), seed, u.device):
        round_onto(flat[part], step, noise)
    return u
