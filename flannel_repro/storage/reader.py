"""The artifact reader: a lazy reader of a safetensors file, with positional reads and a memory map.

One copy-on-write memory map per file, made on first use; ``reader["W"][t]`` touches only the pages of
row ``t``; nothing a caller does to a returned tensor ever reaches the file. A file that an
`ArtifactWriter` has not finished (its header length still zero) is refused.

The format itself (header, dtype names, digests, checksums) is `storage.format`.
"""

from __future__ import annotations

import contextlib
import json
import math
import mmap
import operator
import os
import stat
import threading
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from flannel_repro import safeio
from flannel_repro.errors import ArtifactError
from flannel_repro.storage.format import (
    MAX_HEADER,
    META_CHECKSUMS,
    METADATA_KEY,
    TensorSpec,
    check_metadata,
    hash_range,
    metadata_checksum,
    require_little_endian,
    st_dtypes,
)
from flannel_repro.storage.jsonfile import MAX_DEPTH, check_depth


class ArtifactReader:
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
        require_little_endian()
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
            raise ArtifactError(
                f"{self.path}: expected a safetensors file, could not open it ({exc.strerror or exc})."
            ) from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ArtifactError(
                    f"{self.path}: expected a safetensors file (a regular file), got {safeio.kind(st.st_mode)}."
                )
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
                    "(an ArtifactWriter that has not finished, or was killed, leaves it zero)."
                )
            if n > MAX_HEADER:
                raise ArtifactError(
                    f"{self.path}: expected a header length of at most {MAX_HEADER} bytes, got {n} (not a safetensors file?)."
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
            raise ArtifactError(
                f"{self.path}: expected a JSON header nested at most {MAX_DEPTH} levels deep, got deeper nesting."
            ) from None
        if not isinstance(header, dict):
            raise ArtifactError(f"{self.path}: expected a JSON object header, got {type(header).__name__}.")
        meta = header.pop(METADATA_KEY, None) or {}
        if not isinstance(meta, dict):
            raise ArtifactError(f"{self.path}: expected __metadata__ to be an object, got {type(meta).__name__}.")
        self.metadata: dict[str, str] = check_metadata(meta, str(self.path))
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
            if dtype_name not in st_dtypes():
                raise ArtifactError(
                    f"{self.path}: tensor {name!r}: expected a dtype among {', '.join(st_dtypes())}, got {dtype_name!r}."
                )
            if not all(isinstance(d, int) and d >= 0 for d in shape):
                raise ArtifactError(
                    f"{self.path}: tensor {name!r}: expected non-negative int dims, got shape {list(shape)}."
                )
            if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end):
                raise ArtifactError(f"{self.path}: tensor {name!r}: bad data_offsets {[begin, end]}.")
            spec = TensorSpec(name, st_dtypes()[dtype_name], shape)
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
            elem += (i % dim) * math.prod(spec.shape[axis + 1 :])
        rest = spec.shape[len(idx) :]
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
            # numpy's stubs give ndarray a buffer (__buffer__) only for Python >= 3.12
            buf = memoryview(out.detach().reshape(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]
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
            if name == METADATA_KEY:
                if metadata_checksum(self.metadata) != want:
                    problems.append(
                        "metadata: it does not hash to the checksum recorded when it was written (edited "
                        "after it was written)"
                    )
                continue
            if name not in self._offsets:
                problems.append(f"{name}: checksummed at finish, but the file has no such tensor")
                continue
            begin, end = self._offsets[name]
            if self._fd is None:
                raise ArtifactError(f"{self.path}: cannot verify: the reader is closed.")
            got = hash_range(self._fd, self._data_start + begin, end - begin)
            if got != want:
                problems.append(
                    f"{name}: its bytes do not hash to the checksum recorded when it was written "
                    "(the file changed after it was written)"
                )
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

    def __enter__(self) -> "ArtifactReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ArtifactReader({str(self.path)!r}, keys={self.keys()})"
