"""Noise bands: derived from runs that differ only in arithmetic, stored as JSON, and applied by the
tolerant comparison across numerics classes (within the band passes, beyond it or at step 0 fails)."""

from __future__ import annotations

import copy
import json

import pytest

from flannel_repro.config import RunConfig
from flannel_repro.errors import ArtifactError, ConfigError
from flannel_repro.analysis.noise import (
    BANDS_FORMAT,
    NoiseBand,
    compare_within_band,
    derive_band,
    read_bands,
    summary_scale,
    write_bands,
)
from flannel_repro.runs.variants import derive_from_training, parse_variants
from flannel_repro.analysis.summary import Summary, summarize, summarize_pair

TINY = RunConfig(dataset="tiny", vocab_size=512, steps=10, batch_size=8, seq_len=32)


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """The tiny config's seeds 42 and 43 trained under two arithmetic variants (1 and 2 threads, each in a
    fresh process), plus the same seeds at one thread in this process for synthetic perturbations."""
    out = tmp_path_factory.mktemp("noise")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLANNEL_REPRO_CACHE", str(tmp_path_factory.getbasetemp() / "flannel-cache"))
        band = derive_from_training(
            TINY, [42, 43], [("portable", 2)], ("portable", 1), out / "artifacts", command="test"
        )
    paths = sorted((out / "artifacts").glob("seed42-*.safetensors"))
    return band, paths


def _shift(summary: Summary, path: tuple, delta: float) -> Summary:
    tree = copy.deepcopy(summary.tree)
    node = tree
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] += delta
    return Summary(tree)


def test_band_is_measured_from_real_variants(tiny_runs):
    band, paths = tiny_runs
    assert len(paths) == 2  # seed 42 at one and at two threads: two classes, two artifacts
    classes = band.measured["classes"]
    assert classes["portable:1"].endswith("-t1") and classes["portable:2"].endswith("-t2")
    assert band.scale == summary_scale(summarize(paths[0]))
    assert band.measured["variants"] == ["portable:2"] and band.measured["reference"] == "portable:1"
    run_fields = band.fields["run"]
    # the thread count moves the trajectory, but never W_initial: the chains agree at least on step 0,
    # and no field of a step on which every variant agreed gets an allowance
    assert band.exact_through is not None and band.exact_through >= 0
    assert not any(int(p.rsplit("@ step ", 1)[1]) <= band.exact_through for p in run_fields)
    assert run_fields["loss @ step 10"] > 0
    for path, allowed in run_fields.items():
        assert allowed == pytest.approx(2.0 * band.measured["max_deviation"]["run"][path])
    assert "pair" in band.fields and any(p.startswith("divergence.") for p in band.fields["pair"])


def test_within_the_band_passes_beyond_it_fails(tiny_runs):
    band, paths = tiny_runs
    one, two = (summarize(p) for p in paths)
    same_class_other_threads = compare_within_band(one, two, band)
    assert same_class_other_threads.ok, same_class_other_threads.report()
    assert same_class_other_threads.within_band > 0  # values did move, within the band

    allowed = band.allowed("run", "loss @ step 10")
    steps = [r["step"] for r in two.tree["steps"]]
    last = steps.index(10)
    moved = compare_within_band(one, _shift(two, ("steps", last, "loss"), 3 * allowed + 1e-3), band)
    assert not moved.ok and [c.path for c in moved.changes] == ["loss @ step 10"]
    report = "\n".join(moved.report(name="t[x]"))
    assert "moved beyond the noise band: 1 of" in report and "band " in report and band.scale in report


def test_step_zero_and_the_config_stay_exact(tiny_runs):
    band, paths = tiny_runs
    one = summarize(paths[0])
    w0 = one.tree["steps"][0]["W"]["frobenius"]
    nudged = compare_within_band(one, _shift(one, ("steps", 0, "W", "frobenius"), abs(w0) * 1e-9), band)
    assert [c.path for c in nudged.changes] == ["W.frobenius @ step 0"]
    assert "exact (band 0)" in "\n".join(nudged.report())
    tree = copy.deepcopy(one.tree)
    tree["config"]["lr"] = 0.002
    assert [c.path for c in compare_within_band(one, Summary(tree), band).changes] == ["config.lr"]


def test_chains_must_agree_through_exact_through(tiny_runs):
    band, paths = tiny_runs
    one = summarize(paths[0])
    tree = copy.deepcopy(one.tree)
    first_row = tree["digest_chain"][0].split()
    first_row[0] = "0" * 16  # step 0 differs: W_initial moved
    tree["digest_chain"][0] = " ".join(first_row)
    cmp = compare_within_band(one, Summary(tree), band)
    assert not cmp.ok and any(c.kind == "chain" and "parts at step 0" in c.detail for c in cmp.changes)


def test_bands_file_round_trip_and_errors(tiny_runs, tmp_path):
    band, _ = tiny_runs
    path = tmp_path / "bands.json"
    write_bands(path, [band])
    other = NoiseBand(scale="other", fields={"run": {"loss @ step 1": 0.5}}, exact_through=None)
    write_bands(path, [other])  # merged: both scales kept
    got = read_bands(path)
    assert set(got) == {band.scale, "other"} and got[band.scale].fields == band.fields
    assert got["other"].exact_through is None and got["other"].source == str(path)
    assert read_bands(tmp_path / "absent.json") == {}
    (tmp_path / "bad.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ArtifactError, match=f"expected format {BANDS_FORMAT!r}"):
        read_bands(tmp_path / "bad.json")
    (tmp_path / "neg.json").write_text(
        json.dumps(
            {
                "format": BANDS_FORMAT,
                "bands": [{"scale": "s", "exact_through": 0, "fields": {"run": {"loss @ step 1": -1.0}}}],
            }
        )
    )
    with pytest.raises(ArtifactError, match="finite allowances >= 0"):
        read_bands(tmp_path / "neg.json")


def test_derivation_rejects_runs_that_are_not_the_same_run(tiny_runs):
    _, paths = tiny_runs
    one = summarize(paths[0])
    tree = copy.deepcopy(one.tree)
    tree["data"]["n_live"] += 1
    with pytest.raises(ArtifactError, match="arithmetic cannot change"):
        derive_band([(one, Summary(tree))], scale="s")
    with pytest.raises(ConfigError, match="at least one"):
        derive_band([], scale="s")
    with pytest.raises(ConfigError, match="margin"):
        derive_band([(one, one)], scale="s", margin=0.5)


def test_parse_variants():
    assert parse_variants("portable:1, avx2:2") == [("portable", 1), ("avx2", 2)]
    for bad in ("turbo:1", "avx2", "avx2:0", ""):
        with pytest.raises(ConfigError):
            parse_variants(bad)


def test_pair_summaries_have_their_own_band(tiny_runs):
    band, paths = tiny_runs
    pair = summarize_pair(paths[0], paths[1])
    assert pair.kind == "pair"
    assert compare_within_band(pair, pair, band).ok
