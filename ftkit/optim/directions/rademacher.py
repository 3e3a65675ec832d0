"""Random-sign directions, u = +-1 per element (SPSA's): one random bit per element instead of a Gaussian, several
times cheaper to draw, and already on every symmetric rounding grid (QuZO draws no rounding for them).

What the kind keeps through a step (`SignStep`):
- the words of full-precision tensors of one chunk or less on the CPU are drawn ahead of a pass, a window of
  AHEAD_ELEMENTS at a time by every thread at once (`sign_words`): a tensor of a small model needs less than a
  block of words, and drawing tensors one by one costs as much as the draws;
- a query applies its direction three times (to +eps, to -eps, back with the update): the words drawn for the first
  are kept for the other two, within KEEP_BYTES; a low-bit layer's words are drawn by the first forward that needs
  them and kept the same way;
- the update of integer codes with one query and no decay is drawn as the few codes it moves
  (ftkit.optim.sparse_update), all the step's layers together.
The same numbers in every case: only when and how often they are drawn differs.
"""

from __future__ import annotations

import torch

from ftkit.optim import sparse_update, zo_streams
from ftkit.optim.directions import DirectionKind, StepDraws
from ftkit.optim.zo_streams import U, derive, sign_chunks, sign_words, signs, tensor_sign_words, words_to_signs

# Full-precision targets whose sign words are drawn together, ahead of their pass: windows of about this many
# elements (their words: 4 MiB, and at most one tensor more).
AHEAD_ELEMENTS = 1 << 24
# The sign words drawn for a query's first pass are kept for its other two up to this many bytes: a 16th of the fp32
# weights they drive (SmolLM2-135M: 26.5 MB), so they cost memory only up to this bound, and the steps of larger
# models redraw the rest.
KEEP_BYTES = 64 << 20


class RandomSigns(DirectionKind):
    name = "rademacher"
    on_grid = True

    def draw(self, shape, seed: int, device="cpu"):
        return signs(shape, seed, device)

    def chunks(self, numel: int, seed: int, device="cpu", held=None):
        return sign_chunks(numel, seed, device, held)

    def begin_step(self, run_seed: int = 0, step: int = 0) -> SignStep:
        return SignStep()


RADEMACHER = RandomSigns()


class KeptWords(dict):
    """The sign words of one step's directions, by (query seed, target index), within KEEP_BYTES."""

    def __init__(self):
        super().__init__()
        self.nbytes = 0

    def offer(self, key: tuple[int, int], words: torch.Tensor) -> None:
        if self.nbytes + words.nbytes <= KEEP_BYTES:
            self[key] = words
            self.nbytes += words.nbytes


class SignStep(StepDraws):
    def __init__(self):
        self.kept = KeptWords()
        self.current = None  # (key, words) of the target a pass has reached: kept ones or drawn ahead

    def held(self, query_seed: int, index: int):
        key = (query_seed, index)
        return self.current[1] if self.current is not None and self.current[0] == key else self.kept.get(key)

    def pass_over(self, targets: list, query_seed: int):
        """The targets in order; the words of the full-precision ones of one chunk or less on the CPU drawn ahead,
        a window of AHEAD_ELEMENTS at a time, or taken from the kept ones (and offered to them when drawn)."""
        def ahead(target) -> bool:
            one_chunk = target.numel <= zo_streams.CHUNK_ELEMENTS  # read at each call: tests shrink it
            return not target.low_bit and one_chunk and target.device.type == "cpu"

        kept, start = self.kept, 0
        while start < len(targets):
            window, size, stop = [], 0, start
            while stop < len(targets) and size < AHEAD_ELEMENTS:
                if ahead(targets[stop]) and (query_seed, targets[stop].index) not in kept:
                    window.append(targets[stop])
                    size += targets[stop].numel
                stop += 1
            drawn = sign_words([(t.numel, derive(query_seed, t.index, U)) for t in window])
            fresh = {t.index: w for t, w in zip(window, drawn)}
            del drawn
            for target in targets[start:stop]:
                key = (query_seed, target.index)
                words = kept.get(key)
                if words is None and target.index in fresh:
                    words = fresh.pop(target.index)  # each window's words freed as they are used, unless kept
                    kept.offer(key, words)
                self.current = (key, words)
                yield target
                self.current = words = None
            start = stop

    def perturbation(self, target, query_seed: int, to: float):
        """+-to from the layer's words, drawn by the first forward that needs them and kept (within the bound)."""
        return lambda layer: words_to_signs(self.layer_words(target, query_seed), 0, target.numel, to).view(
            target.shape)

    def layer_words(self, target, query_seed: int) -> torch.Tensor:
        key = (query_seed, target.index)
        words = self.kept.get(key)
        if words is None:
            words = tensor_sign_words(target.numel, derive(query_seed, target.index, U), target.device)
            self.kept.offer(key, words)
        return words

    def update_together(self, targets: list, directions, step_seed: int, query_seeds: list[int], coefs: list[float],
                        decay: float) -> list:
        """Update together the low-bit targets whose update is drawn as its moves (ftkit.optim.sparse_update), with
        the words the step's forwards kept, and return the others."""
        sparse = [t for t in targets if t.low_bit
                  and sparse_update.applies(t.layer, directions.update_rounding, coefs, decay)]
        for target in sparse:
            target.layer.perturbation = None
        if sparse:
            words = [self.kept.get((query_seeds[0], t.index)) for t in sparse]
            sparse_update.update([(t.layer, t.index) for t in sparse], directions.update_rounding, step_seed,
                                 query_seeds[0], coefs[0], words)
        chosen = {id(t) for t in sparse}
        return [t for t in targets if id(t) not in chosen]
