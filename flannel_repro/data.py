"""Tokenizer, corpus, live/dead token mask and the explicit, seeded example order.

The notebook's data pipeline, made checkable: every file is hashed, every mismatch with the config is
a `DataError` that names the file, and the order in which examples are seen is an object built from
`data_seed` that equals what the transformers Trainer does (accelerate's seedable sampler: one
`torch.randperm` over all examples from a generator seeded with `data_seed + epoch`).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np
import torch

from flannel_repro.errors import DataError

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from flannel_repro.config import RunConfig

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


def _read_bytes(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{what} file {str(path)!r} does not exist.") from None
    except IsADirectoryError:
        raise DataError(f"{what} path {str(path)!r} is a directory; expected a file.") from None
    except OSError as exc:
        raise DataError(f"{what} file {str(path)!r} could not be read: {exc.strerror}.") from None


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
    raw = _read_bytes(p, "tokenizer")
    try:
        tok = Tokenizer.from_str(raw.decode("utf-8"))
    except Exception as exc:  # tokenizers raises a bare Exception on malformed JSON
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
    raw = _read_bytes(p, "corpus")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"corpus {str(p)!r} is not valid UTF-8: byte {raw[exc.start]:#04x} at offset {exc.start} ({exc.reason})."
        ) from None


def tokenize(tokenizer: "Tokenizer", text: str, *, vocab_size: int, source: str = "corpus") -> np.ndarray:
    """Encode `text` to int32 ids and check every id is in [0, vocab_size)."""
    ids = np.asarray(tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        bad = int(ids[(ids < 0) | (ids >= vocab_size)][0])
        raise DataError(f"{source}: the tokenizer produced id {bad}, outside [0, {vocab_size}) = the config's vocab_size.")
    return ids.astype(np.int32)


def cached_token_ids(tokenizer_path: Path, corpus_path: Path, *, vocab_size: int,
                     tokenizer_sha256: str, corpus_sha256: str) -> np.ndarray:
    """Token ids of the corpus, cached under the hashes of tokenizer and corpus.

    The first load tokenises (about a second for 1.4 M characters); later loads read a .npy file.
    """
    path = cache_dir() / "tokens" / f"{tokenizer_sha256[:24]}-{corpus_sha256[:24]}.npy"
    if path.exists():
        try:
            ids = np.load(path, allow_pickle=False)
            if ids.dtype == np.int32 and ids.ndim == 1:
                return ids
        except (OSError, ValueError):
            pass  # a damaged cache entry is rebuilt below
    tok = load_tokenizer(tokenizer_path, vocab_size)
    ids = tokenize(tok, load_corpus_text(corpus_path), vocab_size=vocab_size, source=str(corpus_path))
    import io

    buf = io.BytesIO()
    np.save(buf, ids, allow_pickle=False)
    atomic_write_bytes(path, buf.getvalue())
    return ids


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
    raw = _read_bytes(p, "token mask")
    try:
        data = load(raw)
    except Exception as exc:
        raise DataError(f"token mask {str(p)!r} is not a safetensors file: {exc}.") from None
    missing = [k for k in MASK_KEYS if k not in data]
    if missing:
        raise DataError(f"token mask {str(p)!r} lacks key(s) {missing}; expected {list(MASK_KEYS)}, got {sorted(data)}.")
    live, dead, idx = data["live_mask"], data["dead_mask"], data["dead_indices"]
    for name, t in (("live_mask", live), ("dead_mask", dead)):
        if t.shape != (vocab_size,):
            raise DataError(f"token mask {str(p)!r}: {name!r} has shape {tuple(t.shape)}, expected ({vocab_size},) = (vocab_size,).")
    live, dead = live.bool(), dead.bool()
    if bool((live == dead).any()):
        raise DataError(f"token mask {str(p)!r}: 'live_mask' and 'dead_mask' must be complements; they agree at "
                        f"{int((live == dead).sum())} positions.")
    idx = idx.to(torch.long).flatten()
    if not torch.equal(idx, torch.nonzero(dead).flatten()):
        raise DataError(f"token mask {str(p)!r}: 'dead_indices' does not list the positions where 'dead_mask' is true.")
    return TokenMask(live_mask=live, dead_mask=dead, dead_indices=idx)


# --- the data bundle one run needs -----------------------------------------------------------------

@dataclass(frozen=True)
class DataFiles:
    tokenizer: Path
    corpus: Path
    token_mask: Path | None
    origin: str  # "embedded:<variant>" or "user"


def data_files(config: "RunConfig") -> DataFiles:
    """The files a config points at: the user's, or the embedded data set (built and verified on demand)."""
    if config.tokenizer_path is not None:
        return DataFiles(Path(config.tokenizer_path), Path(config.corpus_path),  # type: ignore[arg-type]
                         Path(config.token_mask_path) if config.token_mask_path else None, "user")
    from flannel_repro import datagen

    paths = datagen.embedded_paths(config.dataset)
    return DataFiles(paths.tokenizer, paths.corpus, paths.token_mask, f"embedded:{config.dataset}")


@dataclass(frozen=True)
class CorpusData:
    """Token ids plus everything needed to cite them: file hashes and the live/dead mask."""

    ids: torch.Tensor  # (N,) int64 token ids of the whole corpus
    mask: TokenMask
    files: DataFiles
    hashes: dict[str, str]  # tokenizer / corpus / token_mask sha256

    @property
    def n_tokens(self) -> int:
        return int(self.ids.numel())

    def n_examples(self, seq_len: int) -> int:
        # The notebook's TokenDataset: example i is ids[i : i + seq_len + 1].
        return max(0, self.n_tokens - seq_len)

    def describe(self) -> dict[str, object]:
        return {**{f"{k}_sha256": v for k, v in self.hashes.items()}, "origin": self.files.origin,
                "n_tokens": self.n_tokens, "n_live": self.mask.n_live, "n_dead": self.mask.n_dead}


_LOADED: dict[tuple, CorpusData] = {}


def load_data(config: "RunConfig") -> CorpusData:
    """Load (and cache in-process) the tokenizer, corpus and mask a config names; validate against it."""
    files = data_files(config)
    tok_hash = file_sha256(files.tokenizer) if files.tokenizer.is_file() else None
    if tok_hash is None:
        _read_bytes(files.tokenizer, "tokenizer")  # raises the clear error
    corpus_hash = file_sha256(files.corpus) if files.corpus.is_file() else None
    if corpus_hash is None:
        _read_bytes(files.corpus, "corpus")
    mask_hash = file_sha256(files.token_mask) if files.token_mask is not None and files.token_mask.is_file() else None
    if files.token_mask is not None and mask_hash is None:
        _read_bytes(files.token_mask, "token mask")
    # The paths are part of the key: the same bytes under another name are another origin to report.
    key = (files, tok_hash, corpus_hash, mask_hash, config.vocab_size)
    hit = _LOADED.get(key)
    if hit is None:
        load_tokenizer(files.tokenizer, config.vocab_size)  # vocabulary check even when the ids are cached
        ids = cached_token_ids(files.tokenizer, files.corpus, vocab_size=config.vocab_size,
                               tokenizer_sha256=tok_hash, corpus_sha256=corpus_hash)  # type: ignore[arg-type]
        mask = (load_token_mask(files.token_mask, config.vocab_size) if files.token_mask is not None
                else compute_token_mask(ids, config.vocab_size))
        hashes = {"tokenizer": tok_hash, "corpus": corpus_hash}
        if mask_hash is not None:
            hashes["token_mask"] = mask_hash
        hit = _LOADED[key] = CorpusData(ids=torch.from_numpy(ids.astype(np.int64)), mask=mask, files=files,
                                        hashes=hashes)  # type: ignore[arg-type]
    check_corpus_fits(hit, config)
    return hit


def check_corpus_fits(data: CorpusData, config: "RunConfig") -> None:
    if data.n_tokens < config.seq_len + 1:
        raise DataError(
            f"corpus {str(data.files.corpus)!r} has {data.n_tokens} tokens; 'seq_len' = {config.seq_len} needs at "
            f"least seq_len + 1 = {config.seq_len + 1}."
        )
    n = data.n_examples(config.seq_len)
    if config.batch_size > n:
        raise DataError(f"'batch_size' = {config.batch_size} exceeds the corpus's {n} examples of seq_len {config.seq_len}.")


# --- example order -------------------------------------------------------------------------------

class DataOrder:
    """The order in which examples are seen: the Trainer's, made explicit.

    Epoch e is `torch.randperm(n_examples, generator=Generator().manual_seed(seed + e))` (accelerate's
    SeedableRandomSampler); batches are consecutive slices of `batch_size`, the last one of an epoch
    shorter when it does not divide (DataLoader with drop_last=False). Steps count from 1, as the
    trajectory does: `batch(1)` is the batch of the first optimizer step.
    """

    def __init__(self, n_examples: int, batch_size: int, seed: int) -> None:
        if n_examples < 1:
            raise DataError(f"DataOrder needs at least one example (got n_examples={n_examples}).")
        self.n_examples = n_examples
        self.batch_size = batch_size
        self.seed = seed
        self._batches_per_epoch = -(-n_examples // batch_size)
        self._perms: dict[int, torch.Tensor] = {}

    def permutation(self, epoch: int = 0) -> torch.Tensor:
        perm = self._perms.get(epoch)
        if perm is None:
            g = torch.Generator(device="cpu")
            g.manual_seed(self.seed + epoch)
            perm = torch.randperm(self.n_examples, generator=g)
            self._perms = {epoch: perm}  # keep only the current epoch: O(n_examples) memory
        return perm

    def batch(self, step: int) -> torch.Tensor:
        """Start indices (B,) of the examples used by optimizer step `step` (1-based)."""
        if step < 1:
            raise ValueError(f"steps count from 1 (got {step}).")
        epoch, k = divmod(step - 1, self._batches_per_epoch)
        return self.permutation(epoch)[k * self.batch_size:(k + 1) * self.batch_size]

    def batches(self, steps: int) -> Iterator[torch.Tensor]:
        for step in range(1, steps + 1):
            yield self.batch(step)


def make_batch(ids: torch.Tensor, starts: torch.Tensor, seq_len: int, label_mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Input ids and labels (both (B, T)) for examples starting at `starts`.

    GPT2LMHeadModel shifts labels by one itself. `next_token` passes labels = input_ids, so position t
    is trained on token t+1. `notebook` reproduces the notebook's `labels=chunk[1:]`, which the model
    shifts again: position t is trained on token t+2.
    """
    offsets = torch.arange(seq_len + 1)
    chunks = ids[starts[:, None] + offsets[None, :]]  # (B, T+1)
    inputs = chunks[:, :-1]  # (B, T)
    labels = chunks[:, 1:] if label_mode == "notebook" else inputs
    return inputs, labels


class TokenDataset(torch.utils.data.Dataset):
    """The notebook's dataset (example i = ids[i : i+T+1]) for the transformers Trainer.

    It remembers which indices were fetched, so the HF engine can prove at run time that the Trainer's
    sampler followed `DataOrder`.
    """

    def __init__(self, ids: torch.Tensor, seq_len: int, label_mode: str) -> None:
        self.ids = ids
        self.seq_len = seq_len
        self.label_mode = label_mode
        self.fetched: list[int] = []

    def __len__(self) -> int:
        return max(0, self.ids.numel() - self.seq_len)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        self.fetched.append(int(idx))
        inputs, labels = make_batch(self.ids, torch.tensor([idx]), self.seq_len, self.label_mode)
        return {"input_ids": inputs[0], "labels": labels[0]}
