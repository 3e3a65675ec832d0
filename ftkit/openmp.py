"""OpenMP settings, made before torch loads its OpenMP runtime (this module imports no torch)."""

from __future__ import annotations

import os

# After each parallel op torch's OpenMP threads spin-wait for the next one (libgomp's default spin count is
# 300,000), holding their cores. A zeroth-order step draws random numbers on every core between the forward's ops,
# and spinning threads take those cores from the drawing threads. A short spin keeps the forwards as fast and gives
# the cores back (measured in BENCHMARKS.md, "Zeroth-order step cost on SmolLM2-135M").
SPINCOUNT = "10000"


def shorten_openmp_spin() -> None:
    """Set GOMP_SPINCOUNT unless it is set already. OpenMP reads it when torch is first imported: the `ftkit`
    command calls this before that; a program using ftkit as a library does the same, or sets the variable."""
    os.environ.setdefault("GOMP_SPINCOUNT", SPINCOUNT)
