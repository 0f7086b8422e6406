"""The on-disk format of an artifact: safetensors layout, dtype names, tensor specs, digests and checksums.

File format (safetensors): 8-byte little-endian u64 header length N, N bytes of JSON header
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}`` padded
with spaces, then the data region (offsets are relative to its start, tensors contiguous).

What the writer (`storage.writer`) and the reader (`storage.reader`) share lives here. Importing this
module does not import torch (`analysis.summary` takes `DIGEST_ALGO` from here); the helpers that need
torch import it when called.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from flannel_repro.errors import ArtifactError

if TYPE_CHECKING:
    import numpy as np
    import torch


# --- digests ------------------------------------------------------------------------------------

DIGEST_ALGO = "blake2b-256"
DIGEST_SIZE = 32
# Metadata key: JSON {tensor name: blake2b-256 hex of its bytes} written at finish() from the bytes on
# disk, for every tensor the writer was not told is covered otherwise (per-row digests of W).
META_CHECKSUMS = "checksums"


# --- safetensors header and dtype names ---------------------------------------------------------

METADATA_KEY = "__metadata__"
MAX_HEADER = 100_000_000  # safetensors refuses larger headers

# safetensors dtype name -> torch attribute, in the order error messages list them; the last five
# exist only in some torch versions.
_DTYPE_ATTRS = (
    ("BOOL", "bool"),
    ("U8", "uint8"),
    ("I8", "int8"),
    ("I16", "int16"),
    ("I32", "int32"),
    ("I64", "int64"),
    ("F16", "float16"),
    ("BF16", "bfloat16"),
    ("F32", "float32"),
    ("F64", "float64"),
    ("U16", "uint16"),
    ("U32", "uint32"),
    ("U64", "uint64"),
    ("F8_E4M3", "float8_e4m3fn"),
    ("F8_E5M2", "float8_e5m2"),
)


@functools.lru_cache(maxsize=None)
def st_dtypes() -> dict[str, torch.dtype]:
    """safetensors dtype name -> torch dtype, for the dtypes this torch has (do not modify the result)."""
    import torch

    return {name: getattr(torch, attr) for name, attr in _DTYPE_ATTRS if hasattr(torch, attr)}


@functools.lru_cache(maxsize=None)
def torch_to_st() -> dict[torch.dtype, str]:
    """torch dtype -> safetensors dtype name (do not modify the result)."""
    return {v: k for k, v in st_dtypes().items()}


def require_little_endian() -> None:
    # safetensors is little-endian; we write and map native bytes, so the host must be too.
    if sys.byteorder != "little":
        raise ArtifactError(
            f"safetensors files are little-endian; this host is {sys.byteorder}-endian (not supported)."
        )


def check_metadata(metadata: Mapping[str, Any], where: str) -> dict[str, str]:
    bad = {k: type(v).__name__ for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)}
    if bad:
        raise ArtifactError(
            f"{where}: metadata keys and values must be str (safetensors stores str -> str); got non-str for {bad}."
        )
    return dict(metadata)


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


# --- digests and checksums ----------------------------------------------------------------------


def raw_bytes(t: torch.Tensor) -> np.ndarray:
    """The tensor's bytes as a flat uint8 numpy array (CPU, contiguous; no copy when already so)."""
    import torch

    flat = t.detach().to("cpu").contiguous().reshape(-1)
    # view(uint8) reinterprets bits (bf16 has no numpy dtype); bool is already one byte per element.
    return flat.view(torch.uint8).numpy()


def digest_tensor(t: torch.Tensor) -> bytes:
    """blake2b-256 of the tensor's raw bytes (CPU, contiguous, native little-endian layout)."""
    # numpy's stubs give ndarray a buffer (__buffer__) only for Python >= 3.12
    return hashlib.blake2b(memoryview(raw_bytes(t)), digest_size=DIGEST_SIZE).digest()  # type: ignore[arg-type]


def digest_as_tensor(digest: bytes) -> torch.Tensor:
    """A digest as a (32,) uint8 tensor, ready for ``writer.write_row(KEY_DIGESTS, t, ...)``."""
    import torch

    if len(digest) != DIGEST_SIZE:
        raise ArtifactError(f"digest: expected {DIGEST_SIZE} bytes, got {len(digest)}.")
    return torch.tensor(list(digest), dtype=torch.uint8)


def metadata_checksum(metadata: Mapping[str, str]) -> str:
    """blake2b-256 hex of the metadata without its checksums entry (canonical JSON)."""
    rest = {k: v for k, v in metadata.items() if k != META_CHECKSUMS}
    return hashlib.blake2b(json.dumps(rest, sort_keys=True).encode(), digest_size=DIGEST_SIZE).hexdigest()


def hash_range(fd: int, offset: int, length: int) -> str:
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


# --- durability ---------------------------------------------------------------------------------


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
