"""The divergence kernel: per-step statistics of every pair of R runs, and their one declaration.

`StepStats` declares the statistics (max |ΔW|, ‖ΔW‖_F, ‖ΔW‖_F over live rows, rows differing: all,
live, dead) once; `scan_pairs` computes them for every pair of R >= 2 runs at the chosen steps,
reading each run's W_t once per step. One pair is R = 2: there is no other kernel.

Numerics. Differences that matter here are single bf16 ulps, so:

* values are upcast before subtracting: bf16/f16 -> float32 (exact), float32/float64 -> float64.
  The float32 difference of two bf16 values is exact whenever their binary exponents differ by
  at most 16 (always the case for nearby trajectories; otherwise it is correctly rounded);
* sums of squares are accumulated in float64 from the elementwise differences (the square of a
  float32 difference is exact in float64); ‖a‖² + ‖b‖² − 2⟨a, b⟩ is never used: it cancels
  exactly the tiny differences we look for;
* the order of the float64 additions is fixed by the data alone: one torch sum per token row
  (over H), then one torch sum over the V row sums (over the live rows' sums, for the live
  norm). It does not depend on R, on the chunk size or on the thread count, so a pair's numbers
  are bitwise the same computed alone or among any other runs;
* "differs" (rows_differ) compares bit patterns, so -0.0 vs 0.0 counts as a difference and two
  identical NaNs do not. max_abs and frobenius are value-based and propagate NaN.

Memory: rows are copied with ``ArtifactReader.row`` (``os.preadv``) into buffers allocated once
per call and reused for every step; the files are never mapped, so their pages stay in the kernel
page cache and not in this process's RSS. Per worker thread one step of every run (R rows of
V x H), a few cache-sized work buffers and (pairs x V) row sums are held; nothing grows with the
number of steps except the result arrays.

Threads: the steps are shared out between up to ``torch.get_num_threads()`` worker threads (each
takes the next step not yet taken and computes it whole). While they work, torch runs
single-threaded (intra-op threads would add a barrier per small op, which stalls badly whenever
another process holds one of the cores); the thread count is restored afterwards.
"""

from __future__ import annotations

import itertools
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Sequence

import numpy as np
import torch

from flannel_repro.analysis.readers import as_words, w_layout, word_dtype
from flannel_repro.storage.layout import KEY_W
from flannel_repro.storage.reader import ArtifactReader

__all__ = ["StepStats", "STAT_FIELDS", "FLOAT_FIELDS", "scan_pairs"]

# Elements of all pairs' differences per chunk of token rows (float64: 4 MiB, a few L2s' worth,
# which measured best on a 2-core Zen 4 with 1 MiB L2 per core: fewer, larger torch calls win over
# strictly L2-resident ones), and the work below which one thread does everything. The chunk size
# changes no result (see the module docstring).
_CHUNK_PAIR_ELEMS = 1 << 19
_PARALLEL_MIN_PAIR_ELEMS = 1 << 20  # pairs x V x H per step


def _stat(dtype: type, doc: str) -> Any:
    return field(metadata={"dtype": dtype, "doc": doc})


@dataclass(kw_only=True)
class StepStats:
    """Divergence statistics per computed step, aligned with ``steps``: arrays of shape (len(steps),)
    for one pair, (n_pairs, len(steps)) for many.

    The dead rows' part of ‖ΔW‖²_F is frobenius² - frobenius_live².
    """

    steps: np.ndarray
    max_abs: np.ndarray = _stat(np.float64, "max |ΔW|")
    frobenius: np.ndarray = _stat(np.float64, "‖ΔW‖_F")
    frobenius_live: np.ndarray = _stat(np.float64, "‖ΔW‖_F over the live tokens' rows")
    rows_differ: np.ndarray = _stat(np.int64, "token rows with any bit different")
    rows_differ_live: np.ndarray = _stat(np.int64, "of those, live tokens' rows")
    rows_differ_dead: np.ndarray = _stat(np.int64, "of those, dead tokens' rows")

    def stats(self, index: Any = Ellipsis) -> dict[str, np.ndarray]:
        """The statistics' arrays by name (``index`` selects from each, e.g. one pair's row)."""
        return {f: getattr(self, f)[index] for f in STAT_FIELDS}


STAT_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(StepStats) if "dtype" in f.metadata)
FLOAT_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(StepStats) if f.metadata.get("dtype") is np.float64)
_DTYPES = {f.name: f.metadata["dtype"] for f in fields(StepStats) if "dtype" in f.metadata}


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    # 8-bit-mantissa formats subtract exactly in float32 (for nearby values); wider ones need float64.
    return torch.float32 if dtype.itemsize <= 2 else torch.float64


class _PairKernel:
    """Per-step statistics of all pairs of R runs, for one worker thread.

    Every buffer is allocated once and reused for every step. Pairs are laid out in "slots" that
    let one torch call form the differences of many pairs: slot (k-1)*R + r holds the pair
    (r, (r + k) mod R) for the offsets k = 1 .. (R-1)//2, and, for even R, the R/2 slots after
    those hold (r, r + R/2) for r < R/2; together every unordered pair exactly once. The step
    buffer repeats the first (R-1)//2 runs after the last, so each offset is a strided view of
    it. A slot's difference may be W_i - W_j rather than W_j - W_i: the statistics are symmetric
    (max |d|, d², bit inequality), and IEEE subtraction is exactly antisymmetric.

    Per chunk of token rows and per slot: the float32 difference of the exactly upcast rows,
    copied to float64 and squared there (exact: a float32 has 24 significant bits), its max and
    its sum per token row; max |d| = sqrt(max d²), exact because d² is. For float32/float64 runs
    (work dtype float64) the difference is float64 and max |d| comes from its max and min. Row
    inequality compares the stored bits as integer words. After the last chunk, the row sums are
    summed over all rows (and over the live rows) per slot.
    """

    def __init__(self, R: int, vocab: int, hidden: int, dtype: torch.dtype, live: torch.Tensor) -> None:
        self.R, self.V, self.H = R, vocab, hidden
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

        row_bytes = hidden * dtype.itemsize
        self.word = word_dtype(row_bytes) if row_bytes else torch.uint8
        self.words = row_bytes // self.word.itemsize
        self.cv = max(1, min(vocab, _CHUNK_PAIR_ELEMS // max(1, self.P * hidden)))  # token rows per chunk
        self.n_chunks = -(-vocab // self.cv) if vocab * hidden else 0
        cv, P, E = self.cv, self.P, self.E
        self.step = torch.empty((E, vocab, hidden), dtype=dtype)
        # flat work buffers: each chunk takes a contiguous prefix of the right shape
        self.x = torch.empty(E * cv * hidden, dtype=self.work)
        self.d = torch.empty(P * cv * hidden, dtype=self.work)
        self.d64 = torch.empty(P * cv * hidden, dtype=torch.float64) if self.exact_square else self.d
        self.ne = torch.empty(P * cv * self.words, dtype=torch.bool)
        self.any_words = self.words % 8 == 0 and 0 < self.words // 8 <= 4  # OR the bool bytes as int64
        self.acc = torch.empty(P * cv, dtype=torch.int64) if self.any_words else None
        self.mx = torch.empty((max(1, self.n_chunks), P), dtype=torch.float64)
        self.mn = torch.empty((max(1, self.n_chunks), P), dtype=torch.float64)
        self.rowsum = torch.empty((P, vocab), dtype=torch.float64)  # per token row: sum of d² over H
        self.live_rows = torch.nonzero(live).reshape(-1)
        self.rowsum_live = torch.empty((P, self.live_rows.numel()), dtype=torch.float64)
        self.sumsq = torch.empty(P, dtype=torch.float64)
        self.sumsq_live = torch.empty(P, dtype=torch.float64)
        self.differ = torch.empty((P, vocab), dtype=torch.bool)
        self.differ_live = torch.empty((P, vocab), dtype=torch.bool)
        self.live = live.clone()

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

    def run_step(self, readers: Sequence[ArtifactReader], t: int, k: int, out: dict[str, np.ndarray]) -> None:
        """Read W_t of every run and store the step's statistics in column k of `out`."""
        R, E, P, H, cv = self.R, self.E, self.P, self.H, self.cv
        step = self.step
        for r, reader in enumerate(readers):
            reader.row(KEY_W, t, out=step[r])
        if not self.n_chunks:
            return  # no elements: every statistic is 0 (the result arrays start zeroed)
        if E > R:
            step[R:].copy_(step[: E - R])
        words = as_words(step, self.word)  # (E, V, words)
        for c in range(self.n_chunks):
            a0 = c * cv
            a1 = min(self.V, a0 + cv)
            m = a1 - a0
            x = self.x[: E * m * H].view(E, m, H)
            x.copy_(step[:, a0:a1])  # exact upcast
            d = self.d[: P * m * H].view(P, m, H)
            self._slots(torch.sub, x, d)
            flat = d.view(P, m * H)
            if self.exact_square:
                d64 = self.d64[: P * m * H].view(P, m * H)
                d64.copy_(flat).square_()
                torch.amax(d64, dim=1, out=self.mx[c])  # max d² (NaN propagates)
            else:
                torch.amax(flat, dim=1, out=self.mx[c])
                torch.amin(flat, dim=1, out=self.mn[c])
                d64 = flat.square_()
            torch.sum(d64.view(P, m, H), dim=2, out=self.rowsum[:, a0:a1])  # one sum per token row
            ne = self.ne[: P * m * self.words].view(P, m, self.words)
            self._slots(torch.ne, words[:, a0:a1], ne)
            differ = self.differ[:, a0:a1]
            if self.any_words:  # the row's bool bytes as 1..4 int64: nonzero iff any word differs
                u = ne.view(torch.int64)
                assert self.acc is not None  # allocated exactly when any_words
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
        torch.sum(self.rowsum, dim=1, out=self.sumsq)  # over all V row sums: the order is the data's
        torch.index_select(self.rowsum, 1, self.live_rows, out=self.rowsum_live)
        torch.sum(self.rowsum_live, dim=1, out=self.sumsq_live)
        torch.logical_and(self.differ, self.live, out=self.differ_live)
        rows = self.differ.sum(dim=1).numpy()
        rows_live = self.differ_live.sum(dim=1).numpy()
        order = self.slot_order
        out["max_abs"][:, k] = max_abs.numpy()[order]
        out["frobenius"][:, k] = np.sqrt(self.sumsq.numpy()[order])
        out["frobenius_live"][:, k] = np.sqrt(self.sumsq_live.numpy()[order])
        out["rows_differ"][:, k] = rows[order]
        out["rows_differ_live"][:, k] = rows_live[order]
        out["rows_differ_dead"][:, k] = (rows - rows_live)[order]


def _n_workers(n_pairs: int, vocab: int, hidden: int, n_steps: int) -> int:
    """Worker threads for a pair scan: torch's thread count (bounded by the CPUs this process may
    use and the steps), 1 for small work where threads cost more than they save."""
    if n_pairs * vocab * hidden < _PARALLEL_MIN_PAIR_ELEMS:
        return 1
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(torch.get_num_threads(), cpus, n_steps))


def scan_pairs(readers: Sequence[ArtifactReader], steps: np.ndarray, live: torch.Tensor) -> StepStats:
    """The statistics of every pair (``itertools.combinations`` order) at every step in `steps`,
    arrays of shape (n_pairs, len(steps)). Each run's W_t is read once per step; the steps are
    shared out between worker threads (see the module docstring)."""
    (_, vocab, hidden), dtype = w_layout(readers)
    R = len(readers)
    P = R * (R - 1) // 2
    T = int(steps.size)
    out = {f: np.zeros((P, T), dtype=_DTYPES[f]) for f in STAT_FIELDS}
    n_workers = _n_workers(P, vocab, hidden, T)
    kernels = [_PairKernel(R, vocab, hidden, dtype, live) for _ in range(n_workers)]
    todo = iter(range(T))
    todo_lock = threading.Lock()
    failed = threading.Event()

    def work(kern: _PairKernel) -> None:
        try:
            while not failed.is_set():
                with todo_lock:
                    k = next(todo, None)
                if k is None:
                    return
                kern.run_step(readers, int(steps[k]), k, out)
        except BaseException:
            failed.set()  # the other workers stop at their next step
            raise

    # Parallelism comes from the workers, each running torch single-threaded (new threads inherit
    # the setting); no result depends on it.
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
    return StepStats(steps=steps, **out)
