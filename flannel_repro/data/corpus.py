"""The data one run needs (the user's files or the embedded data set), and the explicit, seeded
example order.

The order in which examples are seen is an object built from `data_seed` that equals what the
transformers Trainer does (accelerate's seedable sampler: one `torch.randperm` over all examples from a
generator seeded with `data_seed + epoch`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np
import torch

from flannel_repro.data import embedded
from flannel_repro.data.files import (
    TokenMask,
    cached_token_ids,
    compute_token_mask,
    file_sha256,
    load_token_mask,
    load_tokenizer,
    read_bytes,
)
from flannel_repro.errors import DataError

if TYPE_CHECKING:
    from flannel_repro.config import RunConfig


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
        return DataFiles(
            Path(config.tokenizer_path),
            Path(config.corpus_path),  # type: ignore[arg-type]
            Path(config.token_mask_path) if config.token_mask_path else None,
            "user",
        )
    paths = embedded.embedded_paths(config.dataset)
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
        return {
            **{f"{k}_sha256": v for k, v in self.hashes.items()},
            "origin": self.files.origin,
            "n_tokens": self.n_tokens,
            "n_live": self.mask.n_live,
            "n_dead": self.mask.n_dead,
        }


_LOADED: dict[tuple, CorpusData] = {}


def load_data(config: "RunConfig") -> CorpusData:
    """Load (and cache in-process) the tokenizer, corpus and mask a config names; validate against it."""
    files = data_files(config)
    tok_hash = file_sha256(files.tokenizer) if files.tokenizer.is_file() else None
    if tok_hash is None:
        read_bytes(files.tokenizer, "tokenizer")  # raises the clear error
    corpus_hash = file_sha256(files.corpus) if files.corpus.is_file() else None
    if corpus_hash is None:
        read_bytes(files.corpus, "corpus")
    mask_hash = file_sha256(files.token_mask) if files.token_mask is not None and files.token_mask.is_file() else None
    if files.token_mask is not None and mask_hash is None:
        read_bytes(files.token_mask, "token mask")
    # The paths are part of the key: the same bytes under another name are another origin to report.
    key = (files, tok_hash, corpus_hash, mask_hash, config.vocab_size, config.allow_unknown_tokens)
    hit = _LOADED.get(key)
    if hit is None:
        load_tokenizer(files.tokenizer, config.vocab_size)  # vocabulary check even when the ids are cached
        ids = cached_token_ids(
            files.tokenizer,
            files.corpus,
            vocab_size=config.vocab_size,
            tokenizer_sha256=tok_hash,  # type: ignore[arg-type]
            corpus_sha256=corpus_hash,  # type: ignore[arg-type]
            allow_unknown=config.allow_unknown_tokens,
        )
        if ids.size == 0:  # said plainly, before a mask comparison would report it as a mismatch
            raise DataError(f"corpus {str(files.corpus)!r} is empty: expected text to train on, got 0 tokens.")
        mask = compute_token_mask(ids, config.vocab_size)
        if files.token_mask is not None:
            given = load_token_mask(files.token_mask, config.vocab_size)
            if not torch.equal(given.live_mask, mask.live_mask):
                differ = torch.nonzero(given.live_mask != mask.live_mask).flatten()
                first = int(differ[0])
                raise DataError(
                    f"token mask {str(files.token_mask)!r} does not match corpus {str(files.corpus)!r}: it marks "
                    f"{given.n_live} tokens live, the corpus uses {mask.n_live}; {differ.numel()} token id(s) differ, "
                    f"e.g. id {first} ({'live' if bool(given.live_mask[first]) else 'dead'} in the mask, "
                    f"{'present' if bool(mask.live_mask[first]) else 'absent'} in the corpus). Recompute the mask from "
                    "this corpus, or leave --flannel-token-mask out to have it computed."
                )
            mask = given
        hashes = {"tokenizer": tok_hash, "corpus": corpus_hash}
        if mask_hash is not None:
            hashes["token_mask"] = mask_hash
        hit = _LOADED[key] = CorpusData(
            ids=torch.from_numpy(ids.astype(np.int64)),
            mask=mask,
            files=files,
            hashes=hashes,  # type: ignore[arg-type]
        )
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
        raise DataError(
            f"'batch_size' = {config.batch_size} exceeds the corpus's {n} examples of seq_len {config.seq_len}."
        )


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
        return self.permutation(epoch)[k * self.batch_size : (k + 1) * self.batch_size]

    def batches(self, steps: int) -> Iterator[torch.Tensor]:
        for step in range(1, steps + 1):
            yield self.batch(step)


def make_batch(
    ids: torch.Tensor, starts: torch.Tensor, seq_len: int, label_mode: str
) -> tuple[torch.Tensor, torch.Tensor]:
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
