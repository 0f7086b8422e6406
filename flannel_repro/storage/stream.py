"""The safetensors stream: a pre-sized, in-place writer and a lazy reader with positional reads.

File format (safetensors): 8-byte little-endian u64 header length N, N bytes of JSON header
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}`` padded
with spaces, then the data region (offsets are relative to its start, tensors contiguous).

Writer guarantees:

* The file is written under a temporary name ``<final>.partial-<pid>-<random>`` in the same
  directory and appears under its final name only through an atomic ``os.replace`` in
  :meth:`TrajectoryWriter.finish`, after an fsync. A crash leaves at most the partial file.
* The partial file's header-length field stays zero until ``finish``, so even a pre-sized,
  structurally complete-looking partial file is rejected by :class:`TrajectoryReader`.
* Rows go straight to the file descriptor with ``os.pwrite``; memory does not grow with the
  number of rows written.

Reader guarantees: one copy-on-write memory map per file; ``reader["W"][t]`` touches only the
pages of row ``t``; nothing a caller does to a returned tensor ever reaches the file.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import mmap
import operator
import os
import re
import secrets
import shutil
import stat
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch

from flannel_repro.errors import ArtifactError, ResumeError
from flannel_repro import safeio
from flannel_repro.storage.jsonfile import MAX_DEPTH, check_depth


# --- digests ------------------------------------------------------------------------------------

DIGEST_ALGO = "blake2b-256"
DIGEST_SIZE = 32
# Metadata key: JSON {tensor name: blake2b-256 hex of its bytes} written at finish() from the bytes on
# disk, for every tensor the writer was not told is covered otherwise (per-row digests of W).
META_CHECKSUMS = "checksums"


# --- safetensors dtype names --------------------------------------------------------------------

_ST_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
}
for _name, _attr in (
    ("U16", "uint16"),
    ("U32", "uint32"),
    ("U64", "uint64"),
    ("F8_E4M3", "float8_e4m3fn"),
    ("F8_E5M2", "float8_e5m2"),
):
    if hasattr(torch, _attr):
        _ST_DTYPES[_name] = getattr(torch, _attr)
_TORCH_TO_ST: dict[torch.dtype, str] = {v: k for k, v in _ST_DTYPES.items()}

_METADATA_KEY = "__metadata__"
_MAX_HEADER = 100_000_000  # safetensors refuses larger headers
_PARTIAL_RE = re.compile(r"\.partial-(\d+)-[0-9a-f]+$")
# A disk (or quota, or the process's file-size limit) that cannot take the artifact.
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _require_little_endian() -> None:
    # safetensors is little-endian; we write and map native bytes, so the host must be too.
    if sys.byteorder != "little":
        raise ArtifactError(f"safetensors files are little-endian; this host is {sys.byteorder}-endian (not supported).")


def _raw_bytes(t: torch.Tensor) -> np.ndarray:
    """The tensor's bytes as a flat uint8 numpy array (CPU, contiguous; no copy when already so)."""
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    # view(uint8) reinterprets bits (bf16 has no numpy dtype); bool is already one byte per element.
    return flat.view(torch.uint8).numpy()


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def digest_tensor(t: torch.Tensor) -> bytes:
    """blake2b-256 of the tensor's raw bytes (CPU, contiguous, native little-endian layout)."""
    return hashlib.blake2b(memoryview(_raw_bytes(t)), digest_size=DIGEST_SIZE).digest()


def digest_as_tensor(digest: bytes) -> torch.Tensor:
    """A digest as a (32,) uint8 tensor, ready for ``writer.write_row(KEY_DIGESTS, t, ...)``."""
    if len(digest) != DIGEST_SIZE:
        raise ArtifactError(f"digest: expected {DIGEST_SIZE} bytes, got {len(digest)}.")
    return torch.tensor(list(digest), dtype=torch.uint8)


@dataclass(frozen=True)
class TensorSpec:
    """Name, dtype and full shape of one tensor in an artifact."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


def _check_metadata(metadata: Mapping[str, Any], where: str) -> dict[str, str]:
    bad = {k: type(v).__name__ for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)}
    if bad:
        raise ArtifactError(
            f"{where}: metadata keys and values must be str (safetensors stores str -> str); got non-str for {bad}."
        )
    return dict(metadata)


# --- writer -------------------------------------------------------------------------------------


class TrajectoryWriter:
    """Streams tensors into a pre-sized safetensors file, row by row, and publishes it atomically.

    Use as a context manager; call :meth:`finish` inside the ``with`` block. Leaving the block with
    an exception, or without ``finish``, deletes the temporary file.
    """

    # Completeness is tracked per (first, second) index when that is at most this many entries,
    # else per first index. A bool per entry: the bookkeeping is fixed-size, it never grows.
    _MAX_TRACKED = 1 << 22

    def __init__(
        self,
        path: str | os.PathLike[str],
        specs: Sequence[TensorSpec],
        metadata: Mapping[str, str],
        *,
        reserve_metadata_bytes: int = 65536,
        checksum_exclude: Sequence[str] = (),
        temp_path: str | os.PathLike[str] | None = None,
    ) -> None:
        self.path = Path(path)
        # a fixed temporary name (resumable runs) instead of a fresh `.partial-<pid>-<hex>` one
        self._fixed_temp = Path(temp_path) if temp_path is not None else None
        self.keep_partial = False  # leave the temporary file on an error exit (a resumable run's checkpoint needs it)
        self.checksum_exclude = frozenset(checksum_exclude)
        self.metadata = _check_metadata(metadata, str(self.path))
        if reserve_metadata_bytes < 0:
            raise ArtifactError(f"{self.path}: reserve_metadata_bytes must be >= 0 (got {reserve_metadata_bytes}).")
        self.reserve_metadata_bytes = int(reserve_metadata_bytes)
        seen: set[str] = set()
        for s in specs:
            if not isinstance(s, TensorSpec):
                raise ArtifactError(f"{self.path}: specs must be TensorSpec (got {type(s).__name__}).")
            if s.name in seen or s.name == _METADATA_KEY or not s.name:
                raise ArtifactError(f"{self.path}: tensor name {s.name!r} is empty, reserved or given twice.")
            if s.dtype not in _TORCH_TO_ST:
                raise ArtifactError(
                    f"{self.path}: tensor {s.name!r} has dtype {s.dtype}, which safetensors cannot store "
                    f"(supported: {', '.join(str(d) for d in _TORCH_TO_ST)})."
                )
            if any(d < 0 for d in s.shape):
                raise ArtifactError(f"{self.path}: tensor {s.name!r} has a negative dimension in shape {s.shape}.")
            seen.add(s.name)
        # Lay tensors out by decreasing element size (stable): every tensor then starts at a
        # multiple of its own element size, so the reader's views are naturally aligned.
        ordered = sorted(specs, key=lambda s: -s.dtype.itemsize)
        self.specs: dict[str, TensorSpec] = {s.name: s for s in ordered}
        self._offsets: dict[str, tuple[int, int]] = {}
        pos = 0
        for s in ordered:
            self._offsets[s.name] = (pos, pos + s.nbytes)
            pos += s.nbytes
        self._data_len = pos
        self._header_len = 0
        self.temp_path: Path | None = None
        self._fd: int | None = None
        self._finished = False
        self._coverage: dict[str, np.ndarray | None] = {}
        self._prefix_hash: dict[str, tuple[int, Any]] = {}  # name -> (bytes hashed, running blake2b)

    # -- header ---------------------------------------------------------------------------------

    def _header_json(self, metadata: Mapping[str, str]) -> bytes:
        header: dict[str, Any] = {_METADATA_KEY: dict(metadata)} if metadata else {}
        for name, s in self.specs.items():
            begin, end = self._offsets[name]
            header[name] = {"dtype": _TORCH_TO_ST[s.dtype], "shape": list(s.shape), "data_offsets": [begin, end]}
        return json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode("ascii")

    def _padded(self, body: bytes) -> bytes:
        return body + b" " * (self._header_len - len(body))

    # -- lifecycle ------------------------------------------------------------------------------

    def _initial_header(self) -> bytes:
        # the checksums written at finish() have a fixed length: their room is part of the header from the start
        placeholder = {n: "0" * 2 * DIGEST_SIZE for n in [*self._offsets, _METADATA_KEY] if n not in self.checksum_exclude}
        body = self._header_json({**self.metadata, META_CHECKSUMS: json.dumps(placeholder, sort_keys=True)})
        # Header length: JSON + reserved room for more metadata, rounded so 8 + N is a multiple of 8
        # (keeps the data region 8-byte aligned, as safetensors' own writer does).
        n = len(body) + self.reserve_metadata_bytes
        n += (-(8 + n)) % 8
        if n > _MAX_HEADER:
            raise ArtifactError(f"{self.path}: header would be {n} bytes; safetensors accepts at most {_MAX_HEADER}.")
        self._header_len = n
        return body

    def reopen(self, completed: Mapping[str, int | None], digests: Mapping[str, str] | None = None) -> "TrajectoryWriter":
        """Enter by adopting the temporary file an earlier writer of this artifact left (a resumed run):
        same specs and metadata, checked byte for byte against the header this writer would write.
        `completed` says what is already written: name -> number of leading rows, or None for the whole
        tensor. `digests` (from `prefix_digests` when the checkpoint was taken): what those rows must hash
        to; a file whose written part changed since is refused (ResumeError). The rest is written as usual;
        finish() checks that everything was."""
        _require_little_endian()
        if self._fd is not None or self._finished:
            raise ArtifactError(f"{self.path}: a TrajectoryWriter can be entered only once.")
        if self._fixed_temp is None:
            raise ArtifactError(f"{self.path}: reopen() needs the writer's fixed temporary path (temp_path=...).")
        body = self._initial_header()
        expected_size = 8 + self._header_len + self._data_len
        try:
            fd = safeio.open_nofollow(self._fixed_temp, os.O_RDWR, what="the partial artifact to resume",
                                      error=ResumeError)
        except FileNotFoundError:
            raise ResumeError(f"{self._fixed_temp}: expected the partial artifact to resume, found none.") from None
        try:
            size = os.fstat(fd).st_size
            found = os.pread(fd, 8 + self._header_len, 0)
        except BaseException:
            os.close(fd)
            raise
        if size != expected_size or found != b"\0" * 8 + self._padded(body):
            os.close(fd)
            raise ResumeError(f"{self._fixed_temp}: expected a partial artifact of this run ({expected_size} bytes with "
                              f"this header), got {size} bytes with {'another' if size == expected_size else 'a'} header; "
                              "it cannot be resumed.")
        self.temp_path, self._fd = self._fixed_temp, fd
        if digests is not None:
            got = self.prefix_digests(completed)
            changed = sorted(n for n in completed if got.get(n) != digests.get(n))
            if changed:
                os.close(fd)
                self.temp_path, self._fd = None, None
                raise ResumeError(f"{self._fixed_temp}: the rows written before the checkpoint no longer hash to the "
                                  f"digests the checkpoint recorded ({', '.join(changed)}): the partial file changed "
                                  "on disk; it cannot be resumed.")
        for name, s in self.specs.items():
            self._coverage[name] = cov = self._new_coverage(s)
            if name in completed and cov is not None:
                rows = completed[name]
                if rows is None or cov.ndim == 0:
                    cov[...] = True
                else:
                    cov[:rows] = True
        return self

    def sync(self) -> None:
        """fsync what was written so far (before a checkpoint refers to it)."""
        self._require_open("sync")
        assert self._fd is not None
        os.fsync(self._fd)

    def prefix_digests(self, completed: Mapping[str, int | None]) -> dict[str, str]:
        """blake2b-256 of what is on disk of each tensor's written part (`completed`: name -> leading rows,
        None for the whole tensor), read back from the file: a checkpoint records them, and `reopen` checks
        the partial file still holds those bytes. Incremental: rows hashed at an earlier call are not read
        again, so checkpointing a long run reads each row once."""
        self._require_open("hash what was written")
        assert self._fd is not None
        out: dict[str, str] = {}
        for name, rows in sorted(completed.items()):
            s = self._spec(name)
            row_bytes = s.nbytes // s.shape[0] if s.shape and s.shape[0] else s.nbytes
            stop = s.nbytes if rows is None or not s.shape else rows * row_bytes
            done, h = self._prefix_hash.get(name, (0, None))
            if h is None or done > stop:
                done, h = 0, hashlib.blake2b(digest_size=DIGEST_SIZE)
            begin, _ = self._offsets[name]
            base = 8 + self._header_len + begin
            while done < stop:
                chunk = min(stop - done, 1 << 24)
                data = os.pread(self._fd, chunk, base + done)
                if len(data) != chunk:
                    raise ArtifactError(f"{self.temp_path}: expected {chunk} bytes of {name!r} at offset {base + done}, "
                                        f"read {len(data)}; the partial file is shorter than its header says.")
                h.update(data)
                done += chunk
            self._prefix_hash[name] = (done, h)
            out[name] = h.copy().hexdigest()
        return out

    def rows_on_disk(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of `name` as the file holds them (uint8, one row per line): what an earlier
        writer of a reopened file left there."""
        self._require_open(f"read {name!r}")
        assert self._fd is not None
        s = self._spec(name)
        row_bytes = s.nbytes // s.shape[0]
        begin, _ = self._offsets[name]
        data = os.pread(self._fd, (stop - start) * row_bytes, 8 + self._header_len + begin + start * row_bytes)
        return np.frombuffer(data, dtype=np.uint8).reshape(-1, row_bytes)

    def __enter__(self) -> "TrajectoryWriter":
        _require_little_endian()
        if self._fd is not None or self._finished:
            raise ArtifactError(f"{self.path}: a TrajectoryWriter can be entered only once.")
        body = self._initial_header()
        n = self._header_len
        directory = self.path.parent if str(self.path.parent) else Path(".")
        if not directory.is_dir():
            raise ArtifactError(f"{self.path}: expected an existing directory {directory}, found none.")
        size = 8 + n + self._data_len
        free = shutil.disk_usage(directory).free
        if free < size:  # refuse up front rather than fail halfway through training
            raise ArtifactError(f"{self.path}: the artifact needs {_mb(size)}, and the file system of {directory} has "
                                f"{_mb(free)} free. Free some space (flannel-repro prune) or point the artifacts "
                                "elsewhere (--flannel-artifacts).")
        self.temp_path = self._fixed_temp or self.path.with_name(
            f"{self.path.name}.partial-{os.getpid()}-{secrets.token_hex(4)}")
        if self._fixed_temp is not None:
            self._fixed_temp.unlink(missing_ok=True)  # a fresh start replaces what a killed run left
        # O_EXCL and O_NOFOLLOW: never through a link or over a file someone planted under this name
        self._fd = safeio.open_nofollow(self.temp_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644,
                                        what="a partial artifact")
        try:
            self._reserve(8 + n + self._data_len)  # the whole file's space first: a disk that cannot hold it fails now
            # Length field stays 0 until finish(): a partial file never parses as a complete one.
            self._pwrite(b"\0" * 8, 0)
            self._pwrite(self._padded(body), 8)
        except BaseException:
            self._discard()
            raise
        for name, s in self.specs.items():
            self._coverage[name] = self._new_coverage(s)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self._finished:
            if self.keep_partial and exc_type is not None:
                if self._fd is not None:
                    with contextlib.suppress(OSError):
                        os.close(self._fd)
                    self._fd = None
                return
            self._discard()

    def _discard(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
        if self.temp_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.temp_path)

    def _reserve(self, size: int) -> None:
        """Give the file its final size with its blocks allocated, so a disk that cannot hold the whole
        artifact fails here, before training, not at step k. Where the file system cannot allocate
        ahead (EOPNOTSUPP, EINVAL), the file is pre-sized sparse instead."""
        assert self._fd is not None
        try:
            os.posix_fallocate(self._fd, 0, size)
            return
        except OSError as exc:
            if exc.errno in _DISK_FULL:
                raise self._disk_error(exc, "reserving its space") from None
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
        try:
            os.ftruncate(self._fd, size)
        except OSError as exc:
            if exc.errno in _DISK_FULL:
                raise self._disk_error(exc, "pre-sizing it") from None
            raise

    def _disk_error(self, exc: OSError, doing: str) -> ArtifactError:
        where = self.temp_path.parent if self.temp_path is not None else self.path.parent
        limit = ""
        if exc.errno == errno.EFBIG:
            import resource

            soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
            if soft != resource.RLIM_INFINITY:
                limit = f"; this process may write files of at most {_mb(soft)} (ulimit -f)"
        return ArtifactError(f"{self.path}: out of space while {doing} ({exc.strerror}): the artifact needs "
                             f"{_mb(8 + self._header_len + self._data_len)} and {where} has "
                             f"{_mb(shutil.disk_usage(where).free)} free{limit}. Nothing was published; free some "
                             "space (flannel-repro prune) or point the artifacts elsewhere (--flannel-artifacts).")

    def _pwrite(self, data: bytes | memoryview | np.ndarray, offset: int) -> None:
        assert self._fd is not None
        view = memoryview(data).cast("B")
        while view:  # pwrite may write less than asked (signals, huge buffers)
            try:
                written = os.pwrite(self._fd, view, offset)
            except OSError as exc:
                if exc.errno not in _DISK_FULL:
                    raise
                raise self._disk_error(exc, "writing") from None
            view = view[written:]
            offset += written

    def _checksums(self) -> dict[str, str]:
        """blake2b-256 of every checksummed tensor, read back from the file (what a reader will see)."""
        assert self._fd is not None
        data_start = 8 + self._header_len
        return {name: _hash_range(self._fd, data_start + begin, end - begin)
                for name, (begin, end) in sorted(self._offsets.items()) if name not in self.checksum_exclude}

    def _require_open(self, what: str) -> None:
        if self._fd is None:
            state = "finished" if self._finished else "not entered (use `with TrajectoryWriter(...) as w:`)"
            raise ArtifactError(f"{self.path}: cannot {what}: the writer is {state}.")

    # -- completeness bookkeeping ---------------------------------------------------------------

    def _new_coverage(self, s: TensorSpec) -> np.ndarray | None:
        if not s.shape:
            return np.zeros((), dtype=bool)
        depth = 2 if len(s.shape) >= 2 and math.prod(s.shape[:2]) <= self._MAX_TRACKED else 1
        if math.prod(s.shape[:depth]) > self._MAX_TRACKED:
            return None  # untracked: too many rows to keep a flag per row
        return np.zeros(s.shape[:depth], dtype=bool)

    def _mark(self, name: str, index: tuple[int, ...]) -> None:
        cov = self._coverage.get(name)
        if cov is None:
            return
        if len(index) > cov.ndim:
            self._coverage[name] = None  # writes finer than the tracking grain: stop tracking
            return
        cov[index] = True

    def unwritten(self) -> dict[str, int]:
        """Tensors not fully written: name -> number of first-axis rows with something never
        written (1 for a scalar). Tensors too large to track are omitted."""
        out: dict[str, int] = {}
        for name, cov in self._coverage.items():
            if cov is None or not self.specs[name].numel or cov.all():
                continue
            out[name] = 1 if cov.ndim == 0 else int((~cov.reshape(cov.shape[0], -1).all(axis=1)).sum())
        return out

    # -- writing --------------------------------------------------------------------------------

    def _spec(self, name: str) -> TensorSpec:
        try:
            return self.specs[name]
        except KeyError:
            raise ArtifactError(
                f"{self.path}: no tensor {name!r} in this artifact (declared: {', '.join(self.specs)})."
            ) from None

    def write_row(self, name: str, index: int | tuple[int, ...], tensor: torch.Tensor) -> None:
        """Write ``tensor`` into ``name[index]`` in place. ``index`` is an int (first dimension) or a
        tuple of leading indices; ``tensor.shape`` must equal ``spec.shape[len(index):]``."""
        self._require_open(f"write {name!r}")
        s = self._spec(name)
        idx = (index,) if isinstance(index, (int, np.integer)) else tuple(index)
        if not idx or len(idx) > len(s.shape):
            raise ArtifactError(
                f"{self.path}: tensor {name!r} of shape {s.shape}: expected 1 to {len(s.shape)} leading indices, got {index!r}."
            )
        for axis, (i, dim) in enumerate(zip(idx, s.shape)):
            if not isinstance(i, (int, np.integer)) or isinstance(i, bool) or not 0 <= i < dim:
                raise ArtifactError(
                    f"{self.path}: tensor {name!r} axis {axis}: expected an index in [0, {dim}), got {i!r}."
                )
        idx = tuple(int(i) for i in idx)
        self._write_block(s, idx, tensor)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write the whole tensor ``name`` at once (for small tensors: masks, scalars, batch starts)."""
        self._require_open(f"write {name!r}")
        self._write_block(self._spec(name), (), tensor)

    def _write_block(self, s: TensorSpec, idx: tuple[int, ...], tensor: torch.Tensor) -> None:
        if not isinstance(tensor, torch.Tensor):
            raise ArtifactError(f"{self.path}: tensor {s.name!r}: expected a torch.Tensor, got {type(tensor).__name__}.")
        expected_shape = s.shape[len(idx):]
        where = f"{s.name}[{', '.join(map(str, idx))}]" if idx else s.name
        if tensor.dtype != s.dtype:
            raise ArtifactError(f"{self.path}: {where}: expected dtype {s.dtype}, got {tensor.dtype}.")
        if tuple(tensor.shape) != expected_shape:
            raise ArtifactError(f"{self.path}: {where}: expected shape {expected_shape}, got {tuple(tensor.shape)}.")
        # Row-major: the block at leading index idx starts at sum(idx[k] * stride_k) elements.
        elem = 0
        for k, i in enumerate(idx):
            elem += i * math.prod(s.shape[k + 1:])
        begin, _ = self._offsets[s.name]
        if tensor.numel():
            self._pwrite(_raw_bytes(tensor), 8 + self._header_len + begin + elem * s.dtype.itemsize)
        if idx:
            self._mark(s.name, idx)
        else:
            cov = self._coverage.get(s.name)
            if cov is not None:
                cov[...] = True

    def finish(self, extra_metadata: Mapping[str, str] | None = None, *, allow_unwritten: bool = False) -> Path:
        """Write the final header, fsync, rename to the final path atomically, fsync the directory.

        Raises ArtifactError if the metadata no longer fits the reserved header, or if some tracked
        rows were never written (pass ``allow_unwritten=True`` to publish zeros there)."""
        self._require_open("finish")
        metadata = dict(self.metadata)
        if extra_metadata:
            metadata.update(_check_metadata(extra_metadata, str(self.path)))
        if not allow_unwritten:
            missing = self.unwritten()
            if missing:
                raise ArtifactError(
                    f"{self.path}: expected every row written before finish(), got rows never written: {missing} "
                    "(write them, or pass allow_unwritten=True to keep zeros)."
                )
        metadata[META_CHECKSUMS] = json.dumps({**self._checksums(), _METADATA_KEY: _metadata_checksum(metadata)},
                                              sort_keys=True)
        body = self._header_json(metadata)
        if len(body) > self._header_len:
            raise ArtifactError(
                f"{self.path}: final header needs {len(body)} bytes but only {self._header_len} were reserved "
                f"(metadata grew by {len(body) - len(self._header_json({**self.metadata, META_CHECKSUMS: metadata[META_CHECKSUMS]}))} bytes; "
                f"raise reserve_metadata_bytes above {self.reserve_metadata_bytes})."
            )
        assert self._fd is not None and self.temp_path is not None
        self._pwrite(self._padded(body), 8)
        os.fsync(self._fd)  # data and JSON on disk before the length field makes the file valid
        self._pwrite(self._header_len.to_bytes(8, "little"), 0)
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = None
        os.replace(self.temp_path, self.path)
        self._finished = True
        self.metadata = metadata
        fsync_dir(self.path.parent)
        return self.path


def _metadata_checksum(metadata: Mapping[str, str]) -> str:
    """blake2b-256 hex of the metadata without its checksums entry (canonical JSON)."""
    rest = {k: v for k, v in metadata.items() if k != META_CHECKSUMS}
    return hashlib.blake2b(json.dumps(rest, sort_keys=True).encode(), digest_size=DIGEST_SIZE).hexdigest()


def _hash_range(fd: int, offset: int, length: int) -> str:
    """blake2b-256 hex of `length` bytes of `fd` from `offset`, read in 4 MiB blocks."""
    h = hashlib.blake2b(digest_size=DIGEST_SIZE)
    done = 0
    while done < length:
        block = os.pread(fd, min(4 << 20, length - done), offset + done)
        if not block:
            break  # short file: the caller's comparison fails on the shorter hash input
        h.update(block)
        done += len(block)
    return h.hexdigest()


def fsync_dir(directory: Path) -> None:
    """Make a rename durable (no-op where directories cannot be opened or fsynced)."""
    try:
        fd = os.open(directory if str(directory) else ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return True  # not a pid we can judge: treat as alive (keep the file)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def stale_partials(directory: str | os.PathLike[str], *, older_than_s: float = 60.0) -> list[Path]:
    """The ``*.partial-<pid>-*`` files of `directory` left by killed writers.

    A partial file is stale when its writer pid is not running on this machine AND it was last
    modified at least ``older_than_s`` seconds ago (a live writer on another machine sharing the
    directory keeps its mtime fresh). Files of this process are never stale.
    """
    stale: list[Path] = []
    now = time.time()
    for p in sorted(Path(directory).glob("*.partial-*")):
        m = _PARTIAL_RE.search(p.name)
        if m is None or not p.is_file():
            continue
        pid = int(m.group(1))
        if pid == os.getpid() or _pid_alive(pid):
            continue
        try:
            if now - p.stat().st_mtime < older_than_s:
                continue
        except FileNotFoundError:
            continue
        stale.append(p)
    return stale


def cleanup_partials(directory: str | os.PathLike[str], *, older_than_s: float = 60.0) -> list[Path]:
    """Remove the stale partial files of `directory` (`stale_partials`); returns the removed paths."""
    removed: list[Path] = []
    for p in stale_partials(directory, older_than_s=older_than_s):
        try:
            p.unlink()
        except FileNotFoundError:
            continue
        removed.append(p)
    return removed


# --- reader -------------------------------------------------------------------------------------


class TrajectoryReader:
    """Lazy reader of a safetensors file: positional reads for copies, a memory map for views.

    Two ways to get at the data:

    * :meth:`row`, :meth:`rows` and :meth:`read` copy the bytes asked for with positional reads
      (``os.preadv``) into a tensor the caller owns (``out=``, reusable) or a new one. Nothing is
      mapped: the file's pages stay in the kernel page cache, which is not part of this process's
      RSS, so reading or scanning a whole trajectory leaves no memory behind. Use these for
      anything that walks over many steps.
    * ``reader[name]`` is a tensor viewing a copy-on-write memory map of the whole file, created on
      first use: slicing reads only the pages touched, but every page touched stays resident in
      this process until :meth:`release_pages`, or until the map goes away (:meth:`close`, once no
      view of it is alive any more). Treat these tensors as read-only:
      in-place changes stay private to this process (copy-on-write) and never reach the file.

    Positional reads are safe from several threads at once. A closed reader raises ArtifactError.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        _require_little_endian()
        self.path = Path(path)
        self._fd: int | None = None
        self._mm: mmap.mmap | None = None
        self._cache: dict[str, torch.Tensor] = {}
        self._lock = threading.Lock()  # guards the lazy map and the view cache
        try:
            # a link to a file is read; a FIFO, device or directory is refused before it is opened (a FIFO
            # would block), and opening without blocking covers one swapped in meanwhile
            safeio.regular_file(self.path, "a safetensors file")
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            raise ArtifactError(f"{self.path}: expected a safetensors file, found no such file.") from None
        except OSError as exc:
            raise ArtifactError(f"{self.path}: expected a safetensors file, could not open it ({exc.strerror or exc}).") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ArtifactError(f"{self.path}: expected a safetensors file (a regular file), got {safeio.kind(st.st_mode)}.")
            os.set_blocking(fd, True)
            size = st.st_size
            self.file_size = size
            if size < 8:
                raise ArtifactError(
                    f"{self.path}: truncated or incomplete: expected at least 8 bytes (header length), got {size}."
                )
            n = int.from_bytes(os.pread(fd, 8, 0), "little")
            if n == 0:
                raise ArtifactError(
                    f"{self.path}: incomplete: expected a non-zero header length, got 0 "
                    "(a TrajectoryWriter that has not finished, or was killed, leaves it zero)."
                )
            if n > _MAX_HEADER:
                raise ArtifactError(
                    f"{self.path}: expected a header length of at most {_MAX_HEADER} bytes, got {n} (not a safetensors file?)."
                )
            if 8 + n > size:
                raise ArtifactError(
                    f"{self.path}: truncated or incomplete: expected at least {8 + n} bytes (header), got {size}."
                )
            raw = bytearray(n)
            self._pread_into(fd, memoryview(raw), 8, "the header")
            self._header_len = n
            self._parse_header(bytes(raw), size)
        except BaseException:
            os.close(fd)
            raise
        # The descriptor stays open for positional reads; the map is made on first `reader[name]`.
        self._fd = fd

    def _parse_header(self, raw: bytes, size: int) -> None:
        check_depth(raw, str(self.path), "a JSON header")  # before json: deep nesting is a RecursionError there
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ArtifactError(f"{self.path}: expected a JSON header, got unparsable bytes ({e}).") from None
        except RecursionError:
            raise ArtifactError(f"{self.path}: expected a JSON header nested at most {MAX_DEPTH} levels deep, "
                                "got deeper nesting.") from None
        if not isinstance(header, dict):
            raise ArtifactError(f"{self.path}: expected a JSON object header, got {type(header).__name__}.")
        meta = header.pop(_METADATA_KEY, None) or {}
        if not isinstance(meta, dict):
            raise ArtifactError(f"{self.path}: expected __metadata__ to be an object, got {type(meta).__name__}.")
        self.metadata: dict[str, str] = _check_metadata(meta, str(self.path))
        for key, value in self.metadata.items():  # values are JSON text parsed later: bound their nesting now
            if "[" in value or "{" in value:
                check_depth(value, f"{self.path}: metadata {key!r}", "JSON")
        self._specs: dict[str, TensorSpec] = {}
        self._offsets: dict[str, tuple[int, int]] = {}
        for name, info in header.items():
            try:
                dtype_name = info["dtype"]
                shape = tuple(info["shape"])
                begin, end = info["data_offsets"]
            except (TypeError, KeyError, ValueError):
                raise ArtifactError(
                    f"{self.path}: tensor {name!r}: expected {{dtype, shape, data_offsets: [begin, end]}}, got {info!r}."
                ) from None
            if dtype_name not in _ST_DTYPES:
                raise ArtifactError(
                    f"{self.path}: tensor {name!r}: expected a dtype among {', '.join(_ST_DTYPES)}, got {dtype_name!r}."
                )
            if not all(isinstance(d, int) and d >= 0 for d in shape):
                raise ArtifactError(f"{self.path}: tensor {name!r}: expected non-negative int dims, got shape {list(shape)}.")
            if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end):
                raise ArtifactError(f"{self.path}: tensor {name!r}: bad data_offsets {[begin, end]}.")
            spec = TensorSpec(name, _ST_DTYPES[dtype_name], shape)
            if end - begin != spec.nbytes:
                raise ArtifactError(
                    f"{self.path}: tensor {name!r}: expected {spec.nbytes} bytes for {dtype_name} {list(shape)}, "
                    f"got data_offsets spanning {end - begin}."
                )
            self._specs[name] = spec
            self._offsets[name] = (begin, end)
        # Tensors must tile the data region exactly, as safetensors requires (no gaps, no overlap).
        order = sorted(self._specs, key=lambda k: self._offsets[k])
        pos = 0
        for name in order:
            begin, end = self._offsets[name]
            if begin != pos:
                raise ArtifactError(
                    f"{self.path}: tensor {name!r}: expected data to start at byte {pos} of the data region, got {begin}."
                )
            pos = end
        self._specs = {k: self._specs[k] for k in order}
        expected = 8 + self._header_len + pos
        if size != expected:
            raise ArtifactError(f"{self.path}: truncated or incomplete: expected {expected} bytes, got {size}.")
        self._data_start = 8 + self._header_len

    # -- mapping-like API -----------------------------------------------------------------------

    def keys(self) -> list[str]:
        """Tensor names in file order."""
        return list(self._specs)

    def __contains__(self, name: object) -> bool:
        return name in self._specs

    def __iter__(self) -> Iterator[str]:
        return iter(self._specs)

    def __len__(self) -> int:
        return len(self._specs)

    def spec(self, name: str) -> TensorSpec:
        try:
            return self._specs[name]
        except KeyError:
            raise ArtifactError(
                f"{self.path}: expected a tensor {name!r}, got only: {', '.join(self._specs) or '(none)'}."
            ) from None

    def __getitem__(self, name: str) -> torch.Tensor:
        """The whole tensor as a view of the (lazily created) memory map; see the class docstring."""
        t = self._cache.get(name)
        if t is None:
            with self._lock:
                t = self._cache.get(name)
                if t is None:
                    t = self._cache[name] = self._view(name)
        return t

    def get(self, name: str, default: torch.Tensor | None = None) -> torch.Tensor | None:
        return self[name] if name in self._specs else default

    @property
    def closed(self) -> bool:
        return self._fd is None

    # -- positional reads (no map) --------------------------------------------------------------

    def row(
        self,
        name: str,
        index: int | tuple[int, ...],
        out: torch.Tensor | None = None,
        *,
        start: int = 0,
        stop: int | None = None,
    ) -> torch.Tensor:
        """``self[name][index]`` as a tensor of its own, read from the file (not the map).

        ``index`` is an int (first axis) or a tuple of leading indices; negative indices count
        from the end. ``start``/``stop`` select a contiguous range of the row's first axis, e.g.
        ``row("W", t, start=v0, stop=v1)`` is ``W[t, v0:v1]``. With ``out`` (contiguous, of the
        stored dtype and the result's shape) the bytes go there and ``out`` is returned, so a
        scan can reuse one buffer per step.
        """
        spec = self.spec(name)
        idx = tuple(index) if isinstance(index, (tuple, list)) else (index,)
        if not idx or len(idx) > len(spec.shape):
            raise ArtifactError(
                f"{self.path}: tensor {name!r} of shape {spec.shape}: expected 1 to {len(spec.shape)} leading "
                f"indices, got {index!r}."
            )
        elem = 0
        for axis, i in enumerate(idx):
            dim = spec.shape[axis]
            try:
                if isinstance(i, bool):
                    raise TypeError
                i = operator.index(i)  # int, numpy integer, integer scalar tensor
            except TypeError:
                raise ArtifactError(
                    f"{self.path}: tensor {name!r} axis {axis}: expected an int index, got {i!r}."
                ) from None
            if not -dim <= i < dim:
                raise IndexError(
                    f"{self.path}: tensor {name!r}: index {i} is out of bounds for axis {axis} with size {dim}."
                )
            elem += (i % dim) * math.prod(spec.shape[axis + 1:])
        rest = spec.shape[len(idx):]
        if start != 0 or stop is not None:
            if not rest:
                raise ArtifactError(
                    f"{self.path}: tensor {name!r}: {index!r} selects one element; start/stop do not apply."
                )
            stop = rest[0] if stop is None else stop
            if not 0 <= start <= stop <= rest[0]:
                raise ArtifactError(
                    f"{self.path}: tensor {name!r}: expected 0 <= start <= stop <= {rest[0]}, "
                    f"got start={start}, stop={stop}."
                )
            elem += start * math.prod(rest[1:])
            rest = (stop - start, *rest[1:])
        return self._read(name, spec, elem, rest, out)

    def rows(self, name: str, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """``self[name][start:stop]`` (first axis, 0 <= start <= stop <= len) read from the file,
        into ``out`` if given."""
        spec = self.spec(name)
        if not spec.shape:
            raise ArtifactError(f"{self.path}: tensor {name!r} is a scalar; it has no rows.")
        n = spec.shape[0]
        if not 0 <= start <= stop <= n:
            raise ArtifactError(
                f"{self.path}: tensor {name!r}: expected 0 <= start <= stop <= {n}, got {start}, {stop}."
            )
        return self._read(name, spec, start * math.prod(spec.shape[1:]), (stop - start, *spec.shape[1:]), out)

    def read(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """The whole tensor ``name`` read from the file into a tensor of its own (or ``out``)."""
        spec = self.spec(name)
        return self._read(name, spec, 0, spec.shape, out)

    def _read(
        self, name: str, spec: TensorSpec, elem: int, shape: tuple[int, ...], out: torch.Tensor | None
    ) -> torch.Tensor:
        if out is None:
            out = torch.empty(shape, dtype=spec.dtype)
        elif not isinstance(out, torch.Tensor):
            raise ArtifactError(
                f"{self.path}: tensor {name!r}: expected out= to be a torch.Tensor, got {type(out).__name__}."
            )
        elif (
            out.dtype != spec.dtype
            or tuple(out.shape) != tuple(shape)
            or out.device.type != "cpu"
            or not out.is_contiguous()
        ):
            raise ArtifactError(
                f"{self.path}: tensor {name!r}: expected out= to be a contiguous CPU {spec.dtype} tensor of shape "
                f"{tuple(shape)}, got {'' if out.is_contiguous() else 'non-contiguous '}{out.device.type} "
                f"{out.dtype} {tuple(out.shape)}."
            )
        fd = self._fd
        if fd is None:
            raise ArtifactError(f"{self.path}: cannot read {name!r}: the reader is closed.")
        if out.numel():
            buf = memoryview(out.detach().reshape(-1).view(torch.uint8).numpy())
            offset = self._data_start + self._offsets[name][0] + elem * spec.dtype.itemsize
            try:
                self._pread_into(fd, buf, offset, f"tensor {name!r}")
            except OSError:
                if self._fd is None:  # closed by another thread while reading
                    raise ArtifactError(f"{self.path}: cannot read {name!r}: the reader is closed.") from None
                raise
        return out

    @staticmethod
    def _preadv(fd: int, buf: memoryview, offset: int) -> int:
        if hasattr(os, "preadv"):
            return os.preadv(fd, [buf], offset)  # straight into the caller's buffer
        data = os.pread(fd, len(buf), offset)  # platforms without preadv: one extra copy
        buf[: len(data)] = data
        return len(data)

    def _pread_into(self, fd: int, buf: memoryview, offset: int, what: str) -> None:
        """Fill ``buf`` from the file at ``offset``; positional, so threads may share the descriptor."""
        done, total = 0, len(buf)
        while done < total:  # the kernel may return less than asked (large reads, signals)
            got = self._preadv(fd, buf[done:], offset + done)
            if got == 0:
                raise ArtifactError(
                    f"{self.path}: truncated: reading {what} expected {total} bytes at offset {offset}, "
                    f"got {done} (the file shrank after it was opened?)."
                )
            done += got

    # -- the map --------------------------------------------------------------------------------

    def _view(self, name: str) -> torch.Tensor:
        spec = self.spec(name)
        if self._fd is None:
            raise ArtifactError(f"{self.path}: cannot read {name!r}: the reader is closed.")
        if spec.nbytes == 0:
            return torch.empty(spec.shape, dtype=spec.dtype)
        if self._mm is None:
            # One private (copy-on-write) map of the whole file: views are writable as far as
            # numpy/torch are concerned (no non-writable warning), but writes never reach the file.
            self._mm = mmap.mmap(self._fd, 0, access=mmap.ACCESS_COPY)
        begin = self._data_start + self._offsets[name][0]
        raw = np.frombuffer(self._mm, dtype=np.uint8, count=spec.nbytes, offset=begin)
        if begin % spec.dtype.itemsize:
            # Misaligned (possible only in files from other writers): copy rather than hand
            # kernels a misaligned pointer.
            raw = raw.copy()
        # Reinterpret bytes as the stored dtype (bf16 has no numpy dtype, so go through uint8).
        return torch.from_numpy(raw).view(spec.dtype).reshape(spec.shape)

    def checksum_problems(self) -> list[str]:
        """Tensors whose bytes do not hash to the checksum the writer recorded at finish() (META_CHECKSUMS);
        one problem when the checksums are missing or unreadable."""
        raw = self.metadata.get(META_CHECKSUMS)
        if raw is None:
            return [f"metadata {META_CHECKSUMS!r}: expected the tensors' checksums, got none"]
        try:
            stored = json.loads(raw)
            if not isinstance(stored, dict):
                raise ValueError
        except ValueError:
            return [f"metadata {META_CHECKSUMS!r}: expected a JSON object, got {raw[:60]!r}"]
        problems = []
        for name, want in sorted(stored.items()):
            if name == _METADATA_KEY:
                if _metadata_checksum(self.metadata) != want:
                    problems.append("metadata: it does not hash to the checksum recorded when it was written (edited "
                                    "after it was written)")
                continue
            if name not in self._offsets:
                problems.append(f"{name}: checksummed at finish, but the file has no such tensor")
                continue
            begin, end = self._offsets[name]
            if self._fd is None:
                raise ArtifactError(f"{self.path}: cannot verify: the reader is closed.")
            got = _hash_range(self._fd, self._data_start + begin, end - begin)
            if got != want:
                problems.append(f"{name}: its bytes do not hash to the checksum recorded when it was written "
                                "(the file changed after it was written)")
        return problems

    def release_pages(self) -> None:
        """Drop the map's resident pages (``madvise(MADV_DONTNEED)``): RSS falls back, tensors from
        ``reader[name]`` stay valid and re-read the file when next touched. In-place changes made
        to such tensors are discarded (they were private copies). No-op without a map."""
        with self._lock:
            if self._mm is not None and hasattr(mmap, "MADV_DONTNEED"):
                self._mm.madvise(mmap.MADV_DONTNEED)

    def close(self) -> None:
        """Close the file and drop the map. Tensors handed out earlier stay valid (views keep the
        map alive; copies are the caller's). Reading afterwards raises ArtifactError."""
        with self._lock:
            self._cache.clear()
            if self._mm is not None:
                try:
                    self._mm.close()
                except BufferError:
                    pass  # views still exported: the map closes when the last one is freed
                self._mm = None
            fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __del__(self) -> None:
        fd = getattr(self, "_fd", None)
        if fd is not None:
            self._fd = None
            with contextlib.suppress(OSError):
                os.close(fd)

    def __enter__(self) -> "TrajectoryReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TrajectoryReader({str(self.path)!r}, keys={self.keys()})"
