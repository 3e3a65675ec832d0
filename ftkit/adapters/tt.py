"""Tensor-train (TT) linear maps, the building block of LoRETTA.

A TT layer maps `in_features -> out_features` through cores G_k of shape (r_{k-1}, n_k, r_k), r_0 = r_d = 1,
whose product, read row-major, is the (in x out) matrix W. With *aligned* shapes the first modes multiply to
`in_features` and the rest to `out_features`, so the input can be contracted core by core without building W.
*Unaligned* shapes (the paper's row-major reshapes, e.g. [16, 16, 8, 4, 4] for 4096 x 8) only define W as a
whole and run through the built matrix. The forward picks the cheaper of the two by a FLOP count.

Parameter count: sum_k r_{k-1} n_k r_k.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

# Core-by-core contraction runs as small einsums, far below one matmul's throughput on CPU (scripts/bench_adapters.py),
# so its multiply-adds are weighted by this factor when choosing.
CONTRACTION_COST = 10


def prime_factors(n: int) -> list[int]:
    factors, p = [], 2
    while p * p <= n:
        while n % p == 0:
            factors.append(p)
            n //= p
        p += 1
    return factors + ([n] if n > 1 else [])


def balanced_factors(n: int, modes: int) -> list[int]:
    """Split n into at most `modes` factors as equal as possible (largest first); primes stay whole."""
    primes = sorted(prime_factors(n), reverse=True)
    bins = [1] * min(modes, max(1, len(primes)))
    for p in primes:  # longest-processing-time: each prime to the smallest bin so far
        bins[bins.index(min(bins))] *= p
    return sorted((b for b in bins if b > 1), reverse=True) or [1]


def default_modes(n: int) -> int:
    """Modes for one side: factors of about 8 (768 -> 3 modes, 64 -> 2, 4096 -> 4)."""
    return max(1, round(math.log(n) / math.log(8)))


def auto_shape(in_features: int, out_features: int, modes: int | None = None) -> list[int]:
    return (balanced_factors(in_features, modes or default_modes(in_features))
            + balanced_factors(out_features, modes or default_modes(out_features)))


def split_point(shape: list[int], in_features: int) -> int | None:
    """Index after which the modes factor `out` (aligned), or None when no prefix multiplies to `in_features`."""
    product = 1
    for i, n in enumerate(shape):
        product *= n
        if product == in_features:
            return i + 1
        if product > in_features:
            return None
    return None


def check_shape(shape: list[int], in_features: int, out_features: int) -> None:
    if not shape or any(n < 1 for n in shape):
        raise ValueError(f"TT shape {shape} needs positive modes")
    if math.prod(shape) != in_features * out_features:
        raise ValueError(f"TT shape {shape} multiplies to {math.prod(shape)}, but a {in_features} x "
                         f"{out_features} matrix needs {in_features * out_features}")


class TTLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, rank: int, shape: list[int] | None = None,
                 bias: bool = False, init: str = "paper", zero_last_core: bool = False,
                 dtype: torch.dtype = torch.float32, device=None, modes: int | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.shape = list(shape) if shape is not None else auto_shape(in_features, out_features, modes)
        check_shape(self.shape, in_features, out_features)
        self.split = split_point(self.shape, in_features)
        self.ranks = [1] + [rank] * (len(self.shape) - 1) + [1]
        self.cores = nn.ParameterList(
            nn.Parameter(torch.empty(self.ranks[k], n, self.ranks[k + 1], dtype=dtype, device=device))
            for k, n in enumerate(self.shape)
        )
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        if not any(c.is_meta for c in self.cores):
            self.reset_parameters(init, zero_last_core)

    def reset_parameters(self, init: str = "paper", zero_last_core: bool = False) -> None:
        """Glorot-scale cores (the paper's init: the built W has entry std ~ sqrt(1/(in+out))); `zero_last_core`
        makes W exactly zero while gradients still reach that core (identity init of adapters and LoRA)."""
        target_std = math.sqrt(1.0 / (self.in_features + self.out_features))
        with torch.no_grad():
            for k, core in enumerate(self.cores):
                core.normal_(0.0, 1.0).mul_(target_std ** (1.0 / len(self.cores)) / math.sqrt(self.ranks[k + 1]))
            if zero_last_core or init == "identity":
                self.cores[-1].zero_()
            if self.bias is not None:
                if init == "paper":
                    bound = 1.0 / math.sqrt(self.out_features)
                    self.bias.uniform_(-bound, bound)
                else:
                    self.bias.zero_()

    @property
    def num_parameters(self) -> int:
        return sum(r0 * n * r1 for r0, n, r1 in zip(self.ranks, self.shape, self.ranks[1:]))

    def to_matrix(self) -> torch.Tensor:
        """The (in x out) matrix W, built from the cores."""
        full = self.cores[0].reshape(self.shape[0], self.ranks[1])
        for core in self.cores[1:]:
            full = (full @ core.reshape(core.shape[0], -1)).reshape(-1, core.shape[2])
        return full.reshape(self.in_features, self.out_features)

    def flops(self, rows: int) -> tuple[int, int]:
        """(contract, materialise) multiply-adds for `rows` inputs; contract is None-equivalent when unaligned."""
        built = sum(math.prod(self.shape[: k + 1]) * self.ranks[k] * self.ranks[k + 1] for k in range(len(self.shape)))
        materialise = built + rows * self.in_features * self.out_features
        if self.split is None:
            return math.inf, materialise
        contract, remaining = 0, self.in_features
        for k in range(self.split):
            remaining //= self.shape[k]
            contract += rows * self.ranks[k] * self.shape[k] * self.ranks[k + 1] * remaining
        out_cores = sum(self.ranks[self.split] * math.prod(self.shape[self.split : k + 1]) * self.ranks[k] * self.ranks[k + 1]
                        for k in range(self.split, len(self.shape)))
        contract += out_cores + rows * self.ranks[self.split] * self.out_features
        return contract, materialise

    def forward(self, x: torch.Tensor, mode: str = "auto") -> torch.Tensor:
        rows = x.numel() // self.in_features
        cached = self._cached_matrix()
        if mode == "auto":
            contract, materialise = self.flops(rows)
            if cached is not None:
                materialise = rows * self.in_features * self.out_features
            mode = "contract" if CONTRACTION_COST * contract < materialise else "materialise"
        flat = x.reshape(rows, self.in_features)
        if mode == "contract":
            out = self._contract(flat)
            if self.bias is not None:
                out = out + self.bias
        else:
            matrix = cached if cached is not None else self._matrix_for_forward()
            out = flat @ matrix if self.bias is None else torch.addmm(self.bias, flat, matrix)  # bias fused
        return out.reshape(*x.shape[:-1], self.out_features)

    def _cached_matrix(self) -> torch.Tensor | None:
        """Without autograd (evaluation, zeroth-order forwards) the built matrix is kept until a core changes,
        tracked by the cores' version counters."""
        if torch.is_grad_enabled() or not hasattr(self, "_matrix_cache"):
            return None
        key, matrix = self._matrix_cache
        return matrix if key == self._cache_key() else None

    def _matrix_for_forward(self) -> torch.Tensor:
        matrix = self.to_matrix()
        if not torch.is_grad_enabled():
            self._matrix_cache = (self._cache_key(), matrix)
        return matrix

    def _cache_key(self) -> tuple:
        return tuple((c._version, c.data_ptr()) for c in self.cores)

    def _contract(self, flat: torch.Tensor) -> torch.Tensor:
        if self.split is None:
            raise ValueError(f"TT shape {self.shape} is not aligned to in_features {self.in_features}")
        rows = flat.shape[0]
        state = flat.reshape(rows, 1, self.in_features)  # [rows, r_0, remaining input modes]
        for k in range(self.split):
            core = self.cores[k]
            state = state.reshape(rows, core.shape[0], core.shape[1], -1)
            state = torch.einsum("bamR,amc->bcR", state, core)
        state = state.reshape(rows, self.ranks[self.split])
        output_matrix = self.cores[self.split].reshape(self.ranks[self.split], -1)
        for core in self.cores[self.split + 1 :]:
            output_matrix = (output_matrix.reshape(-1, core.shape[0]) @ core.reshape(core.shape[0], -1))
        return state @ output_matrix.reshape(self.ranks[self.split], self.out_features)

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, shape={self.shape}, rank={self.ranks[1] if len(self.ranks) > 2 else 1}"
