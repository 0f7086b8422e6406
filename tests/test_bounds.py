"""Bounds belong to the data they were derived on: the scale key carries the tokenizer's and corpus's
hashes, so a bound (or noise band) derived on the embedded data is never applied to other data."""

from __future__ import annotations

import pytest

from flannel_repro.analysis.bounds import bound_for, data_hashes, scale_key
from flannel_repro.config import PRESETS
from flannel_repro.data.embedded import embedded_paths
from flannel_repro.errors import ConfigError
from tests.flannel6.conftest import BOUNDS


def test_the_committed_ci_bound_is_found_for_the_embedded_data_only(tmp_path):
    run = PRESETS["ci"]().run
    assert bound_for(run, BOUNDS) is not None  # the repository's bound, on the data it was derived on
    paths = embedded_paths("default")
    other = tmp_path / "corpus.txt"
    other.write_text(paths.corpus.read_text(encoding="utf-8")[::-1], encoding="utf-8")  # same characters, other text
    theirs = run.replace(tokenizer_path=str(paths.tokenizer), corpus_path=str(other))
    assert theirs.fingerprint() == run.fingerprint()  # paths are not in the fingerprint ...
    assert scale_key(theirs, data_hashes(theirs)) != scale_key(run, data_hashes(run))  # ... the data's hashes are
    assert bound_for(theirs, BOUNDS) is None
    same_files = run.replace(tokenizer_path=str(paths.tokenizer), corpus_path=str(paths.corpus))
    assert bound_for(same_files, BOUNDS) is not None  # the same bytes under their own paths: the same data


def test_a_scale_key_needs_the_data():
    with pytest.raises(ConfigError, match="expected the tokenizer's sha256"):
        scale_key(PRESETS["ci"]().run, {})
    run = PRESETS["ci"]().run
    described = {f"{k}_sha256": v for k, v in data_hashes(run).items()}
    assert scale_key(run, described) == scale_key(run, data_hashes(run))  # an artifact's description keys the same
