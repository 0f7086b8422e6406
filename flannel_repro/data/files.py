"""Data files: hashing, the token-id cache, the tokenizer, the corpus text and the live/dead token mask.

Every file is hashed, and every mismatch with the config is a `DataError` that names the file.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from flannel_repro.safeio import read_regular
from flannel_repro.errors import DataCacheWarning, DataError, DataWarning

if TYPE_CHECKING:
    from tokenizers import Tokenizer

MASK_KEYS = ("dead_indices", "dead_mask", "live_mask")


def cache_dir() -> Path:
    """Where derived data (tokenised corpora, generated embedded data) is cached.

    `FLANNEL_REPRO_CACHE` overrides; the default follows XDG (`~/.cache/flannel-repro`).
    """
    env = os.environ.get("FLANNEL_REPRO_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "flannel-repro"


_FILE_HASHES: dict[str, tuple[tuple[int, int, int], str]] = {}


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of a file's bytes; remembered per process while its inode, size and mtime stay the same
    (every run lookup hashes the data files, and a test session makes hundreds of lookups)."""
    st = os.stat(path)
    sig = (st.st_ino, st.st_size, st.st_mtime_ns)
    key = os.path.abspath(path)
    hit = _FILE_HASHES.get(key)
    if hit is not None and hit[0] == sig:
        return hit[1]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    _FILE_HASHES[key] = (sig, h.hexdigest())
    return h.hexdigest()


# A data file may take at most this share of physical memory: decoding and tokenising take several times its size.
MEMORY_SHARE = 16


def memory_limit() -> tuple[int, int] | None:
    """(the largest data file read, this machine's physical memory) in bytes; None where unknown."""
    try:
        phys = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None
    return (phys // MEMORY_SHARE, phys) if phys > 0 else None


def read_bytes(path: Path, what: str, *, guard_memory: bool = True) -> bytes:
    """The bytes of a data file (links followed): a regular file only, so a FIFO or device never blocks or
    fills memory, and at most `memory_limit()` bytes when `guard_memory`."""
    limit = memory_limit() if guard_memory else None
    why = (
        (
            f" (1/{MEMORY_SHARE} of this machine's {limit[1]} bytes of memory: reading and tokenising take several "
            "times a file's size)"
        )
        if limit
        else ""
    )
    try:
        return read_regular(path, f"a {what} file", DataError, max_bytes=limit[0] if limit else None, limit_reason=why)
    except FileNotFoundError:
        raise DataError(f"{what} file {str(path)!r} does not exist.") from None


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Write `payload` to `path` via a temporary file and rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --- tokenizer ---------------------------------------------------------------------------------


def load_tokenizer(path: str | os.PathLike[str], vocab_size: int | None = None) -> "Tokenizer":
    """Load a `tokenizers` JSON file; check its vocabulary size against the config's."""
    from tokenizers import Tokenizer

    p = Path(path)
    raw = read_bytes(p, "tokenizer")
    try:
        tok = Tokenizer.from_str(raw.decode("utf-8"))
    except Exception as exc:  # noqa: BLE001 (tokenizers raises a bare Exception on malformed JSON)
        raise DataError(f"tokenizer file {str(p)!r} is not a valid `tokenizers` JSON file: {exc}.") from None
    got = tok.get_vocab_size(with_added_tokens=True)
    if vocab_size is not None and got != vocab_size:
        raise DataError(
            f"tokenizer {str(p)!r} has {got} tokens but the config's 'vocab_size' is {vocab_size}; "
            f"set vocab_size = {got} or use a matching tokenizer."
        )
    return tok


# --- corpus ------------------------------------------------------------------------------------


def load_corpus_text(path: str | os.PathLike[str]) -> str:
    """Read a corpus as strict UTF-8; a bad byte is reported with its offset."""
    p = Path(path)
    raw = read_bytes(p, "corpus")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"corpus {str(p)!r} is not valid UTF-8: byte {raw[exc.start]:#04x} at offset {exc.start} ({exc.reason})."
        ) from None


def tokenize(
    tokenizer: "Tokenizer", text: str, *, vocab_size: int, source: str = "corpus", allow_unknown: bool = False
) -> np.ndarray:
    """Encode `text` to int32 ids and check every id is in [0, vocab_size) and none is the unknown token
    (text the tokenizer cannot represent would otherwise train silently as '[UNK]'). With
    `allow_unknown` the unknown tokens are kept, with a warning giving their count."""
    ids, unknown = _encode(tokenizer, text, vocab_size=vocab_size, source=source)
    if unknown is not None:
        count, total, what, start, unk = unknown
        said = (
            f"{source}: {count} of {total} tokens are the unknown token {unk!r}: the tokenizer has no token for "
            f"{what!r} (first at character {start})"
        )
        if not allow_unknown:
            raise DataError(
                f"{said}. Add it to the tokenizer's vocabulary, remove it from the corpus, or accept it "
                "with allow_unknown_tokens = true in the run config."
            )
        import warnings

        warnings.warn(f"{said}; they are trained as {unk!r} (allow_unknown_tokens)", DataWarning, stacklevel=2)
    return ids


def _encode(
    tokenizer: "Tokenizer", text: str, *, vocab_size: int, source: str
) -> tuple[np.ndarray, tuple[int, int, str, int, str] | None]:
    """(int32 ids, None or (unknown count, token count, first unknown text, its character offset, unk token))."""
    encoding = tokenizer.encode(text, add_special_tokens=False)
    ids = np.asarray(encoding.ids, dtype=np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        bad = int(ids[(ids < 0) | (ids >= vocab_size)][0])
        raise DataError(
            f"{source}: the tokenizer produced id {bad}, outside [0, {vocab_size}) = the config's vocab_size."
        )
    unk = getattr(tokenizer.model, "unk_token", None)
    unk_id = tokenizer.token_to_id(unk) if unk else None
    unknown = None
    if unk_id is not None and ids.size:
        hits = np.flatnonzero(ids == unk_id)
        if hits.size:
            start, end = encoding.offsets[int(hits[0])]
            unknown = (int(hits.size), int(ids.size), text[start:end], int(start), str(unk))
    return ids.astype(np.int32), unknown


def cached_token_ids(
    tokenizer_path: Path,
    corpus_path: Path,
    *,
    vocab_size: int,
    tokenizer_sha256: str,
    corpus_sha256: str,
    allow_unknown: bool = False,
) -> np.ndarray:
    """Token ids of the corpus, cached under the hashes of tokenizer and corpus.

    The first load tokenises (about a second for 1.4 M characters); later loads read the cache file,
    which is a blake2b-256 digest followed by a .npy payload. An entry whose payload does not hash to
    its digest (a flipped bit would otherwise train on other tokens under the same run key) is rebuilt.
    A cache that cannot be written (full or read-only disk) costs the next load a tokenisation, no
    more: the ids are returned all the same, with a warning. Only corpora without unknown tokens are
    cached, so a cache hit never skips the unknown-token check.
    """
    path = cache_dir() / "tokens" / f"{tokenizer_sha256[:24]}-{corpus_sha256[:24]}.ids"
    ids = _read_token_cache(path)
    if ids is not None:
        return ids
    tok = load_tokenizer(tokenizer_path, vocab_size)
    text = load_corpus_text(corpus_path)
    ids, unknown = _encode(tok, text, vocab_size=vocab_size, source=str(corpus_path))
    if unknown is not None:  # raises, or warns and trains them as the unknown token; either way, not cached
        return tokenize(tok, text, vocab_size=vocab_size, source=str(corpus_path), allow_unknown=allow_unknown)
    import io

    buf = io.BytesIO()
    np.save(buf, ids, allow_pickle=False)
    payload = buf.getvalue()
    try:
        atomic_write_bytes(path, hashlib.blake2b(payload, digest_size=32).digest() + payload)
    except OSError as exc:
        import warnings

        warnings.warn(
            f"{path}: could not cache the corpus's token ids ({exc.strerror or exc}); they are "
            "tokenised again next time",
            DataCacheWarning,
            stacklevel=2,
        )
    return ids


def _read_token_cache(path: Path) -> np.ndarray | None:
    """The cached ids, or None when the entry is missing, damaged or not what a cache entry holds."""
    import io

    try:
        raw = read_bytes(path, "token cache", guard_memory=False)  # a FIFO or device planted there is skipped
    except DataError:
        return None
    digest, payload = raw[:32], raw[32:]
    if len(raw) <= 32 or hashlib.blake2b(payload, digest_size=32).digest() != digest:
        return None
    try:
        ids = np.load(io.BytesIO(payload), allow_pickle=False)
    except (OSError, ValueError):
        return None
    return ids if ids.dtype == np.int32 and ids.ndim == 1 else None


# --- live / dead token mask ----------------------------------------------------------------------


@dataclass(frozen=True)
class TokenMask:
    """Which vocabulary entries occur in the corpus (live) and which never do (dead)."""

    live_mask: torch.Tensor  # (V,) bool
    dead_mask: torch.Tensor  # (V,) bool
    dead_indices: torch.Tensor  # (n_dead,) int64

    @property
    def n_live(self) -> int:
        return int(self.live_mask.sum())

    @property
    def n_dead(self) -> int:
        return int(self.dead_mask.sum())

    @property
    def vocab_size(self) -> int:
        return int(self.live_mask.numel())

    def to_dict(self) -> dict[str, torch.Tensor]:
        return {"dead_indices": self.dead_indices, "dead_mask": self.dead_mask, "live_mask": self.live_mask}


def compute_token_mask(ids: np.ndarray | torch.Tensor, vocab_size: int) -> TokenMask:
    """Live = the id occurs at least once in the corpus; dead = never occurs."""
    ids_t = torch.as_tensor(np.asarray(ids), dtype=torch.long)
    counts = torch.bincount(ids_t, minlength=vocab_size)
    if counts.numel() > vocab_size:
        raise DataError(f"corpus ids reach {counts.numel() - 1}, outside vocab_size {vocab_size}.")
    live = counts > 0
    dead = ~live
    return TokenMask(live_mask=live, dead_mask=dead, dead_indices=torch.nonzero(dead).flatten().to(torch.long))


def save_token_mask(mask: TokenMask, path: str | os.PathLike[str]) -> None:
    from safetensors.torch import save

    atomic_write_bytes(Path(path), save({k: v.contiguous() for k, v in mask.to_dict().items()}))


def load_token_mask(path: str | os.PathLike[str], vocab_size: int) -> TokenMask:
    """Load the notebook's mask file (keys dead_indices, dead_mask, live_mask) and check it is consistent."""
    from safetensors.torch import load

    p = Path(path)
    raw = read_bytes(p, "token mask")
    try:
        data = load(raw)
    except Exception as exc:  # noqa: BLE001 (safetensors raises its own error types)
        raise DataError(f"token mask {str(p)!r} is not a safetensors file: {exc}.") from None
    missing = [k for k in MASK_KEYS if k not in data]
    if missing:
        raise DataError(
            f"token mask {str(p)!r} lacks key(s) {missing}; expected {list(MASK_KEYS)}, got {sorted(data)}."
        )
    live, dead, idx = data["live_mask"], data["dead_mask"], data["dead_indices"]
    for name, t in (("live_mask", live), ("dead_mask", dead)):
        if t.shape != (vocab_size,):
            raise DataError(
                f"token mask {str(p)!r}: {name!r} has shape {tuple(t.shape)}, expected ({vocab_size},) = (vocab_size,)."
            )
    live, dead = live.bool(), dead.bool()
    if bool((live == dead).any()):
        raise DataError(
            f"token mask {str(p)!r}: 'live_mask' and 'dead_mask' must be complements; they agree at "
            f"{int((live == dead).sum())} positions."
        )
    idx = idx.to(torch.long).flatten()
    if not torch.equal(idx, torch.nonzero(dead).flatten()):
        raise DataError(f"token mask {str(p)!r}: 'dead_indices' does not list the positions where 'dead_mask' is true.")
    return TokenMask(live_mask=live, dead_mask=dead, dead_indices=idx)
