"""Bitwise scans of recorded W: where runs part, and how much of one run changes per step.

* `first_divergent_step`: the first step at which W of two runs differs in any bit (digests give
  the candidate, the bytes decide); `first_divergent_steps`: the same for every pair of R runs;
* `update_counts` / `update_fraction`: per step, the W entries (and token rows) of one run whose
  bits changed since the previous step.

"Differs" compares bit patterns (rows read as integer words): -0.0 vs 0.0 is a difference and
two identical NaNs are not. Rows are copied with ``ArtifactReader.row``/``rows`` into buffers
allocated once per call and reused for every step or block of steps; the files are never mapped.
"""

from __future__ import annotations

import itertools
import math
import warnings
from typing import Sequence

import numpy as np
import torch

from flannel_repro.analysis.readers import ReaderOrPath, as_words, opened, w_layout, word_dtype
from flannel_repro.bits import BITS
from flannel_repro.storage.format import DIGEST_SIZE
from flannel_repro.storage.layout import KEY_DIGESTS, KEY_W
from flannel_repro.storage.reader import ArtifactReader

__all__ = ["NEVER", "first_divergent_step", "first_divergent_steps", "update_counts", "update_fraction"]

NEVER = -1  # first step of a pair that never diverged (in `first_divergent_steps`, `PairwiseDivergence`)

_SCAN_BLOCK_BYTES = 8 << 20  # bytes per run per block (one reused buffer each) when scanning many steps


def _first_differing_row(
    ra: ArtifactReader, rb: ArtifactReader, start: int, stop: int, shape: tuple[int, ...], dtype: torch.dtype
) -> int | None:
    """First step in [start, stop) where W of the two runs differs in any bit, reading blocks of
    steps of both runs into two buffers reused for every block."""
    row_bytes = math.prod(shape) * dtype.itemsize
    if start >= stop or not row_bytes:
        return None  # rows without bytes never differ
    block = max(1, min(stop - start, _SCAN_BLOCK_BYTES // max(1, row_bytes)))
    bufs = [torch.empty((block, *shape), dtype=dtype) for _ in range(2)]
    word = word_dtype(row_bytes) if row_bytes else torch.uint8
    for s in range(start, stop, block):
        e = min(stop, s + block)
        a, b = (r.rows(KEY_W, s, e, out=buf[: e - s]) for r, buf in zip((ra, rb), bufs))
        a, b = a.reshape(e - s, -1), b.reshape(e - s, -1)
        a, b = as_words(a, word), as_words(b, word)
        if torch.equal(a, b):  # integer words: equality is bitwise, no NaN subtleties
            continue
        differ = (a != b).any(dim=1)
        return s + int(torch.nonzero(differ)[0, 0])
    return None


def first_divergent_step(a: ReaderOrPath, b: ReaderOrPath, *, trust_digests: bool = False) -> int | None:
    """First step t at which W_t of the two runs differs in any bit; None if never.

    The per-step digests give the candidate at once. By default the W bytes of every step up to
    the candidate are still compared (a block-wise memcmp of the rows read from both files,
    cheap), so the answer is right even if digests were wrong; disagreement is reported with a
    warning. With ``trust_digests=True`` steps whose digests agree are taken as equal and only
    the candidate row is confirmed on the bytes.
    """
    with opened([a, b]) as (ra, rb):
        (n, vocab, hidden), dtype = w_layout([ra, rb])
        shape = (vocab, hidden)

        candidate: int | None = None
        have_digests = all(KEY_DIGESTS in r and r.spec(KEY_DIGESTS).shape == (n, DIGEST_SIZE) for r in (ra, rb))
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


def _warn_digests(ra: ArtifactReader, rb: ArtifactReader, by_digest: int | None, by_bytes: int | None) -> None:
    warnings.warn(
        f"{ra.path} vs {rb.path}: digests put the first difference at step {by_digest}, the W bytes at "
        f"{by_bytes}; trusting the bytes (digests recorded incorrectly?).",
        RuntimeWarning,
        stacklevel=3,
    )


def first_divergent_steps(readers: Sequence[ArtifactReader]) -> np.ndarray:
    """First bitwise-differing step of every pair (``itertools.combinations`` order), NEVER for a
    pair that never differs: one row read per run per step (into one buffer reused for every step),
    stopping once every pair has diverged."""
    (n, _, _), dtype = w_layout(readers)
    pairs = list(itertools.combinations(range(len(readers)), 2))
    first = np.full(len(pairs), NEVER, dtype=np.int64)
    shape = readers[0].spec(KEY_W).shape[1:]
    row_bytes = math.prod(shape) * dtype.itemsize
    if not row_bytes:
        return first  # rows without bytes never differ
    buf = torch.empty((len(readers), *shape), dtype=dtype)
    x = as_words(buf.view(len(readers), -1), word_dtype(row_bytes))
    for t in range(n):
        if (first != NEVER).all():
            break
        for r, reader in enumerate(readers):
            reader.row(KEY_W, t, out=buf[r])
        for p, (i, j) in enumerate(pairs):
            if first[p] == NEVER and not torch.equal(x[i], x[j]):
                first[p] = t
    return first


def update_counts(run: ReaderOrPath) -> tuple[np.ndarray, np.ndarray]:
    """Per step t (0..S): number of W entries and of token rows whose bits changed from t-1 to t.

    Both are 0 at t = 0 (there is no previous step). Bitwise: -0.0 -> 0.0 is a change, NaN -> the
    same NaN is not.
    """
    with opened([run]) as (r,):
        (n, vocab, hidden), dtype = w_layout([r])
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


def update_fraction(run: ReaderOrPath) -> np.ndarray:
    """(S+1,) float64: fraction of W entries whose bits changed from step t-1 to t; NaN at t = 0."""
    with opened([run]) as (r,):
        (_, vocab, hidden), _ = w_layout([r])
        entries, _ = update_counts(r)
    frac = entries.astype(np.float64) / max(1, vocab * hidden)
    frac[0] = math.nan
    return frac
