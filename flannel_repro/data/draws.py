"""Seeded random draws for the generator: one independent numpy stream per (variant seed, purpose), inverse-CDF
sampling, Zipf laws and small weight tables. Part of the generator (`data.generator`).
"""

from __future__ import annotations

import bisect
import math
from typing import Sequence

import numpy as np

from flannel_repro.data.vocabulary import VariantSpec

# One independent stream per purpose, so that resizing one part leaves the others' draws unchanged.
LEXICON, RANKS, STREAM, COVERAGE, LAYOUT, TAIL_MAP, SHUFFLE = range(7)


def rng(spec: VariantSpec, purpose: int, sub: int = 0) -> np.random.Generator:
    return np.random.default_rng([spec.seed, purpose, sub])


def cdf(weights: Sequence[float] | np.ndarray) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    c = np.cumsum(w)
    return c / c[-1]


def zipf_cdf(n: int, s: float, q: float = 1.0) -> np.ndarray:
    """Cumulative Zipf-Mandelbrot law over ranks 0..n-1: p(r) proportional to (r + q) ** -s."""
    return cdf((np.arange(n, dtype=np.float64) + q) ** -s)


def sample(rng: np.random.Generator, cdf: np.ndarray, n: int) -> np.ndarray:
    """n draws of indices from a cumulative distribution (inverse-CDF on uniform doubles)."""
    idx = np.searchsorted(cdf, rng.random(n), side="right")
    return np.minimum(idx, len(cdf) - 1)


def permutation(rng: np.random.Generator, n: int) -> np.ndarray:
    return np.argsort(rng.random(n), kind="stable")


class Draws:
    """Uniform doubles served one at a time from blocks drawn in bulk (fast scalar sampling)."""

    def __init__(self, rng: np.random.Generator, block: int = 1 << 16) -> None:
        self._rng = rng
        self._block = block
        self._buf: list[float] = []
        self._pos = 0

    def u(self) -> float:
        if self._pos == len(self._buf):
            self._buf = self._rng.random(self._block).tolist()
            self._pos = 0
        self._pos += 1
        return self._buf[self._pos - 1]

    def pick(self, cdf: list[float]) -> int:
        return min(bisect.bisect_right(cdf, self.u()), len(cdf) - 1)


def table_cdf(table: dict[int, int]) -> tuple[list[int], list[float]]:
    keys = sorted(table)
    return keys, cdf([table[k] for k in keys]).tolist()


def poisson_table(lam: float, shift: int, lo: int, hi: int) -> dict[int, int]:
    """Integer weights (per million) of shift + Poisson(lam), restricted to [lo, hi]."""
    return {
        k: max(1, round(1e6 * math.exp((k - shift) * math.log(lam) - lam - math.lgamma(k - shift + 1))))
        for k in range(lo, hi + 1)
    }
