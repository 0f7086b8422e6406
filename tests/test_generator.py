"""Tests of the synthetic data generator (flannel_repro.data: generator, vocabulary, text, draws), of the
committed fixtures it produced, and of its command line (flannel_repro.data.generate_cli).

The tiny variant is regenerated freely (milliseconds); the default variant is checked through the committed
files here (tests/test_embedded.py regenerates it once, in the cache fall-back test).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from flannel_repro.data import embedded, generate_cli, generator
from flannel_repro.data import files as data
from flannel_repro.data.vocabulary import vocabulary
from flannel_repro.errors import DataError

# the fixture folder, digests, the per-test cache and the fixture copy: one definition, in test_embedded
from tests.test_embedded import FIXTURES, REPO, _copy_fixtures, _private_cache, _sha  # noqa: F401 (an autouse fixture)


# --- tiny variant ----------------------------------------------------------------------------------


def test_tiny_generation_is_deterministic_and_matches_recorded_hashes() -> None:
    a = generator.generate("tiny")
    b = generator.generate("tiny")
    assert a == b
    assert a.vocab_size == 512
    files = generator.render("tiny")
    assert {name: _sha(payload) for name, payload in files.items()} == embedded.EMBEDDED_SHA256["tiny"]
    assert files[generator.CORPUS_FILE] == a.corpus.encode("utf-8")


def test_tiny_tokenizer_is_a_character_tokenizer() -> None:
    tok = data.load_tokenizer(FIXTURES / "tiny" / generator.TOKENIZER_FILE, 512)
    assert tok.get_vocab_size(with_added_tokens=True) == 512
    vocab = vocabulary("tiny")
    assert tok.get_vocab(with_added_tokens=True) == {t: i for i, t in enumerate(vocab)}
    assert len(set(vocab)) == 512 and all(len(t) == 1 for t in vocab[1:])
    corpus = data.load_corpus_text(FIXTURES / "tiny" / generator.CORPUS_FILE)
    ids = tok.encode(corpus, add_special_tokens=False).ids
    assert len(ids) == len(corpus) == 40_000
    assert 0 not in ids  # no unknown characters
    assert ids == [vocab.index(ch) for ch in corpus]
    assert tok.decode(ids) == corpus
    # Spaces, runs of newlines and unseen characters each map to one id; unseen ones to [UNK].
    assert tok.encode(" \n\n a\u00e9", add_special_tokens=False).ids == [vocab.index(c) for c in " \n\n a\u00e9"]
    assert tok.encode("\u20ac", add_special_tokens=False).ids == [0]
    # The canonical hand-written JSON says what the library itself would serialise.
    ours, theirs = json.loads(generator.tokenizer_json(vocab)), json.loads(tok.to_str())
    for key in ("model", "pre_tokenizer", "normalizer", "decoder", "post_processor"):
        assert theirs[key] == ours[key], key


def test_tiny_corpus_and_mask() -> None:
    raw = (FIXTURES / "tiny" / generator.CORPUS_FILE).read_bytes()
    assert not raw.startswith(b"\xef\xbb\xbf") and b"\r" not in raw and raw.endswith(b"\n")
    corpus = raw.decode("utf-8")
    mask = data.load_token_mask(FIXTURES / "tiny" / generator.MASK_FILE, 512)
    assert (mask.n_live, mask.n_dead, mask.vocab_size) == (320, 192, 512)
    vocab = vocabulary("tiny")
    live = sorted({vocab.index(ch) for ch in corpus})
    assert mask.live_mask.nonzero().flatten().tolist() == live
    assert bool(mask.dead_mask[0])  # [UNK] never occurs
    stats = generator.corpus_stats(corpus, 512)
    assert (stats["n_tokens"], stats["n_live"], stats["n_dead"]) == (40_000, 320, 192)


def test_tiny_hashes_do_not_depend_on_the_hash_seed() -> None:
    code = (
        "import hashlib, json; from flannel_repro.data import generator; "
        "print(json.dumps({k: hashlib.sha256(v).hexdigest() for k, v in generator.render('tiny').items()}))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "271828", "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, check=True, timeout=120
    ).stdout
    assert json.loads(out.strip().splitlines()[-1]) == embedded.EMBEDDED_SHA256["tiny"]


def test_unknown_variant_is_refused() -> None:
    with pytest.raises(DataError, match="unknown embedded data variant"):
        generator.generate("huge")


# --- the command line ------------------------------------------------------------------------------


def test_tiny_committed_fixtures_match(capsys: pytest.CaptureFixture[str]) -> None:
    for name, expected in embedded.EMBEDDED_SHA256["tiny"].items():
        assert data.file_sha256(FIXTURES / "tiny" / name) == expected, name
    assert generate_cli.main(["--variant", "tiny", "--check"]) == 0
    out = capsys.readouterr().out
    assert "tiny/corpus.txt: ok" in out and "MISMATCH" not in out


def test_check_reports_an_edited_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = _copy_fixtures("tiny", tmp_path / "out")
    (folder / generator.CORPUS_FILE).write_text("edited\n", encoding="utf-8")
    assert generate_cli.main(["--variant", "tiny", "--out", str(tmp_path / "out"), "--check"]) == 1
    captured = capsys.readouterr()
    assert "tiny/corpus.txt: MISMATCH" in captured.out
    assert "tiny/tokenizer.json: ok" in captured.out
    assert "differ" in captured.err


def test_cli_writes_files_and_statistics(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert generate_cli.main(["--variant", "tiny", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for name in generator.FILE_NAMES:
        assert (tmp_path / "tiny" / name).read_bytes() == (FIXTURES / "tiny" / name).read_bytes()
    assert "n_tokens 40,000" in out and "n_live 320" in out and "n_dead 192" in out
    assert embedded.EMBEDDED_SHA256["tiny"][generator.CORPUS_FILE] in out


# --- default variant -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def default_corpus() -> str:
    return data.load_corpus_text(FIXTURES / "default" / generator.CORPUS_FILE)


def test_default_tokenizer_and_mask(default_corpus: str) -> None:
    tok = data.load_tokenizer(FIXTURES / "default" / generator.TOKENIZER_FILE, 10_000)
    assert tok.get_vocab_size(with_added_tokens=True) == 10_000
    vocab = vocabulary("default")
    assert tok.get_vocab(with_added_tokens=True) == {t: i for i, t in enumerate(vocab)}
    sample = default_corpus[:50_000]
    ids = tok.encode(sample, add_special_tokens=False).ids
    assert len(ids) == len(sample) and 0 not in ids

    index = {ch: i for i, ch in enumerate(vocab)}
    live = np.zeros(10_000, dtype=bool)
    live[[index[ch] for ch in set(default_corpus)]] = True
    mask = data.load_token_mask(FIXTURES / "default" / generator.MASK_FILE, 10_000)
    assert np.array_equal(mask.live_mask.numpy(), live)
    assert mask.n_live + mask.n_dead == 10_000


def test_default_statistics(default_corpus: str) -> None:
    stats = generator.corpus_stats(default_corpus, 10_000)
    assert 1_300_000 <= stats["n_tokens"] <= 1_450_000
    assert 6_250 <= stats["n_live"] <= 6_350
    assert stats["n_live"] + stats["n_dead"] == 10_000
    # The notebook's exact numbers.
    assert (stats["n_tokens"], stats["n_live"], stats["n_dead"]) == (1_371_328, 6_301, 3_699)
    # Skewed, language-like profile: a heavy head and a long tail of rare characters.
    assert stats["top30_share"] > 0.6
    assert stats["n_live_below_5"] > 2_000
    counts = Counter(default_corpus)
    assert counts.most_common(1)[0][0] == " "
    assert {ch for ch, _ in counts.most_common(12)} >= set(" etaoin")
    ascii_share = sum(n for ch, n in counts.items() if ord(ch) < 128) / len(default_corpus)
    assert 0.85 < ascii_share < 0.99
    assert "\n\n" in default_corpus and default_corpus.endswith("\n")
    assert max(len(line) for line in default_corpus.split("\n")) < 200
