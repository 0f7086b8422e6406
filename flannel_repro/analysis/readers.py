"""Run artifacts as the W scans (`divergence`, `bitwise`) take them.

A run is given as a reader or as a path (`ReaderOrPath`); `opened` yields readers and closes the ones
it opened. The rest checks what a scan is asked for against the files: W's common (S+1, V, H)
layout, the steps, the live mask, and views rows as integer words for bitwise comparison.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator, Sequence, Union

import numpy as np
import torch

from flannel_repro.bits import BITS
from flannel_repro.errors import ArtifactError
from flannel_repro.storage.layout import KEY_LIVE_MASK, KEY_W
from flannel_repro.storage.reader import ArtifactReader

__all__ = [
    "ReaderOrPath",
    "opened",
    "run_name",
    "w_layout",
    "chosen_steps",
    "covers_all",
    "read_live_mask",
    "word_dtype",
    "as_words",
]

ReaderOrPath = Union[ArtifactReader, str, "os.PathLike[str]"]  # a reader, or a path to open (and close)


@contextlib.contextmanager
def opened(runs: Sequence[ReaderOrPath]) -> Iterator[list[ArtifactReader]]:
    """Readers for `runs`; paths are opened (and closed on exit), readers are used as given."""
    readers: list[ArtifactReader] = []
    owned: list[ArtifactReader] = []
    try:
        for run in runs:
            if isinstance(run, ArtifactReader):
                readers.append(run)
            else:
                r = ArtifactReader(run)
                owned.append(r)
                readers.append(r)
        yield readers
    finally:
        for r in owned:
            r.close()


def run_name(r: ArtifactReader) -> str:
    return r.path.name


def w_layout(readers: Sequence[ArtifactReader]) -> tuple[tuple[int, ...], torch.dtype]:
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


def chosen_steps(steps: Sequence[int] | None, n: int, where: str) -> np.ndarray:
    """The steps asked for as int64 (all n by default); ArtifactError for one outside [0, n)."""
    if steps is None:
        return np.arange(n, dtype=np.int64)
    arr = np.asarray(list(steps), dtype=np.int64)
    bad = arr[(arr < 0) | (arr >= n)]
    if bad.size:
        raise ArtifactError(f"{where}: expected steps in [0, {n - 1}], got {bad.tolist()}.")
    return arr


def covers_all(steps: np.ndarray, n: int) -> bool:
    """Whether `steps` is exactly 0..n-1 in order."""
    return steps.size == n and bool(np.array_equal(steps, np.arange(n)))


def read_live_mask(
    readers: Sequence[ArtifactReader], live_mask: torch.Tensor | np.ndarray | None, vocab: int
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


def word_dtype(nbytes: int) -> torch.dtype:
    """Widest integer type dividing `nbytes`: comparing rows as int64 words is 4x fewer compares
    than as bf16 bit patterns, with the same answer (a row differs iff any of its bytes does)."""
    for size in (8, 4, 2):
        if nbytes % size == 0:
            return BITS[size]
    return torch.uint8


def as_words(t: torch.Tensor, word: torch.dtype) -> torch.Tensor:
    """Reinterpret a contiguous tensor's last axis as `word`s (its bytes must divide evenly)."""
    return t.view(torch.uint8).view(word)
