"""Exact divergence between recorded trajectories, streamed step by step over memory maps.

Numerics. Differences that matter here are single bf16 ulps, so:

* values are upcast before subtracting: bf16/f16 -> float32 (exact), float32/float64 -> float64.
  The float32 difference of two bf16 values is exact whenever their binary exponents differ by
  at most 16 (always the case for nearby trajectories; otherwise it is correctly rounded);
* sums of squares are accumulated in float64 from the elementwise differences;
  ‖a‖² + ‖b‖² − 2⟨a, b⟩ is never used: it cancels exactly the tiny differences we look for;
* "differs" (rows_differ, first divergent step, update fractions) compares bit patterns, so
  -0.0 vs 0.0 counts as a difference and two identical NaNs do not. max_abs and frobenius are
  value-based and propagate NaN.

Memory: at most one step of every run involved (R rows of V x H) is held at a time; nothing is
O(steps) except the per-step result arrays.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence, Union

import numpy as np
import torch

from flannel_repro.artifacts import KEY_DIGESTS, KEY_LIVE_MASK, KEY_W, DIGEST_SIZE, TrajectoryReader
from flannel_repro.errors import ArtifactError

__all__ = [
    "NEVER",
    "RunLike",
    "PairDivergence",
    "PairwiseDivergence",
    "first_divergent_step",
    "pair_divergence",
    "all_pairs",
    "update_counts",
    "update_fraction",
]

RunLike = Union[TrajectoryReader, str, "os.PathLike[str]"]  # a reader, or a path to open (and close)

NEVER = -1  # first_step entry of PairwiseDivergence for a pair that never diverged

_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_SCAN_BLOCK_BYTES = 32 << 20  # bytes per run per block when scanning many steps at once


# --- helpers ------------------------------------------------------------------------------------


@contextlib.contextmanager
def _opened(runs: Sequence[RunLike]) -> Iterator[list[TrajectoryReader]]:
    """Readers for `runs`; paths are opened (and closed on exit), readers are used as given."""
    readers: list[TrajectoryReader] = []
    owned: list[TrajectoryReader] = []
    try:
        for run in runs:
            if isinstance(run, TrajectoryReader):
                readers.append(run)
            else:
                r = TrajectoryReader(run)
                owned.append(r)
                readers.append(r)
        yield readers
    finally:
        for r in owned:
            r.close()


def _name(r: TrajectoryReader) -> str:
    return r.path.name


def _w_layout(readers: Sequence[TrajectoryReader]) -> tuple[tuple[int, ...], torch.dtype]:
    """The common shape (S+1, V, H) and dtype of W; ArtifactError naming the files if they differ."""
    ref = readers[0].spec(KEY_W)
    if len(ref.shape) != 3 or not ref.dtype.is_floating_point:
        raise ArtifactError(
            f"{readers[0].path}: tensor 'W': expected a floating (S+1, V, H) tensor, got {ref.dtype} {ref.shape}."
        )
    for r in readers[1:]:
        s = r.spec(KEY_W)
        if s.shape != ref.shape or s.dtype != ref.dtype:
            raise ArtifactError(
                f"{r.path}: tensor 'W' must match {readers[0].path}: expected {ref.dtype} {ref.shape}, "
                f"got {s.dtype} {s.shape}."
            )
    return ref.shape, ref.dtype


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    # 8-bit-mantissa formats subtract exactly in float32 (for nearby values); wider ones need float64.
    return torch.float32 if dtype.itemsize <= 2 else torch.float64


def _steps(steps: Sequence[int] | None, n: int, where: str) -> np.ndarray:
    if steps is None:
        return np.arange(n, dtype=np.int64)
    arr = np.asarray(list(steps), dtype=np.int64)
    bad = arr[(arr < 0) | (arr >= n)]
    if bad.size:
        raise ArtifactError(f"{where}: expected steps in [0, {n - 1}], got {bad.tolist()}.")
    return arr


def _covers_all(steps: np.ndarray, n: int) -> bool:
    return steps.size == n and bool(np.array_equal(steps, np.arange(n)))


def _live_mask(
    readers: Sequence[TrajectoryReader], live_mask: torch.Tensor | np.ndarray | None, vocab: int
) -> torch.Tensor:
    """(V,) bool live mask: the given one, else the first run's (all runs' must then agree)."""
    if live_mask is None:
        ref = readers[0]
        mask = ref[KEY_LIVE_MASK]
        for r in readers[1:]:
            if KEY_LIVE_MASK in r and not torch.equal(r[KEY_LIVE_MASK], mask):
                raise ArtifactError(
                    f"{r.path}: 'live_mask' must equal {ref.path}'s (runs on different data?); "
                    "got a different mask — pass live_mask= explicitly to choose one."
                )
        where = f"{ref.path}: tensor 'live_mask'"
    else:
        mask = torch.as_tensor(live_mask)
        where = "live_mask argument"
    if mask.dtype != torch.bool or tuple(mask.shape) != (vocab,):
        raise ArtifactError(f"{where}: expected bool ({vocab},), got {mask.dtype} {tuple(mask.shape)}.")
    return mask.clone()


def _first_differing_row(xa: torch.Tensor, xb: torch.Tensor, start: int, stop: int) -> int | None:
    """First index in [start, stop) where the bit rows of xa and xb differ, scanning in blocks."""
    row_bytes = max(1, xa[0].numel() * xa.element_size()) if xa.shape[0] else 1
    block = max(1, _SCAN_BLOCK_BYTES // row_bytes)
    for s in range(start, stop, block):
        e = min(stop, s + block)
        a, b = xa[s:e], xb[s:e]
        if torch.equal(a, b):  # bit tensors: equality is bitwise, no NaN subtleties
            continue
        differ = (a != b).reshape(e - s, -1).any(dim=1)
        return s + int(torch.nonzero(differ)[0, 0])
    return None


# --- first divergent step -----------------------------------------------------------------------


def first_divergent_step(a: RunLike, b: RunLike, *, trust_digests: bool = False) -> int | None:
    """First step t at which W_t of the two runs differs in any bit; None if never.

    The per-step digests give the candidate at once. By default the W bytes of every step up to
    the candidate are still compared (a block-wise memcmp over the maps, cheap), so the answer is
    right even if digests were wrong; disagreement is reported with a warning. With
    ``trust_digests=True`` steps whose digests agree are taken as equal and only the candidate
    row is confirmed on the bytes.
    """
    with _opened([a, b]) as (ra, rb):
        (n, _, _), dtype = _w_layout([ra, rb])
        bits = _BITS[dtype.itemsize]
        xa, xb = ra[KEY_W].view(bits), rb[KEY_W].view(bits)

        candidate: int | None = None
        have_digests = all(
            KEY_DIGESTS in r and r.spec(KEY_DIGESTS).shape == (n, DIGEST_SIZE) for r in (ra, rb)
        )
        if have_digests:
            differ = np.flatnonzero((ra[KEY_DIGESTS].numpy() != rb[KEY_DIGESTS].numpy()).any(axis=1))
            candidate = int(differ[0]) if differ.size else None

        if have_digests and trust_digests:
            if candidate is None:
                return None
            if not torch.equal(xa[candidate], xb[candidate]):
                return candidate
            # Digests differ but the bytes do not: the digests are wrong; the bytes decide.
            _warn_digests(ra, rb, candidate, None)
            return _first_differing_row(xa, xb, candidate + 1, n)

        found = _first_differing_row(xa, xb, 0, n)
        if have_digests and found != candidate:
            _warn_digests(ra, rb, candidate, found)
        return found


def _warn_digests(ra: TrajectoryReader, rb: TrajectoryReader, by_digest: int | None, by_bytes: int | None) -> None:
    warnings.warn(
        f"{ra.path} vs {rb.path}: digests put the first difference at step {by_digest}, the W bytes at "
        f"{by_bytes}; trusting the bytes (digests recorded incorrectly?).",
        RuntimeWarning,
        stacklevel=3,
    )


# --- one pair -----------------------------------------------------------------------------------

_FIELDS = ("max_abs", "frobenius", "rows_differ", "rows_differ_live", "rows_differ_dead")


def _table(steps: Sequence[int], rows: Sequence[dict[str, Any]]) -> str:
    head = f"{'step':>6} | {'max|ΔW|':>12} | {'‖ΔW‖_F':>12} | {'rows≠':>7} | {'live≠':>7} | {'dead≠':>7}"
    lines = [head, "-" * len(head)]
    for step, r in zip(steps, rows):
        lines.append(
            f"{step:>6d} | {r['max_abs']:>12.5e} | {r['frobenius']:>12.5e} | {r['rows_differ']:>7d} | "
            f"{r['rows_differ_live']:>7d} | {r['rows_differ_dead']:>7d}"
        )
    return "\n".join(lines)


@dataclass
class PairDivergence:
    """Divergence of run b from run a, per step; arrays are aligned with ``steps`` (0..S by default).

    max_abs: max |ΔW| (float64), frobenius: ‖ΔW‖_F (float64), rows_differ: number of token rows
    with any bit different, split into live and dead tokens by the live mask.
    """

    name_a: str
    name_b: str
    path_a: Path | None
    path_b: Path | None
    steps: np.ndarray
    max_abs: np.ndarray
    frobenius: np.ndarray
    rows_differ: np.ndarray
    rows_differ_live: np.ndarray
    rows_differ_dead: np.ndarray
    first_step: int | None

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
        for f in _FIELDS:
            v = getattr(self, f)[k]
            out[f] = float(v) if f in ("max_abs", "frobenius") else int(v)
        return out

    def table(self, steps: Sequence[int] | None = None) -> str:
        """Fixed-width text table: step | max|ΔW| | ‖ΔW‖_F | rows≠ | live≠ | dead≠."""
        chosen = [int(s) for s in (self.steps if steps is None else steps)]
        return _table(chosen, [self.at(s) for s in chosen])


def _pair_step(
    wa: torch.Tensor, wb: torch.Tensor, live: torch.Tensor, work: torch.dtype, bits: torch.dtype
) -> tuple[float, float, int, int, int]:
    """Stats of one step for one pair; wa, wb are (V, H) rows in the stored dtype."""
    differ = (wa.view(bits) != wb.view(bits)).any(dim=1)  # (V,) rows with any bit different
    d = wa.to(work) - wb.to(work)  # exact (see module docstring)
    max_abs = float(d.abs().max()) if d.numel() else 0.0
    frob = math.sqrt(float(d.to(torch.float64).square().sum()))  # squares summed in float64
    live_n = int((differ & live).sum())
    total = int(differ.sum())
    return max_abs, frob, total, live_n, total - live_n


def pair_divergence(
    a: RunLike,
    b: RunLike,
    *,
    steps: Sequence[int] | None = None,
    live_mask: torch.Tensor | np.ndarray | None = None,
) -> PairDivergence:
    """Per-step divergence of two runs, streaming one step (two rows) at a time.

    ``live_mask`` defaults to run a's ``live_mask``. ``first_step`` comes from the computed
    steps when they are all of 0..S, else from :func:`first_divergent_step`.
    """
    with _opened([a, b]) as (ra, rb):
        (n, vocab, _), dtype = _w_layout([ra, rb])
        chosen = _steps(steps, n, f"{ra.path} vs {rb.path}")
        live = _live_mask([ra], live_mask, vocab)
        work, bits = _work_dtype(dtype), _BITS[dtype.itemsize]
        out = {f: np.zeros(chosen.size, dtype=np.float64 if f in ("max_abs", "frobenius") else np.int64) for f in _FIELDS}
        for k, t in enumerate(chosen):
            stats = _pair_step(ra.row(KEY_W, int(t)), rb.row(KEY_W, int(t)), live, work, bits)
            for f, v in zip(_FIELDS, stats):
                out[f][k] = v
        if _covers_all(chosen, n):
            hits = np.flatnonzero(out["rows_differ"])
            first = int(hits[0]) if hits.size else None
        else:
            first = first_divergent_step(ra, rb)
        return PairDivergence(
            name_a=_name(ra), name_b=_name(rb), path_a=ra.path, path_b=rb.path, steps=chosen, first_step=first, **out
        )


# --- all pairs ----------------------------------------------------------------------------------


@dataclass
class PairwiseDivergence:
    """Divergence of every pair (i < j) of R runs; arrays are (n_pairs, len(steps)).

    ``pairs[p] = (i, j)`` in ``itertools.combinations`` order. ``first_step[p]`` is the first
    step where W differs in any bit, or NEVER (-1).
    """

    names: list[str]
    paths: list[Path | None]
    steps: np.ndarray
    pairs: np.ndarray
    max_abs: np.ndarray
    frobenius: np.ndarray
    rows_differ: np.ndarray
    rows_differ_live: np.ndarray
    rows_differ_dead: np.ndarray
    first_step: np.ndarray

    @property
    def n_runs(self) -> int:
        return len(self.names)

    def pair_index(self, i: int, j: int) -> int:
        """Row of pair (i, j) (either order) in the arrays."""
        lo, hi = min(i, j), max(i, j)
        if lo == hi or lo < 0 or hi >= self.n_runs:
            raise ArtifactError(f"pairwise divergence: expected two distinct runs in [0, {self.n_runs}), got ({i}, {j}).")
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
            **{f: getattr(self, f)[p] for f in _FIELDS},
        )

    def matrix(self, field: str = "frobenius", step: int | None = None) -> np.ndarray:
        """(R, R) symmetric matrix of one field at one step (default: the last computed), zero diagonal."""
        if field not in _FIELDS:
            raise ArtifactError(f"pairwise divergence: expected a field among {_FIELDS}, got {field!r}.")
        k = self.steps.size - 1 if step is None else _step_index(self.steps, step)
        values = getattr(self, field)[:, k]
        m = np.zeros((self.n_runs, self.n_runs), dtype=values.dtype)
        m[self.pairs[:, 0], self.pairs[:, 1]] = values
        m[self.pairs[:, 1], self.pairs[:, 0]] = values
        return m

    def final(self) -> dict[str, np.ndarray]:
        """Every field at the last computed step, one value per pair."""
        return {f: getattr(self, f)[:, -1].copy() for f in _FIELDS}

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


def _step_index(steps: np.ndarray, step: int) -> int:
    hits = np.flatnonzero(steps == step)
    if not hits.size:
        raise ArtifactError(f"pairwise divergence: expected one of the computed steps, got {step}.")
    return int(hits[0])


def _read_step(readers: Sequence[TrajectoryReader], t: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """(R, V, H) copy of W_t of every run (into `out` if given): exactly one row read per run."""
    rows = [r.row(KEY_W, t) for r in readers]
    return torch.stack(rows) if out is None else torch.stack(rows, out=out)


def _word_dtype(row_bytes: int) -> torch.dtype:
    """Widest integer type dividing a row: comparing rows as int64 words is 4x fewer compares than
    as bf16 bit patterns, with the same answer (a row differs iff any of its bytes does)."""
    for size in (8, 4, 2):
        if row_bytes % size == 0:
            return _BITS[size]
    return torch.uint8


class _AllPairsKernel:
    """Per-step statistics of all pairs i < j of R stacked rows, with preallocated buffers.

    Work proceeds in chunks of token rows so the difference buffers stay cache-sized and
    allocation-free; per chunk and i, the differences to all j > i are one broadcast subtraction.
    """

    _CHUNK_ELEMS = 1 << 17  # elements of one run per chunk (x R-1 runs in the buffers)

    def __init__(self, R: int, vocab: int, hidden: int, dtype: torch.dtype, live: torch.Tensor) -> None:
        self.R, self.V, self.H = R, vocab, hidden
        self.work = _work_dtype(dtype)
        self.word = _word_dtype(hidden * dtype.itemsize)
        self.live = live
        self.cv = max(1, min(vocab, self._CHUNK_ELEMS // max(1, hidden)))  # token rows per chunk
        self.step = torch.empty((R, vocab, hidden), dtype=dtype)
        self.x = torch.empty((R, vocab, hidden), dtype=self.work)
        self.d = torch.empty((R - 1, self.cv, hidden), dtype=self.work)
        self.d64 = torch.empty((R - 1, self.cv, hidden), dtype=torch.float64)
        words = (hidden * dtype.itemsize) // self.word.itemsize
        self.ne = torch.empty((R - 1, self.cv, words), dtype=torch.bool)
        self.starts = [i * (2 * R - i - 1) // 2 for i in range(R)]  # first pair index of run i
        P = R * (R - 1) // 2
        self.max_abs = torch.empty(P, dtype=torch.float64)
        self.sumsq = torch.empty(P, dtype=torch.float64)
        self.rows = torch.empty(P, dtype=torch.int64)
        self.rows_live = torch.empty(P, dtype=torch.int64)

    def __call__(self, readers: Sequence[TrajectoryReader], t: int) -> tuple[np.ndarray, ...]:
        """(max_abs, frobenius, rows_differ, rows_differ_live) per pair at step t."""
        w = _read_step(readers, t, out=self.step)
        self.x.copy_(w)  # exact upcast (bf16 -> f32, f32 -> f64)
        bits = w.view(torch.uint8).view(self.word)  # (R, V, words)
        for acc in (self.max_abs, self.sumsq, self.rows, self.rows_live):
            acc.zero_()
        for v0 in range(0, self.V, self.cv):
            v1 = min(self.V, v0 + self.cv)
            n = v1 - v0
            xc, bc, live = self.x[:, v0:v1], bits[:, v0:v1], self.live[v0:v1]
            for i in range(self.R - 1):
                m, p = self.R - 1 - i, self.starts[i]  # pairs (i, i+1) .. (i, R-1)
                d = torch.sub(xc[i + 1:], xc[i], out=self.d[:m, :n])  # exact differences
                if n * self.H:
                    # max |d| = max(max d, -min d): no |d| temporary. amax/amin and
                    # torch.maximum propagate NaN, as max over |d| would.
                    big = torch.maximum(d.amax(dim=(1, 2)), d.amin(dim=(1, 2)).neg_()).to(torch.float64)
                    cur = self.max_abs[p:p + m]
                    torch.maximum(cur, big, out=cur)
                    d64 = self.d64[:m, :n]
                    d64.copy_(d)  # exact; squares of float32 differences need float64
                    self.sumsq[p:p + m] += d64.square_().sum(dim=(1, 2))
                ne = torch.ne(bc[i + 1:], bc[i], out=self.ne[:m, :n])
                differ = ne.any(dim=2)  # (m, n): token rows with any bit different
                self.rows[p:p + m] += differ.sum(dim=1)
                self.rows_live[p:p + m] += (differ & live).sum(dim=1)
        return (
            self.max_abs.numpy().copy(),
            self.sumsq.sqrt().numpy(),
            self.rows.numpy().copy(),
            self.rows_live.numpy().copy(),
        )


def _first_steps_scan(readers: Sequence[TrajectoryReader], n: int, bits: torch.dtype) -> np.ndarray:
    """First bitwise-differing step of every pair, one row read per run per step, stopping once
    every pair has diverged."""
    pairs = list(itertools.combinations(range(len(readers)), 2))
    first = np.full(len(pairs), NEVER, dtype=np.int64)
    for t in range(n):
        if (first != NEVER).all():
            break
        x = _read_step(readers, t).view(bits).reshape(len(readers), -1)
        for p, (i, j) in enumerate(pairs):
            if first[p] == NEVER and not torch.equal(x[i], x[j]):
                first[p] = t
    return first


def all_pairs(
    runs: Sequence[RunLike],
    *,
    steps: Sequence[int] | None = None,
    live_mask: torch.Tensor | np.ndarray | None = None,
) -> PairwiseDivergence:
    """Divergence of all R(R-1)/2 pairs of runs, reading each run's W_t once per step.

    Per step the R rows are stacked into one (R, V, H) tensor; for each i the differences to all
    runs j > i are formed at once by broadcasting, chunk by chunk of token rows. ``live_mask``
    defaults to the runs' shared ``live_mask`` (ArtifactError if they differ).
    """
    with _opened(runs) as readers:
        if len(readers) < 2:
            raise ArtifactError(f"all_pairs: expected at least 2 runs, got {len(readers)}.")
        (n, vocab, hidden), dtype = _w_layout(readers)
        chosen = _steps(steps, n, "all_pairs")
        live = _live_mask(readers, live_mask, vocab)
        R = len(readers)
        pairs = np.array(list(itertools.combinations(range(R), 2)), dtype=np.int64)
        P, T = pairs.shape[0], chosen.size
        max_abs = np.zeros((P, T), dtype=np.float64)
        frob = np.zeros((P, T), dtype=np.float64)
        rows = np.zeros((P, T), dtype=np.int64)
        rows_live = np.zeros((P, T), dtype=np.int64)
        kernel = _AllPairsKernel(R, vocab, hidden, dtype, live)
        for k, t in enumerate(chosen):
            max_abs[:, k], frob[:, k], rows[:, k], rows_live[:, k] = kernel(readers, int(t))
        if _covers_all(chosen, n):
            first = np.full(P, NEVER, dtype=np.int64)
            for p in range(P):
                hits = np.flatnonzero(rows[p])
                if hits.size:
                    first[p] = hits[0]
        else:
            first = _first_steps_scan(readers, n, _BITS[dtype.itemsize])
        return PairwiseDivergence(
            names=[_name(r) for r in readers],
            paths=[r.path for r in readers],
            steps=chosen,
            pairs=pairs,
            max_abs=max_abs,
            frobenius=frob,
            rows_differ=rows,
            rows_differ_live=rows_live,
            rows_differ_dead=rows - rows_live,
            first_step=first,
        )


# --- updates within one run ---------------------------------------------------------------------


def update_counts(run: RunLike) -> tuple[np.ndarray, np.ndarray]:
    """Per step t (0..S): number of W entries and of token rows whose bits changed from t-1 to t.

    Both are 0 at t = 0 (there is no previous step). Bitwise: -0.0 -> 0.0 is a change, NaN -> the
    same NaN is not.
    """
    with _opened([run]) as (r,):
        (n, vocab, hidden), dtype = _w_layout([r])
        w = r[KEY_W].view(_BITS[dtype.itemsize])
        entries = np.zeros(n, dtype=np.int64)
        rows = np.zeros(n, dtype=np.int64)
        row_bytes = max(1, vocab * hidden * dtype.itemsize)
        block = max(1, _SCAN_BLOCK_BYTES // row_bytes)
        for s in range(1, n, block):  # compare steps [s, e) with [s-1, e-1) in one go
            e = min(n, s + block)
            changed = w[s:e] != w[s - 1:e - 1]  # (e-s, V, H)
            entries[s:e] = changed.sum(dim=(1, 2)).numpy()
            rows[s:e] = changed.any(dim=2).sum(dim=1).numpy()
        return entries, rows


def update_fraction(run: RunLike) -> np.ndarray:
    """(S+1,) float64: fraction of W entries whose bits changed from step t-1 to t; NaN at t = 0."""
    with _opened([run]) as (r,):
        (_, vocab, hidden), _ = _w_layout([r])
        entries, _ = update_counts(r)
    frac = entries.astype(np.float64) / max(1, vocab * hidden)
    frac[0] = math.nan
    return frac
