"""Tests of the embedded data sets as files (flannel_repro.data.embedded): the committed fixtures are used only
when they match the recorded hashes, otherwise the data is regenerated into the cache and verified.

The default variant is regenerated exactly once, in the cache fall-back test.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from flannel_repro.data import embedded, generator
from flannel_repro.data import files as data
from flannel_repro.data.vocabulary import vocabulary
from flannel_repro.errors import DataError

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "fixtures"


def _sha(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets an empty cache, so nothing leaks into ~/.cache or between tests."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("FLANNEL_REPRO_CACHE", str(cache))
    return cache


def _copy_fixtures(variant: str, root: Path) -> Path:
    dst = root / variant
    shutil.copytree(FIXTURES / variant, dst)
    return dst


# --- tiny variant ----------------------------------------------------------------------------------


def test_embedded_paths_uses_verified_fixtures_and_caches_the_check(monkeypatch: pytest.MonkeyPatch) -> None:
    paths = embedded.embedded_paths("tiny")
    assert paths.variant == "tiny"
    assert paths.tokenizer == FIXTURES / "tiny" / generator.TOKENIZER_FILE
    assert paths.corpus == FIXTURES / "tiny" / generator.CORPUS_FILE
    assert paths.token_mask == FIXTURES / "tiny" / generator.MASK_FILE

    def no_hashing(path: object) -> str:
        raise AssertionError(f"{path} was hashed again")

    monkeypatch.setattr(data, "file_sha256", no_hashing)
    assert embedded.embedded_paths("tiny") == paths


def test_edited_fixture_is_not_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, _private_cache: Path) -> None:
    folder = _copy_fixtures("tiny", tmp_path / "fixtures")
    corpus = folder / generator.CORPUS_FILE
    corpus.write_bytes(corpus.read_bytes().replace(b"e", b"E", 1))
    monkeypatch.setattr(embedded, "fixtures_root", lambda: tmp_path / "fixtures")
    with pytest.warns(UserWarning, match="corpus.txt"):
        paths = embedded.embedded_paths("tiny")
    assert paths.corpus == _private_cache / "embedded" / "tiny" / generator.CORPUS_FILE
    assert paths.corpus.read_bytes() == (FIXTURES / "tiny" / generator.CORPUS_FILE).read_bytes()


def test_unknown_variant_lists_the_variants() -> None:
    with pytest.raises(DataError, match="'default', 'tiny'"):
        embedded.embedded_paths("huge")


# --- default variant -------------------------------------------------------------------------------


def test_default_committed_files_match_recorded_hashes() -> None:
    for name, expected in embedded.EMBEDDED_SHA256["default"].items():
        assert data.file_sha256(FIXTURES / "default" / name) == expected, name
    assert embedded.embedded_paths("default").corpus == FIXTURES / "default" / generator.CORPUS_FILE


def test_default_falls_back_to_generating_into_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, _private_cache: Path
) -> None:
    monkeypatch.setattr(embedded, "fixtures_root", lambda: tmp_path / "no-fixtures-here")
    paths = embedded.embedded_paths("default")  # the one regeneration of the default variant
    assert paths.corpus.parent == _private_cache / "embedded" / "default"
    for name, path in paths.by_name().items():
        assert path.read_bytes() == (FIXTURES / "default" / name).read_bytes(), name

    def must_not_render(variant: str) -> dict[str, bytes]:
        raise AssertionError("regenerated although the cache holds matching files")

    monkeypatch.setattr(generator, "render", must_not_render)
    assert embedded.embedded_paths("default") == paths
    embedded._VERIFIED.clear()  # a fresh process: the cached files are re-hashed, not regenerated
    assert embedded.embedded_paths("default") == paths


def test_default_refuses_edited_fixture_when_generator_differs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, _private_cache: Path
) -> None:
    folder = _copy_fixtures("default", tmp_path / "fixtures")
    (folder / generator.TOKENIZER_FILE).write_bytes((folder / generator.TOKENIZER_FILE).read_bytes() + b"\n")
    monkeypatch.setattr(embedded, "fixtures_root", lambda: tmp_path / "fixtures")
    vocab = vocabulary("default")
    fake = generator.GeneratedData(
        tokenizer_json=generator.tokenizer_json(vocab), corpus="a changed generator\n", vocab_size=10_000
    )
    monkeypatch.setattr(generator, "generate", lambda variant: fake)
    with pytest.warns(UserWarning, match="tokenizer.json"):
        with pytest.raises(DataError) as info:
            embedded.embedded_paths("default")
    message = str(info.value)
    assert "differs from the recorded hashes" in message
    assert "corpus.txt" in message
    assert embedded.EMBEDDED_SHA256["default"][generator.CORPUS_FILE] in message
    assert _sha(fake.corpus.encode("utf-8")) in message
    assert not (_private_cache / "embedded" / "default" / generator.CORPUS_FILE).exists()
