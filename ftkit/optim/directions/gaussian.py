"""Gaussian directions, u ~ N(0, I): MeZO's and QuZO's (ftkit.optim.zo_streams draws them block by block)."""

from __future__ import annotations

from ftkit.optim.directions import DirectionKind
from ftkit.optim.zo_streams import gaussian, gaussian_chunks


class Gaussian(DirectionKind):
    name = "gaussian"

    def draw(self, shape, seed: int, device="cpu"):
        return gaussian(shape, seed, device)

    def chunks(self, numel: int, seed: int, device="cpu", held=None):
        return gaussian_chunks(numel, seed, device)


GAUSSIAN = Gaussian()
