"""Divergence between recorded runs, step by step: one pair (`pair_divergence`) or all pairs of R
runs (`all_pairs`), and the result types that hold it.

Both compute with the one kernel, `pair_kernel.scan_pairs` (its docstring has the numerics, memory
and threads): a pair's statistics are bitwise the same whether it is computed alone or among other
runs, and at any thread count. The statistics are declared once, in `pair_kernel.StepStats`, which
both result types extend. First divergent steps come from the same scan when it covered every step,
else from the bitwise scans in `bitwise`.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from flannel_repro.analysis.bitwise import NEVER, first_divergent_step, first_divergent_steps
from flannel_repro.analysis.pair_kernel import FLOAT_FIELDS, STAT_FIELDS, StepStats, scan_pairs
from flannel_repro.analysis.readers import (
    ReaderOrPath,
    chosen_steps,
    covers_all,
    opened,
    read_live_mask,
    run_name,
    w_layout,
)
from flannel_repro.errors import ArtifactError

__all__ = [
    "NEVER",
    "PairDivergence",
    "PairwiseDivergence",
    "live_share",
    "pair_divergence",
    "all_pairs",
]


def _table(steps: Sequence[int], rows: Sequence[dict[str, Any]]) -> str:
    head = f"{'step':>6} | {'max|ΔW|':>12} | {'‖ΔW‖_F':>12} | {'rows≠':>7} | {'live≠':>7} | {'dead≠':>7}"
    lines = [head, "-" * len(head)]
    for step, r in zip(steps, rows):
        lines.append(
            f"{step:>6d} | {r['max_abs']:>12.5e} | {r['frobenius']:>12.5e} | {r['rows_differ']:>7d} | "
            f"{r['rows_differ_live']:>7d} | {r['rows_differ_dead']:>7d}"
        )
    return "\n".join(lines)


@dataclass(kw_only=True)
class PairDivergence(StepStats):
    """Divergence of run b from run a, per step; arrays (the `StepStats` fields) are aligned with
    ``steps`` (0..S by default). ``first_step``: the first step where W differs in any bit, or None."""

    name_a: str
    name_b: str
    path_a: Path | None
    path_b: Path | None
    first_step: int | None

    def live_share(self) -> np.ndarray:
        """Per step, the live tokens' share of ‖ΔW‖²_F (NaN where the runs agree)."""
        return live_share(self.frobenius, self.frobenius_live)

    def _index(self, step: int) -> int:
        hits = np.flatnonzero(self.steps == step)
        if not hits.size:
            raise ArtifactError(
                f"{self.name_a} vs {self.name_b}: expected one of the computed steps "
                f"({self.steps.min() if self.steps.size else '-'}..{self.steps.max() if self.steps.size else '-'}, "
                f"{self.steps.size} steps), got {step}."
            )
        return int(hits[0])

    def at(self, step: int) -> dict[str, Any]:
        """The scalars at one step: step, max_abs, frobenius, rows_differ, rows_differ_live/dead."""
        k = self._index(step)
        out: dict[str, Any] = {"step": int(step)}
        for f, v in self.stats(k).items():
            out[f] = float(v) if f in FLOAT_FIELDS else int(v)
        return out

    def table(self, steps: Sequence[int] | None = None) -> str:
        """Fixed-width text table: step | max|ΔW| | ‖ΔW‖_F | rows≠ | live≠ | dead≠."""
        chosen = [int(s) for s in (self.steps if steps is None else steps)]
        return _table(chosen, [self.at(s) for s in chosen])


def pair_divergence(
    a: ReaderOrPath,
    b: ReaderOrPath,
    *,
    steps: Sequence[int] | None = None,
    live_mask: torch.Tensor | np.ndarray | None = None,
) -> PairDivergence:
    """Per-step divergence of two runs, streaming one step (two rows, read into buffers reused for
    every step) at a time.

    ``live_mask`` defaults to run a's ``live_mask``. ``first_step`` comes from the computed
    steps when they are all of 0..S, else from :func:`first_divergent_step`.
    """
    with opened([a, b]) as (ra, rb):
        (n, vocab, _), _ = w_layout([ra, rb])
        chosen = chosen_steps(steps, n, f"{ra.path} vs {rb.path}")
        live = read_live_mask([ra], live_mask, vocab)
        stats = scan_pairs([ra, rb], chosen, live)
        if covers_all(chosen, n):
            hits = np.flatnonzero(stats.rows_differ[0])
            first = int(hits[0]) if hits.size else None
        else:
            first = first_divergent_step(ra, rb)
        return PairDivergence(
            name_a=run_name(ra),
            name_b=run_name(rb),
            path_a=ra.path,
            path_b=rb.path,
            steps=chosen,
            first_step=first,
            **stats.stats(0),
        )


@dataclass(kw_only=True)
class PairwiseDivergence(StepStats):
    """Divergence of every pair (i < j) of R runs; the `StepStats` arrays are (n_pairs, len(steps)).

    ``pairs[p] = (i, j)`` in ``itertools.combinations`` order. ``first_step[p]`` is the first
    step where W differs in any bit, or NEVER (-1).
    """

    names: list[str]
    paths: list[Path | None]
    pairs: np.ndarray
    first_step: np.ndarray

    @property
    def n_runs(self) -> int:
        return len(self.names)

    def pair_index(self, i: int, j: int) -> int:
        """Row of pair (i, j) (either order) in the arrays."""
        lo, hi = min(i, j), max(i, j)
        if lo == hi or lo < 0 or hi >= self.n_runs:
            raise ArtifactError(
                f"pairwise divergence: expected two distinct runs in [0, {self.n_runs}), got ({i}, {j})."
            )
        # combinations order: pairs starting with 0 first, then 1, ...
        return lo * (2 * self.n_runs - lo - 1) // 2 + (hi - lo - 1)

    def pair(self, i: int, j: int) -> PairDivergence:
        """The divergence of one pair as a PairDivergence (a = run i, b = run j)."""
        p = self.pair_index(i, j)
        first = int(self.first_step[p])
        return PairDivergence(
            name_a=self.names[i],
            name_b=self.names[j],
            path_a=self.paths[i],
            path_b=self.paths[j],
            steps=self.steps,
            first_step=None if first == NEVER else first,
            **self.stats(p),
        )

    def matrix(self, field: str = "frobenius", step: int | None = None) -> np.ndarray:
        """(R, R) symmetric matrix of one field at one step (default: the last computed), zero diagonal."""
        if field not in STAT_FIELDS:
            raise ArtifactError(f"pairwise divergence: expected a field among {STAT_FIELDS}, got {field!r}.")
        k = self.steps.size - 1 if step is None else _step_index(self.steps, step)
        values = getattr(self, field)[:, k]
        m = np.zeros((self.n_runs, self.n_runs), dtype=values.dtype)
        m[self.pairs[:, 0], self.pairs[:, 1]] = values
        m[self.pairs[:, 1], self.pairs[:, 0]] = values
        return m

    def final(self) -> dict[str, np.ndarray]:
        """Every field at the last computed step, one value per pair."""
        return {f: v.copy() for f, v in self.stats((slice(None), -1)).items()}

    def summary(self) -> dict[str, Any]:
        """Min/median/max over pairs of the final max_abs and Frobenius norm, and of the first
        divergent step (over pairs that diverged), plus how many pairs never diverged."""
        fin = self.final()
        out: dict[str, Any] = {"n_runs": self.n_runs, "n_pairs": int(self.pairs.shape[0])}
        out["final_step"] = int(self.steps[-1]) if self.steps.size else None
        for f in ("frobenius", "max_abs"):
            v = fin[f]
            out[f"final_{f}_min"] = float(np.min(v)) if v.size else math.nan
            out[f"final_{f}_median"] = float(np.median(v)) if v.size else math.nan
            out[f"final_{f}_max"] = float(np.max(v)) if v.size else math.nan
        diverged = self.first_step[self.first_step != NEVER]
        out["pairs_identical"] = int(self.first_step.size - diverged.size)
        out["first_step_min"] = int(diverged.min()) if diverged.size else None
        out["first_step_median"] = float(np.median(diverged)) if diverged.size else None
        out["first_step_max"] = int(diverged.max()) if diverged.size else None
        return out


def live_share(frobenius: np.ndarray, frobenius_live: np.ndarray) -> np.ndarray:
    """Per step, the live tokens' share of ‖ΔW‖²_F from the two norms (NaN where the runs agree)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.square(frobenius_live) / np.square(frobenius)
    return np.where(frobenius > 0, share, np.nan)


def _step_index(steps: np.ndarray, step: int) -> int:
    hits = np.flatnonzero(steps == step)
    if not hits.size:
        raise ArtifactError(f"pairwise divergence: expected one of the computed steps, got {step}.")
    return int(hits[0])


def all_pairs(
    runs: Sequence[ReaderOrPath],
    *,
    steps: Sequence[int] | None = None,
    live_mask: torch.Tensor | np.ndarray | None = None,
) -> PairwiseDivergence:
    """Divergence of all R(R-1)/2 pairs of runs, reading each run's W_t once per step.

    ``live_mask`` defaults to the runs' shared ``live_mask`` (ArtifactError if they differ).
    """
    with opened(runs) as readers:
        if len(readers) < 2:
            raise ArtifactError(f"all_pairs: expected at least 2 runs, got {len(readers)}.")
        (n, vocab, _), _ = w_layout(readers)
        chosen = chosen_steps(steps, n, "all_pairs")
        live = read_live_mask(readers, live_mask, vocab)
        pairs = np.array(list(itertools.combinations(range(len(readers)), 2)), dtype=np.int64)
        stats = scan_pairs(readers, chosen, live)
        if covers_all(chosen, n):
            first = np.full(pairs.shape[0], NEVER, dtype=np.int64)
            for p in range(pairs.shape[0]):
                hits = np.flatnonzero(stats.rows_differ[p])
                if hits.size:
                    first[p] = hits[0]
        else:
            first = first_divergent_steps(readers)
        return PairwiseDivergence(
            names=[run_name(r) for r in readers],
            paths=[r.path for r in readers],
            steps=chosen,
            pairs=pairs,
            first_step=first,
            **stats.stats(),
        )
