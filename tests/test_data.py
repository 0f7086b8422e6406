"""Data: loading, validation errors, caching of token ids, the explicit example order."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest
import torch

from flannel_repro.config import RunConfig
from flannel_repro.data.corpus import DataOrder, TokenDataset, load_data, make_batch
from flannel_repro.data.files import (
    compute_token_mask,
    load_corpus_text,
    load_token_mask,
    load_tokenizer,
    save_token_mask,
)
from flannel_repro.data.embedded import embedded_paths
from flannel_repro.errors import DataCacheWarning, DataError, DataWarning

TINY = RunConfig(dataset="tiny", vocab_size=512, steps=5, batch_size=4, seq_len=16)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FLANNEL_REPRO_CACHE", str(tmp_path / "cache"))
    load_data.__globals__["_LOADED"].clear()


def test_embedded_tiny_loads_and_validates():
    data = load_data(TINY)
    assert data.ids.dtype == torch.int64
    assert data.mask.vocab_size == 512
    assert data.mask.n_live + data.mask.n_dead == 512
    assert int(data.ids.max()) < 512
    assert set(data.hashes) >= {"tokenizer", "corpus"}


def test_vocab_size_mismatch_is_a_clear_error():
    with pytest.raises(DataError, match=r"has 512 tokens but the config's 'vocab_size' is 600"):
        load_data(TINY.replace(vocab_size=600))


def test_corpus_too_short(tmp_path):
    paths = embedded_paths("tiny")
    short = tmp_path / "short.txt"
    short.write_text(paths.corpus.read_text(encoding="utf-8")[:10], encoding="utf-8")
    cfg = TINY.replace(tokenizer_path=str(paths.tokenizer), corpus_path=str(short))
    with pytest.raises(DataError, match=r"has 10 tokens; 'seq_len' = 16 needs at least seq_len \+ 1 = 17"):
        load_data(cfg)


def test_invalid_utf8_reports_offset(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"hello \xff world")
    with pytest.raises(DataError, match=r"not valid UTF-8: byte 0xff at offset 6"):
        load_corpus_text(bad)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_tokenizer(tmp_path / "nope.json")
    junk = tmp_path / "junk.json"
    junk.write_text("{not json")
    with pytest.raises(DataError, match="not a valid `tokenizers` JSON"):
        load_tokenizer(junk)
    paths = embedded_paths("tiny")
    cfg = TINY.replace(tokenizer_path=str(paths.tokenizer), corpus_path=str(tmp_path / "missing.txt"))
    with pytest.raises(DataError, match=r"corpus file .*missing.txt' does not exist"):
        load_data(cfg)


def test_out_of_range_ids(tmp_path):
    # A tokenizer whose ids exceed the config's vocabulary: shrink the vocab list but keep a high id.
    paths = embedded_paths("tiny")
    spec = json.loads(paths.tokenizer.read_text(encoding="utf-8"))
    from flannel_repro.data.files import tokenize
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(json.dumps(spec))
    with pytest.raises(DataError, match=r"outside \[0, 10\)"):
        tokenize(tok, paths.corpus.read_text(encoding="utf-8")[:200], vocab_size=10)


def test_mask_file_round_trip_and_validation(tmp_path):
    ids = np.array([0, 1, 1, 5, 7], dtype=np.int32)
    mask = compute_token_mask(ids, 10)
    assert mask.n_live == 4 and mask.n_dead == 6
    assert mask.dead_indices.tolist() == [2, 3, 4, 6, 8, 9]
    path = tmp_path / "mask.safetensors"
    save_token_mask(mask, path)
    back = load_token_mask(path, 10)
    assert torch.equal(back.live_mask, mask.live_mask)
    with pytest.raises(DataError, match=r"'live_mask' has shape \(10,\), expected \(12,\)"):
        load_token_mask(path, 12)
    from safetensors.torch import save_file

    save_file({"live_mask": mask.live_mask}, str(tmp_path / "partial.safetensors"))
    with pytest.raises(DataError, match=r"lacks key\(s\) \['dead_indices', 'dead_mask'\]"):
        load_token_mask(tmp_path / "partial.safetensors", 10)
    save_file(
        {"live_mask": mask.live_mask, "dead_mask": mask.live_mask.clone(), "dead_indices": mask.dead_indices},
        str(tmp_path / "inconsistent.safetensors"),
    )
    with pytest.raises(DataError, match="must be complements"):
        load_token_mask(tmp_path / "inconsistent.safetensors", 10)
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00" * 3)
    with pytest.raises(DataError, match="not a safetensors file"):
        load_token_mask(tmp_path / "garbage.safetensors", 10)


def test_user_mask_file_is_used(tmp_path):
    paths = embedded_paths("tiny")
    cfg = TINY.replace(
        tokenizer_path=str(paths.tokenizer), corpus_path=str(paths.corpus), token_mask_path=str(paths.token_mask)
    )
    data = load_data(cfg)
    assert "token_mask" in data.hashes
    assert torch.equal(data.mask.live_mask, compute_token_mask(data.ids, 512).live_mask)


def test_token_ids_are_cached(tmp_path):
    cfg = RunConfig(dataset="default")
    t0 = time.perf_counter()
    first = load_data(cfg)
    cold = time.perf_counter() - t0
    load_data.__globals__["_LOADED"].clear()  # drop the in-process cache, keep the on-disk one
    t0 = time.perf_counter()
    second = load_data(cfg)
    warm = time.perf_counter() - t0
    assert torch.equal(first.ids, second.ids)
    assert list((tmp_path / "cache" / "tokens").glob("*.ids"))
    assert warm < 1.0, f"second load took {warm:.2f}s (cold {cold:.2f}s)"


def test_a_damaged_token_cache_is_rebuilt_not_trusted(tmp_path):
    """A flipped bit in the cached ids is a valid .npy with other tokens: its digest catches it."""
    cfg = TINY
    first = load_data(cfg)
    (entry,) = (tmp_path / "cache" / "tokens").glob("*.ids")
    raw = bytearray(entry.read_bytes())
    raw[-5] ^= 0x01  # a token id in the payload, not the header
    entry.write_bytes(bytes(raw))
    load_data.__globals__["_LOADED"].clear()
    second = load_data(cfg)
    assert torch.equal(first.ids, second.ids)
    assert entry.read_bytes() != bytes(raw)  # rewritten


def test_a_token_cache_that_cannot_be_written_warns_and_loads(tmp_path, monkeypatch):
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "tokens").write_text("a file where the cache folder should be")
    with pytest.warns(DataCacheWarning, match="could not cache the corpus's token ids"):
        data = load_data(TINY)
    assert data.ids.numel() > 0


def test_data_order_matches_seedable_sampler():
    n, b, seed = 1000, 32, 43
    order = DataOrder(n, b, seed)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    assert torch.equal(order.batch(1), perm[:32])
    assert torch.equal(order.batch(2), perm[32:64])
    # epoch 1 reseeds with seed + 1; the last batch of an epoch is short (1000 = 31 * 32 + 8)
    assert order.batch(32).numel() == 8
    g1 = torch.Generator().manual_seed(seed + 1)
    assert torch.equal(order.batch(33), torch.randperm(n, generator=g1)[:32])
    with pytest.raises(ValueError):
        order.batch(0)


def test_data_order_matches_trainer_sampler():
    """The HF engine checks this at every step; here it is checked against accelerate directly."""
    from accelerate.data_loader import SeedableRandomSampler

    data = list(range(500))
    sampler = SeedableRandomSampler(data_source=data, data_seed=7)
    assert list(sampler)[:64] == DataOrder(500, 32, 7).batch(1).tolist() + DataOrder(500, 32, 7).batch(2).tolist()


def test_label_modes():
    ids = torch.arange(100)
    inputs, labels = make_batch(ids, torch.tensor([0, 10]), 5, "next_token")
    assert inputs.tolist() == [[0, 1, 2, 3, 4], [10, 11, 12, 13, 14]]
    assert torch.equal(labels, inputs)  # the model shifts: position t learns token t+1
    _, nb = make_batch(ids, torch.tensor([0]), 5, "notebook")
    assert nb.tolist() == [[1, 2, 3, 4, 5]]  # shifted again by the model: position t learns t+2
    ds = TokenDataset(ids, 5, "notebook")
    assert len(ds) == 95
    assert ds[3]["labels"].tolist() == [4, 5, 6, 7, 8]
    assert ds.fetched == [3]


def test_file_hash_is_remembered_until_the_file_changes(tmp_path):
    from flannel_repro.data import files

    p = tmp_path / "corpus.txt"
    p.write_text("abc")
    first = files.file_sha256(p)
    assert files.file_sha256(p) == first
    p.write_text("abcd")  # another size
    second = files.file_sha256(p)
    assert second != first
    p.write_text("abce")  # same size: the new mtime tells
    st = p.stat()
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert files.file_sha256(p) not in (first, second)


def test_characters_the_tokenizer_lacks_are_an_error_not_unk(tmp_path):
    paths = embedded_paths("tiny")
    text = paths.corpus.read_text(encoding="utf-8")
    odd = tmp_path / "odd.txt"
    odd.write_text(text[:500] + "\u2603" + text[500:], encoding="utf-8")  # a snowman the tokenizer has no token for
    cfg = TINY.replace(tokenizer_path=str(paths.tokenizer), corpus_path=str(odd))
    with pytest.raises(
        DataError,
        match=r"1 of \d+ tokens are the unknown token '\[UNK\]': the tokenizer has no token "
        r"for '\u2603' \(first at character 500\)\. .* allow_unknown_tokens = true",
    ):
        load_data(cfg)
    # opting in trains it as [UNK], with a warning, and asks again on the next load (nothing cached hides it)
    with pytest.warns(DataWarning, match=r"1 of \d+ tokens are the unknown token .* \(allow_unknown_tokens\)"):
        data = load_data(cfg.replace(allow_unknown_tokens=True))
    assert int((data.ids == 0).sum()) == 1  # [UNK] is id 0 of the embedded tokenizers
    assert cfg.replace(allow_unknown_tokens=True).fingerprint() == cfg.fingerprint()
    load_data.__globals__["_LOADED"].clear()
    with pytest.raises(DataError, match="allow_unknown_tokens"):
        load_data(cfg)


def test_a_mask_that_does_not_match_the_corpus_is_an_error(tmp_path):
    paths = embedded_paths("tiny")
    mask = load_token_mask(paths.token_mask, 512)
    live = mask.live_mask.clone()
    first_live = int(live.nonzero()[0])
    live[first_live] = False  # self-consistent file, wrong for this corpus
    wrong = compute_token_mask(live.nonzero().flatten(), 512)
    save_token_mask(wrong, tmp_path / "wrong.safetensors")
    cfg = TINY.replace(
        tokenizer_path=str(paths.tokenizer),
        corpus_path=str(paths.corpus),
        token_mask_path=str(tmp_path / "wrong.safetensors"),
    )
    with pytest.raises(
        DataError,
        match=rf"does not match corpus .*: it marks {mask.n_live - 1} tokens live, the corpus "
        rf"uses {mask.n_live}; 1 token id\(s\) differ, e.g. id {first_live} \(dead in "
        r"the mask, present in the corpus\)",
    ):
        load_data(cfg)
    right = TINY.replace(
        tokenizer_path=str(paths.tokenizer), corpus_path=str(paths.corpus), token_mask_path=str(paths.token_mask)
    )
    assert load_data(right).mask.n_live == mask.n_live
