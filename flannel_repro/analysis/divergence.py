"""Exact divergence between recorded trajectories, streamed step by step with positional reads.

Numerics. Differences that matter here are single bf16 ulps, so:

* values are upcast before subtracting: bf16/f16 -> float32 (exact), float32/float64 -> float64.
  The float32 difference of two bf16 values is exact whenever their binary exponents differ by
  at most 16 (always the case for nearby trajectories; otherwise it is correctly rounded);
* sums of squares are accumulated in float64 from the elementwise differences (the square of a
  float32 difference is exact in float64); ‖a‖² + ‖b‖² − 2⟨a, b⟩ is never used: it cancels
  exactly the tiny differences we look for. The order of the float64 additions is not part of
  the contract: ``pair_divergence`` sums each step in one torch reduction (as it always did),
  ``all_pairs`` per chunk of token rows, then over chunks and worker threads, so the two agree
  to a few float64 ulps, not bitwise;
* "differs" (rows_differ, first divergent step, update fractions) compares bit patterns, so
  -0.0 vs 0.0 counts as a difference and two identical NaNs do not. max_abs and frobenius are
  value-based and propagate NaN.

Memory: rows are copied with ``TrajectoryReader.row``/``rows`` (``os.preadv``) into buffers
allocated once per call and reused for every step; the files are never mapped, so their pages
stay in the kernel page cache and not in this process's RSS. At most one step of every run
involved (R rows of V x H), a few cache-sized work buffers and the per-step result arrays are
held; nothing grows with the number of steps except those result arrays.

Threads: ``all_pairs`` splits the token rows between up to
``torch.get_num_threads()`` worker threads (each reads its own part of every step with
``reader.row(..., start=, stop=)`` and reduces it). While they work, torch runs single-threaded
(intra-op threads would add a barrier per small op); the thread count is restored afterwards.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, Union

import numpy as np
import torch

from flannel_repro.storage.layout import KEY_DIGESTS, KEY_LIVE_MASK, KEY_W
from flannel_repro.storage.stream import DIGEST_SIZE, TrajectoryReader
from flannel_repro.bits import BITS
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

_SCAN_BLOCK_BYTES = 8 << 20  # bytes per run per block (one reused buffer each) when scanning many steps
# Pair kernel: elements of all pairs' differences per chunk (float64: 4 MiB, a few L2s' worth,
# which measured best on a 2-core Zen 4 with 1 MiB L2 per core: fewer, larger torch calls win
# over strictly L2-resident ones), and the work below which one thread does everything.
_CHUNK_PAIR_ELEMS = 1 << 19
_PARALLEL_MIN_PAIR_ELEMS = 1 << 20  # pairs x V x H per step


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
        mask = ref.read(KEY_LIVE_MASK)
        for r in readers[1:]:
            if KEY_LIVE_MASK in r and not torch.equal(r.read(KEY_LIVE_MASK), mask):
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


def _word_dtype(nbytes: int) -> torch.dtype:
    """Widest integer type dividing `nbytes`: comparing rows as int64 words is 4x fewer compares
    than as bf16 bit patterns, with the same answer (a row differs iff any of its bytes does)."""
    for size in (8, 4, 2):
        if nbytes % size == 0:
            return BITS[size]
    return torch.uint8


def _as_words(t: torch.Tensor, word: torch.dtype) -> torch.Tensor:
    """Reinterpret a contiguous tensor's last axis as `word`s (its bytes must divide evenly)."""
    return t.view(torch.uint8).view(word)


def _first_differing_row(
    ra: TrajectoryReader, rb: TrajectoryReader, start: int, stop: int, shape: tuple[int, ...], dtype: torch.dtype
) -> int | None:
    """First step in [start, stop) where W of the two runs differs in any bit, reading blocks of
    steps of both runs into two buffers reused for every block."""
    row_bytes = math.prod(shape) * dtype.itemsize
    if start >= stop or not row_bytes:
        return None  # rows without bytes never differ
    block = max(1, min(stop - start, _SCAN_BLOCK_BYTES // max(1, row_bytes)))
    bufs = [torch.empty((block, *shape), dtype=dtype) for _ in range(2)]
    word = _word_dtype(row_bytes) if row_bytes else torch.uint8
    for s in range(start, stop, block):
        e = min(stop, s + block)
        a, b = (r.rows(KEY_W, s, e, out=buf[: e - s]) for r, buf in zip((ra, rb), bufs))
        a, b = a.reshape(e - s, -1), b.reshape(e - s, -1)
        a, b = _as_words(a, word), _as_words(b, word)
        if torch.equal(a, b):  # integer words: equality is bitwise, no NaN subtleties
            continue
        differ = (a != b).any(dim=1)
        return s + int(torch.nonzero(differ)[0, 0])
    return None


# --- first divergent step -----------------------------------------------------------------------


def first_divergent_step(a: RunLike, b: RunLike, *, trust_digests: bool = False) -> int | None:
    """First step t at which W_t of the two runs differs in any bit; None if never.

    The per-step digests give the candidate at once. By default the W bytes of every step up to
    the candidate are still compared (a block-wise memcmp of the rows read from both files,
    cheap), so the answer is right even if digests were wrong; disagreement is reported with a
    warning. With ``trust_digests=True`` steps whose digests agree are taken as equal and only
    the candidate row is confirmed on the bytes.
    """
    with _opened([a, b]) as (ra, rb):
        (n, vocab, hidden), dtype = _w_layout([ra, rb])
        shape = (vocab, hidden)

        candidate: int | None = None
        have_digests = all(
            KEY_DIGESTS in r and r.spec(KEY_DIGESTS).shape == (n, DIGEST_SIZE) for r in (ra, rb)
        )
        if have_digests:
            differ = np.flatnonzero((ra.read(KEY_DIGESTS).numpy() != rb.read(KEY_DIGESTS).numpy()).any(axis=1))
            candidate = int(differ[0]) if differ.size else None

        if have_digests and trust_digests:
            if candidate is None:
                return None
            if _first_differing_row(ra, rb, candidate, candidate + 1, shape, dtype) is not None:
                return candidate
            # Digests differ but the bytes do not: the digests are wrong; the bytes decide.
            _warn_digests(ra, rb, candidate, None)
            return _first_differing_row(ra, rb, candidate + 1, n, shape, dtype)

        found = _first_differing_row(ra, rb, 0, n, shape, dtype)
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

_FIELDS = ("max_abs", "frobenius", "frobenius_live", "rows_differ", "rows_differ_live", "rows_differ_dead")
_FLOAT_FIELDS = ("max_abs", "frobenius", "frobenius_live")


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

    max_abs: max |ΔW| (float64), frobenius: ‖ΔW‖_F (float64), frobenius_live: ‖ΔW‖_F over the live
    tokens' rows only (the dead rows' part is sqrt(frobenius² - frobenius_live²)), rows_differ: number
    of token rows with any bit different, split into live and dead tokens by the live mask.
    """

    name_a: str
    name_b: str
    path_a: Path | None
    path_b: Path | None
    steps: np.ndarray
    max_abs: np.ndarray
    frobenius: np.ndarray
    frobenius_live: np.ndarray
    rows_differ: np.ndarray
    rows_differ_live: np.ndarray
    rows_differ_dead: np.ndarray
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
        for f in _FIELDS:
            v = getattr(self, f)[k]
            out[f] = float(v) if f in _FLOAT_FIELDS else int(v)
        return out

    def table(self, steps: Sequence[int] | None = None) -> str:
        """Fixed-width text table: step | max|ΔW| | ‖ΔW‖_F | rows≠ | live≠ | dead≠."""
        chosen = [int(s) for s in (self.steps if steps is None else steps)]
        return _table(chosen, [self.at(s) for s in chosen])


# --- the all-pairs kernel -----------------------------------------------------------------------


class _PairKernel:
    """Per-step statistics of all pairs of R runs over the token rows [v0, v1), for one thread.

    Every buffer is allocated once and reused for every step. Pairs are laid out in "slots" that
    let one torch call form the differences of many pairs: slot (k-1)*R + r holds the pair
    (r, (r + k) mod R) for the offsets k = 1 .. (R-1)//2, and, for even R, the R/2 slots after
    those hold (r, r + R/2) for r < R/2; together every unordered pair exactly once. The step
    buffer repeats the first (R-1)//2 runs after the last, so each offset is a strided view of
    it. A slot's difference may be W_i - W_j rather than W_j - W_i: the statistics are symmetric
    (max |d|, d², bit inequality), and IEEE subtraction is exactly antisymmetric.

    Per chunk of token rows and per slot: the float32 difference of the exactly upcast rows,
    copied to float64 and squared there (exact: a float32 has 24 significant bits), then max and
    sum over the chunk; max |d| = sqrt(max d²), exact because d² is. For float32/float64 runs
    (work dtype float64) the difference is float64 and max |d| comes from its max and min. Row
    inequality compares the stored bits as integer words.
    """

    def __init__(self, R: int, v0: int, v1: int, hidden: int, dtype: torch.dtype, live: torch.Tensor) -> None:
        self.R, self.v0, self.v1, self.H = R, v0, v1, hidden
        self.dtype = dtype
        self.work = _work_dtype(dtype)
        self.exact_square = self.work == torch.float32  # d² of a float32 d is exact in float64
        self.K = (R - 1) // 2  # offsets with R slots each
        self.half = R % 2 == 0  # offset R/2: R/2 slots
        self.NF = self.K * R
        self.P = self.NF + (R // 2 if self.half else 0)  # == R(R-1)/2
        self.E = R + self.K  # runs in the step buffer: 0..R-1, then 0..K-1 again
        slots = [(r, (r + k) % R) for k in range(1, self.K + 1) for r in range(R)]
        if self.half:
            slots += [(r, r + R // 2) for r in range(R // 2)]
        slot_of = {(min(i, j), max(i, j)): s for s, (i, j) in enumerate(slots)}
        # slot of each pair, pairs in itertools.combinations order
        self.slot_order = np.array([slot_of[p] for p in itertools.combinations(range(R), 2)], dtype=np.int64)

        n = v1 - v0
        self.n = n
        row_bytes = hidden * dtype.itemsize
        self.word = _word_dtype(row_bytes) if row_bytes else torch.uint8
        self.words = row_bytes // self.word.itemsize
        self.cv = max(1, min(n, _CHUNK_PAIR_ELEMS // max(1, self.P * hidden)))  # token rows per chunk
        self.n_chunks = -(-n // self.cv) if n * hidden else 0
        cv, P, E = self.cv, self.P, self.E
        self.step = torch.empty((E, n, hidden), dtype=dtype)
        # flat work buffers: each chunk takes a contiguous prefix of the right shape
        self.x = torch.empty(E * cv * hidden, dtype=self.work)
        self.d = torch.empty(P * cv * hidden, dtype=self.work)
        self.d64 = torch.empty(P * cv * hidden, dtype=torch.float64) if self.exact_square else self.d
        self.ne = torch.empty(P * cv * self.words, dtype=torch.bool)
        self.any_words = self.words % 8 == 0 and 0 < self.words // 8 <= 4  # OR the bool bytes as int64
        self.acc = torch.empty(P * cv, dtype=torch.int64) if self.any_words else None
        self.mx = torch.empty((max(1, self.n_chunks), P), dtype=torch.float64)
        self.mn = torch.empty((max(1, self.n_chunks), P), dtype=torch.float64)
        self.ss = torch.empty((max(1, self.n_chunks), P), dtype=torch.float64)
        self.ssl = torch.empty((max(1, self.n_chunks), P), dtype=torch.float64)  # live rows only
        self.rs = torch.empty(P * self.cv, dtype=torch.float64)  # per-row sums of d² of one chunk
        self.differ = torch.empty((P, n), dtype=torch.bool)
        self.differ_live = torch.empty((P, n), dtype=torch.bool)
        self.live = live[v0:v1].clone()

    def allocate_results(self, T: int) -> None:
        P = self.P
        self.res_max = np.zeros((P, T), dtype=np.float64)
        self.res_sumsq = np.zeros((P, T), dtype=np.float64)
        self.res_sumsq_live = np.zeros((P, T), dtype=np.float64)
        self.res_rows = np.zeros((P, T), dtype=np.int64)
        self.res_live = np.zeros((P, T), dtype=np.int64)

    def _slots(self, op: Callable[..., torch.Tensor], src: torch.Tensor, out: torch.Tensor) -> None:
        """out[slot] = op(src[j], src[i]) for every slot's pair (i, j), src of shape (E, ...)."""
        R, K, NF = self.R, self.K, self.NF
        tail = tuple(src.shape[1:])
        if K:
            st = src.stride()
            # shifted[k-1, r] = src[r + k]: one strided view for all offsets at once
            shifted = src.as_strided((K, R, *tail), (st[0], *st), src.storage_offset() + st[0])
            op(shifted, src[:R], out=out[:NF].view(K, R, *tail))
        if self.half:
            h = R // 2
            op(src[h:R], src[:h], out=out[NF:])

    def run_step(self, readers: Sequence[TrajectoryReader], t: int, k: int) -> None:
        """Read W_t[v0:v1] of every run and store the step's statistics in result column k."""
        R, E, P, H, cv = self.R, self.E, self.P, self.H, self.cv
        step = self.step
        for r, reader in enumerate(readers):
            reader.row(KEY_W, t, out=step[r], start=self.v0, stop=self.v1)
        if not self.n_chunks:
            return  # no elements: every statistic is 0 (the result arrays start zeroed)
        if E > R:
            step[R:].copy_(step[: E - R])
        words = _as_words(step, self.word)  # (E, n, words)
        for c in range(self.n_chunks):
            a0 = c * cv
            a1 = min(self.n, a0 + cv)
            m = a1 - a0
            x = self.x[: E * m * H].view(E, m, H)
            x.copy_(step[:, a0:a1])  # exact upcast
            d = self.d[: P * m * H].view(P, m, H)
            self._slots(torch.sub, x, d)
            flat = d.view(P, m * H)
            if self.exact_square:
                d64 = self.d64[: P * m * H].view(P, m * H)
                d64.copy_(flat).square_()
            else:
                torch.amax(flat, dim=1, out=self.mx[c])
                torch.amin(flat, dim=1, out=self.mn[c])
                d64 = flat.square_()
            if self.exact_square:
                torch.amax(d64, dim=1, out=self.mx[c])  # max d² (NaN propagates)
            rs = self.rs[: P * m].view(P, m)
            torch.sum(d64.view(P, m, H), dim=2, out=rs)  # per token row, then over the rows
            torch.sum(rs, dim=1, out=self.ss[c])
            torch.sum(rs[:, self.live[a0:a1]], dim=1, out=self.ssl[c])
            ne = self.ne[: P * m * self.words].view(P, m, self.words)
            self._slots(torch.ne, words[:, a0:a1], ne)
            differ = self.differ[:, a0:a1]
            if self.any_words:  # the row's bool bytes as 1..4 int64: nonzero iff any word differs
                u = ne.view(torch.int64)
                acc = self.acc[: P * m].view(P, m)
                acc.copy_(u[..., 0])
                for q in range(1, u.shape[-1]):
                    acc.bitwise_or_(u[..., q])
                torch.ne(acc, 0, out=differ)
            else:
                torch.any(ne, dim=2, out=differ)
        nc = self.n_chunks
        if self.exact_square:
            max_abs = self.mx[:nc].amax(dim=0).sqrt_()  # sqrt(d²) == |d| exactly
        else:
            max_abs = torch.maximum(self.mx[:nc].amax(dim=0), self.mn[:nc].amin(dim=0).neg_())
        self.res_max[:, k] = max_abs.numpy()
        self.res_sumsq[:, k] = self.ss[:nc].sum(dim=0).numpy()
        self.res_sumsq_live[:, k] = self.ssl[:nc].sum(dim=0).numpy()
        self.res_rows[:, k] = self.differ.sum(dim=1).numpy()
        torch.logical_and(self.differ, self.live, out=self.differ_live)
        self.res_live[:, k] = self.differ_live.sum(dim=1).numpy()


def _n_workers(n_pairs: int, vocab: int, hidden: int) -> int:
    """Worker threads for a pair scan: torch's thread count (bounded by the CPUs this process may
    use and the token rows), 1 for small work where threads cost more than they save."""
    if n_pairs * vocab * hidden < _PARALLEL_MIN_PAIR_ELEMS:
        return 1
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(torch.get_num_threads(), cpus, vocab))


def _pair_scan(
    readers: Sequence[TrajectoryReader], steps: np.ndarray, live: torch.Tensor
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(max_abs, sumsq, sumsq_live, rows_differ, rows_differ_live) of every pair (combinations order) at every
    step in `steps`, each (P, len(steps)). Each run's W_t is read once per step, split between the
    worker threads by token rows."""
    (_, vocab, hidden), dtype = _w_layout(readers)
    R = len(readers)
    P = R * (R - 1) // 2
    n_workers = _n_workers(P, vocab, hidden)
    bounds = [vocab * w // n_workers for w in range(n_workers + 1)]
    kernels = [_PairKernel(R, bounds[w], bounds[w + 1], hidden, dtype, live) for w in range(n_workers)]
    for kern in kernels:
        kern.allocate_results(steps.size)
    failed = threading.Event()

    def work(kern: _PairKernel) -> None:
        try:
            for k, t in enumerate(steps.tolist()):
                if failed.is_set():
                    return
                kern.run_step(readers, int(t), k)
        except BaseException:
            failed.set()  # the other workers stop at their next step
            raise

    # Parallelism comes from the workers, each running torch single-threaded (new threads inherit
    # the setting): many small ops with intra-op threads pay a barrier per op, which stalls badly
    # whenever another process holds one of the cores.
    threads_before = torch.get_num_threads()
    if threads_before != 1:
        torch.set_num_threads(1)
    try:
        if n_workers == 1:
            work(kernels[0])
        else:
            with ThreadPoolExecutor(max_workers=n_workers - 1, thread_name_prefix="flannel-pairs") as pool:
                futures = [pool.submit(work, kern) for kern in kernels[1:]]
                try:
                    work(kernels[0])
                finally:
                    errors = [f.exception() for f in futures]  # waits for every worker
                for e in errors:
                    if e is not None:
                        raise e
    finally:
        if threads_before != 1:
            torch.set_num_threads(threads_before)

    order = kernels[0].slot_order
    max_abs = kernels[0].res_max
    sumsq = kernels[0].res_sumsq
    sumsq_live = kernels[0].res_sumsq_live
    rows = kernels[0].res_rows
    rows_live = kernels[0].res_live
    for kern in kernels[1:]:
        max_abs = np.maximum(max_abs, kern.res_max)  # propagates NaN
        sumsq = sumsq + kern.res_sumsq
        sumsq_live = sumsq_live + kern.res_sumsq_live
        rows = rows + kern.res_rows
        rows_live = rows_live + kern.res_live
    return max_abs[order], sumsq[order], sumsq_live[order], rows[order], rows_live[order]


class _PairStepper:
    """Stats of one step for one pair with buffers reused for every step. The arithmetic is
    exactly the per-pair computation this module has always done (one float64 sum over the
    whole step), so per-pair results stay bitwise what they were (at a given torch thread
    count), e.g. in stored snapshots; ``all_pairs`` sums in chunks instead (within float64 ulps)."""

    def __init__(self, vocab: int, hidden: int, dtype: torch.dtype, live: torch.Tensor) -> None:
        self.work, self.bits = _work_dtype(dtype), BITS[dtype.itemsize]
        self.live = live
        self.w = [torch.empty((vocab, hidden), dtype=dtype) for _ in range(2)]
        self.x = torch.empty((vocab, hidden), dtype=self.work)
        self.d = torch.empty((vocab, hidden), dtype=self.work)
        self.d64 = torch.empty((vocab, hidden), dtype=torch.float64)
        self.ne = torch.empty((vocab, hidden), dtype=torch.bool)

    def __call__(self, ra: TrajectoryReader, rb: TrajectoryReader, t: int) -> tuple[float, float, float, int, int, int]:
        wa, wb = (r.row(KEY_W, t, out=w) for r, w in zip((ra, rb), self.w))
        differ = torch.ne(wa.view(self.bits), wb.view(self.bits), out=self.ne).any(dim=1)  # (V,) rows
        d = self.d.copy_(wa).sub_(self.x.copy_(wb))  # upcast, then subtract: exact (module docstring)
        frob = math.sqrt(float(self.d64.copy_(d).square_().sum()))  # squares summed in float64
        frob_live = math.sqrt(float(self.d64[self.live].sum()))
        max_abs = float(d.abs_().max()) if d.numel() else 0.0
        live_n = int((differ & self.live).sum())
        total = int(differ.sum())
        return max_abs, frob, frob_live, total, live_n, total - live_n


def pair_divergence(
    a: RunLike,
    b: RunLike,
    *,
    steps: Sequence[int] | None = None,
    live_mask: torch.Tensor | np.ndarray | None = None,
) -> PairDivergence:
    """Per-step divergence of two runs, streaming one step (two rows, read into two buffers
    reused for every step) at a time.

    ``live_mask`` defaults to run a's ``live_mask``. ``first_step`` comes from the computed
    steps when they are all of 0..S, else from :func:`first_divergent_step`.
    """
    with _opened([a, b]) as (ra, rb):
        (n, vocab, hidden), dtype = _w_layout([ra, rb])
        chosen = _steps(steps, n, f"{ra.path} vs {rb.path}")
        live = _live_mask([ra], live_mask, vocab)
        stepper = _PairStepper(vocab, hidden, dtype, live)
        out = {f: np.zeros(chosen.size, dtype=np.float64 if f in _FLOAT_FIELDS else np.int64) for f in _FIELDS}
        for k, t in enumerate(chosen):
            for f, v in zip(_FIELDS, stepper(ra, rb, int(t))):
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
    frobenius_live: np.ndarray
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


def _first_steps_scan(readers: Sequence[TrajectoryReader], n: int, dtype: torch.dtype) -> np.ndarray:
    """First bitwise-differing step of every pair, one row read per run per step (into one buffer
    reused for every step), stopping once every pair has diverged."""
    pairs = list(itertools.combinations(range(len(readers)), 2))
    first = np.full(len(pairs), NEVER, dtype=np.int64)
    shape = readers[0].spec(KEY_W).shape[1:]
    row_bytes = math.prod(shape) * dtype.itemsize
    if not row_bytes:
        return first  # rows without bytes never differ
    buf = torch.empty((len(readers), *shape), dtype=dtype)
    x = _as_words(buf.view(len(readers), -1), _word_dtype(row_bytes))
    for t in range(n):
        if (first != NEVER).all():
            break
        for r, reader in enumerate(readers):
            reader.row(KEY_W, t, out=buf[r])
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

    Per step the R rows are read into one preallocated buffer; chunk by chunk of token rows the
    differences of all pairs are formed in a few broadcast subtractions (see ``_PairKernel``).
    The token rows are split between worker threads (see the module docstring). ``live_mask``
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
        P = pairs.shape[0]
        max_abs, sumsq, sumsq_live, rows, rows_live = _pair_scan(readers, chosen, live)
        frob = np.sqrt(sumsq)
        if _covers_all(chosen, n):
            first = np.full(P, NEVER, dtype=np.int64)
            for p in range(P):
                hits = np.flatnonzero(rows[p])
                if hits.size:
                    first[p] = hits[0]
        else:
            first = _first_steps_scan(readers, n, dtype)
        return PairwiseDivergence(
            names=[_name(r) for r in readers],
            paths=[r.path for r in readers],
            steps=chosen,
            pairs=pairs,
            max_abs=max_abs,
            frobenius=frob,
            frobenius_live=np.sqrt(sumsq_live),
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
        bits = BITS[dtype.itemsize]
        entries = np.zeros(n, dtype=np.int64)
        rows = np.zeros(n, dtype=np.int64)
        if n < 2:
            return entries, rows
        row_bytes = max(1, vocab * hidden * dtype.itemsize)
        block = max(1, min(n - 1, _SCAN_BLOCK_BYTES // row_bytes))
        # buf[0] holds the step before the block, buf[1:b+1] the block: each step is read once.
        buf = torch.empty((block + 1, vocab, hidden), dtype=dtype)
        changed = torch.empty((block, vocab, hidden), dtype=torch.bool)
        prev = 0  # index in buf of the last step read
        for s in range(1, n, block):  # compare steps [s, e) with [s-1, e-1) in one go
            e = min(n, s + block)
            b = e - s
            if s == 1:
                r.rows(KEY_W, 0, e, out=buf[: b + 1])
            else:
                buf[0].copy_(buf[prev])
                r.rows(KEY_W, s, e, out=buf[1 : b + 1])
            prev = b
            w = buf[: b + 1].view(bits)
            ch = torch.ne(w[1:], w[:-1], out=changed[:b])
            flat = ch.view(b, -1)
            for i in range(b):  # count_nonzero of a whole step: no int64 copy of the bool block
                entries[s + i] = int(torch.count_nonzero(flat[i]))
            rows[s:e] = ch.any(dim=2).sum(dim=1).numpy()
        return entries, rows


def update_fraction(run: RunLike) -> np.ndarray:
    """(S+1,) float64: fraction of W entries whose bits changed from step t-1 to t; NaN at t = 0."""
    with _opened([run]) as (r,):
        (_, vocab, hidden), _ = _w_layout([r])
        entries, _ = update_counts(r)
    frac = entries.astype(np.float64) / max(1, vocab * hidden)
    frac[0] = math.nan
    return frac
