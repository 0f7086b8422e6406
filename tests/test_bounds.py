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


def test_a_session_on_other_data_skips_the_bound_claims_or_derives_them_when_asked(tmp_path):
    """The Flannel 6 suite on data with no committed bound: the two bound claims skip with the way to
    derive one; with --flannel-derive-bounds they derive it from the held-out seeds and run."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).parents[1]
    exp = tmp_path / "exp.toml"  # the tiny embedded data set: no bound was derived on it
    exp.write_text('dataset = "tiny"\nvocab_size = 512\nsteps = 2\nbatch_size = 8\nseq_len = 32\n'
                   '[experiment]\nn_runs = 2\n')
    common = [sys.executable, "-m", "pytest", str(root / "tests" / "flannel6"), "-q", "-p", "no:xdist", "-p",
              "no:cacheprovider", "-rs", f"--flannel-config={exp}", f"--flannel-artifacts={tmp_path / 'a'}",
              "--flannel-progress=0"]
    env = {**__import__("os").environ, "FLANNEL_REPRO_CACHE": str(tmp_path / "cache")}
    skipped = subprocess.run(common, cwd=root, capture_output=True, text=True, timeout=900, env=env)
    assert skipped.returncode == 0, skipped.stdout[-2000:]
    assert "no divergence bound derived for this configuration on this data" in skipped.stdout
    assert "--flannel-derive-bounds" in skipped.stdout
    derived = subprocess.run([*common, "--flannel-derive-bounds=46"], cwd=root, capture_output=True, text=True,
                             timeout=900, env=env)
    assert derived.returncode == 0, derived.stdout[-2000:]
    assert "skipped" not in derived.stdout.splitlines()[-1], derived.stdout[-1500:]
