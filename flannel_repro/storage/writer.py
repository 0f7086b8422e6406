"""The artifact writer: a pre-sized safetensors file written in place, row by row, and published atomically.

Guarantees:

* The file is written under a temporary name ``<final>.partial-<pid>-<random>`` in the same
  directory (`storage.partials`) and appears under its final name only through an atomic
  ``os.replace`` in :meth:`ArtifactWriter.finish`, after an fsync. A crash leaves at most the partial file.
* The partial file's header-length field stays zero until ``finish``, so even a pre-sized,
  structurally complete-looking partial file is rejected by :class:`~flannel_repro.storage.reader.ArtifactReader`.
* Rows go straight to the file descriptor with ``os.pwrite``; memory does not grow with the
  number of rows written.

The format itself (header, dtype names, digests, checksums) is `storage.format`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import shutil
from pathlib import Path
from types import TracebackType
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from flannel_repro import safeio
from flannel_repro.errors import ArtifactError, ResumeError
from flannel_repro.storage.format import (
    DIGEST_SIZE,
    MAX_HEADER,
    META_CHECKSUMS,
    METADATA_KEY,
    TensorSpec,
    check_metadata,
    fsync_dir,
    hash_range,
    metadata_checksum,
    raw_bytes,
    require_little_endian,
    torch_to_st,
)
from flannel_repro.storage.partials import partial_path

# A disk (or quota, or the process's file-size limit) that cannot take the artifact.
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


class ArtifactWriter:
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
        self.metadata = check_metadata(metadata, str(self.path))
        if reserve_metadata_bytes < 0:
            raise ArtifactError(f"{self.path}: reserve_metadata_bytes must be >= 0 (got {reserve_metadata_bytes}).")
        self.reserve_metadata_bytes = int(reserve_metadata_bytes)
        seen: set[str] = set()
        for s in specs:
            if not isinstance(s, TensorSpec):
                raise ArtifactError(f"{self.path}: specs must be TensorSpec (got {type(s).__name__}).")
            if s.name in seen or s.name == METADATA_KEY or not s.name:
                raise ArtifactError(f"{self.path}: tensor name {s.name!r} is empty, reserved or given twice.")
            if s.dtype not in torch_to_st():
                raise ArtifactError(
                    f"{self.path}: tensor {s.name!r} has dtype {s.dtype}, which safetensors cannot store "
                    f"(supported: {', '.join(str(d) for d in torch_to_st())})."
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
        header: dict[str, Any] = {METADATA_KEY: dict(metadata)} if metadata else {}
        for name, s in self.specs.items():
            begin, end = self._offsets[name]
            header[name] = {"dtype": torch_to_st()[s.dtype], "shape": list(s.shape), "data_offsets": [begin, end]}
        return json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode("ascii")

    def _padded(self, body: bytes) -> bytes:
        return body + b" " * (self._header_len - len(body))

    # -- lifecycle ------------------------------------------------------------------------------

    def _initial_header(self) -> bytes:
        # the checksums written at finish() have a fixed length: their room is part of the header from the start
        placeholder = {
            n: "0" * 2 * DIGEST_SIZE for n in [*self._offsets, METADATA_KEY] if n not in self.checksum_exclude
        }
        body = self._header_json({**self.metadata, META_CHECKSUMS: json.dumps(placeholder, sort_keys=True)})
        # Header length: JSON + reserved room for more metadata, rounded so 8 + N is a multiple of 8
        # (keeps the data region 8-byte aligned, as safetensors' own writer does).
        n = len(body) + self.reserve_metadata_bytes
        n += (-(8 + n)) % 8
        if n > MAX_HEADER:
            raise ArtifactError(f"{self.path}: header would be {n} bytes; safetensors accepts at most {MAX_HEADER}.")
        self._header_len = n
        return body

    def reopen(self, completed: Mapping[str, int | None], digests: Mapping[str, str] | None = None) -> "ArtifactWriter":
        """Enter by adopting the temporary file an earlier writer of this artifact left (a resumed run):
        same specs and metadata, checked byte for byte against the header this writer would write.
        `completed` says what is already written: name -> number of leading rows, or None for the whole
        tensor. `digests` (from `prefix_digests` when the checkpoint was taken): what those rows must hash
        to; a file whose written part changed since is refused (ResumeError). The rest is written as usual;
        finish() checks that everything was."""
        require_little_endian()
        if self._fd is not None or self._finished:
            raise ArtifactError(f"{self.path}: an ArtifactWriter can be entered only once.")
        if self._fixed_temp is None:
            raise ArtifactError(f"{self.path}: reopen() needs the writer's fixed temporary path (temp_path=...).")
        body = self._initial_header()
        expected_size = 8 + self._header_len + self._data_len
        try:
            fd = safeio.open_nofollow(
                self._fixed_temp, os.O_RDWR, what="the partial artifact to resume", error=ResumeError
            )
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
            raise ResumeError(
                f"{self._fixed_temp}: expected a partial artifact of this run ({expected_size} bytes with "
                f"this header), got {size} bytes with {'another' if size == expected_size else 'a'} header; "
                "it cannot be resumed."
            )
        self.temp_path, self._fd = self._fixed_temp, fd
        if digests is not None:
            got = self.prefix_digests(completed)
            changed = sorted(n for n in completed if got.get(n) != digests.get(n))
            if changed:
                os.close(fd)
                self.temp_path, self._fd = None, None
                raise ResumeError(
                    f"{self._fixed_temp}: the rows written before the checkpoint no longer hash to the "
                    f"digests the checkpoint recorded ({', '.join(changed)}): the partial file changed "
                    "on disk; it cannot be resumed."
                )
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
                    raise ArtifactError(
                        f"{self.temp_path}: expected {chunk} bytes of {name!r} at offset {base + done}, "
                        f"read {len(data)}; the partial file is shorter than its header says."
                    )
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

    def __enter__(self) -> "ArtifactWriter":
        require_little_endian()
        if self._fd is not None or self._finished:
            raise ArtifactError(f"{self.path}: an ArtifactWriter can be entered only once.")
        body = self._initial_header()
        n = self._header_len
        directory = self.path.parent if str(self.path.parent) else Path(".")
        if not directory.is_dir():
            raise ArtifactError(f"{self.path}: expected an existing directory {directory}, found none.")
        size = 8 + n + self._data_len
        free = shutil.disk_usage(directory).free
        if free < size:  # refuse up front rather than fail halfway through training
            raise ArtifactError(
                f"{self.path}: the artifact needs {_mb(size)}, and the file system of {directory} has "
                f"{_mb(free)} free. Free some space (flannel-repro prune) or point the artifacts "
                "elsewhere (--flannel-artifacts)."
            )
        self.temp_path = self._fixed_temp or partial_path(self.path)
        if self._fixed_temp is not None:
            self._fixed_temp.unlink(missing_ok=True)  # a fresh start replaces what a killed run left
        # O_EXCL and O_NOFOLLOW: never through a link or over a file someone planted under this name
        self._fd = safeio.open_nofollow(
            self.temp_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644, what="a partial artifact"
        )
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
        return ArtifactError(
            f"{self.path}: out of space while {doing} ({exc.strerror}): the artifact needs "
            f"{_mb(8 + self._header_len + self._data_len)} and {where} has "
            f"{_mb(shutil.disk_usage(where).free)} free{limit}. Nothing was published; free some "
            "space (flannel-repro prune) or point the artifacts elsewhere (--flannel-artifacts)."
        )

    def _pwrite(self, data: bytes | memoryview | np.ndarray, offset: int) -> None:
        assert self._fd is not None
        # numpy's stubs give ndarray a buffer (__buffer__) only for Python >= 3.12
        view = memoryview(data).cast("B")  # type: ignore[arg-type]
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
        return {
            name: hash_range(self._fd, data_start + begin, end - begin)
            for name, (begin, end) in sorted(self._offsets.items())
            if name not in self.checksum_exclude
        }

    def _require_open(self, what: str) -> None:
        if self._fd is None:
            state = "finished" if self._finished else "not entered (use `with ArtifactWriter(...) as w:`)"
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
            raise ArtifactError(
                f"{self.path}: tensor {s.name!r}: expected a torch.Tensor, got {type(tensor).__name__}."
            )
        expected_shape = s.shape[len(idx) :]
        where = f"{s.name}[{', '.join(map(str, idx))}]" if idx else s.name
        if tensor.dtype != s.dtype:
            raise ArtifactError(f"{self.path}: {where}: expected dtype {s.dtype}, got {tensor.dtype}.")
        if tuple(tensor.shape) != expected_shape:
            raise ArtifactError(f"{self.path}: {where}: expected shape {expected_shape}, got {tuple(tensor.shape)}.")
        # Row-major: the block at leading index idx starts at sum(idx[k] * stride_k) elements.
        elem = 0
        for k, i in enumerate(idx):
            elem += i * math.prod(s.shape[k + 1 :])
        begin, _ = self._offsets[s.name]
        if tensor.numel():
            self._pwrite(raw_bytes(tensor), 8 + self._header_len + begin + elem * s.dtype.itemsize)
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
            metadata.update(check_metadata(extra_metadata, str(self.path)))
        if not allow_unwritten:
            missing = self.unwritten()
            if missing:
                raise ArtifactError(
                    f"{self.path}: expected every row written before finish(), got rows never written: {missing} "
                    "(write them, or pass allow_unwritten=True to keep zeros)."
                )
        metadata[META_CHECKSUMS] = json.dumps(
            {**self._checksums(), METADATA_KEY: metadata_checksum(metadata)}, sort_keys=True
        )
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
