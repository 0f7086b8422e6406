"""A snapshot stored only for other numerics classes: skip (default), fail, or a tolerant comparison
within the measured noise band, with and without xdist. Another class's snapshot is never this
session's: it is not reported unused and --snapshot-update leaves it alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flannel_repro.analysis.summary import Summary
from tests.plugin.conftest import cpu_class

K = cpu_class(threads=1)
OTHER = "cpu-otherisa-mklother-t1"  # a class no machine has: stands for "another CPU"
MODES = {"no-xdist": [], "n2": ["-p", "xdist", "-n", "2"]}

TEST = """
def test_loss(trajectory, flannel_snapshot):
    assert flannel_snapshot == trajectory(42).summary()

def test_plain():
    pass
"""


def run(pytester: pytest.Pytester, mode: str, *args: str) -> pytest.RunResult:
    common = ("--flannel-threads", "1", "-rs", *args)
    if mode == "no-xdist":
        return pytester.runpytest(*common)
    return pytester.runpytest_subprocess(*MODES[mode], *common)


@pytest.fixture
def other_class_only(tiny_experiment) -> tuple[pytest.Pytester, Path]:
    """The snapshot written on this machine, then renamed as if another class had written it."""
    p = tiny_experiment
    p.makepyfile(test_mc=TEST)
    assert run(p, "no-xdist", "--snapshot-update").ret == 0
    snaps = p.path / "__snapshots__" / "test_mc"
    mine = snaps / f"test_loss[{K}].flannel"
    other = snaps / f"test_loss[{OTHER}].flannel"
    mine.rename(other)
    return p, other


def _band(p: pytest.Pytester, stored: Path, allowance: float) -> Path:
    """A bands file for the tiny scale: `allowance` on the last loss, chains exact through step 0."""
    from flannel_repro.analysis.noise import BANDS_FORMAT, summary_scale

    scale = summary_scale(Summary.from_text(stored.read_text()))
    path = p.path / "flannel_noise_bands.json"
    path.write_text(json.dumps({"format": BANDS_FORMAT, "bands": [{
        "scale": scale, "exact_through": 0, "margin": 2.0,
        "measured": {"variants": ["portable:2"], "reference": "portable:1", "seeds": "42", "machine": "test"},
        "fields": {"run": {"loss @ step 4": allowance}}}]}))
    return path


def _nudge_loss(path: Path, delta: float) -> None:
    summary = Summary.from_text(path.read_text())
    summary.tree["steps"][-1]["loss"] += delta
    path.write_text(summary.to_text())


@pytest.mark.parametrize("mode", list(MODES))
def test_skip_by_default_names_both_classes(other_class_only, mode):
    p, other = other_class_only
    result = run(p, mode)
    result.assert_outcomes(passed=1, skipped=1)
    assert result.ret == 0
    result.stdout.fnmatch_lines([
        "snapshots stored only for other numerics classes (--flannel-missing-class=skip):",
        f"  SKIPPED test_loss[[]{K}[]]: this run {K}, nearest stored {OTHER}",
        f"SKIPPED*no snapshot for this run's numerics class {K}; stored for: {OTHER}*",
    ])
    assert "unused" not in result.stdout.str()  # another class's snapshot is not this session's
    assert other.exists()


@pytest.mark.parametrize("mode", list(MODES))
def test_tolerant_within_the_band_passes_and_beyond_it_fails(other_class_only, mode):
    p, other = other_class_only
    _band(p, other, allowance=1e-3)
    p.makeini("[pytest]\nflannel_config = flannel.toml\nflannel_progress = 0\nflannel_missing_class = tolerant\n")
    _nudge_loss(other, 0.5e-3)
    within = run(p, mode)
    within.assert_outcomes(passed=2)
    within.stdout.fnmatch_lines([f"  PASSED  test_loss[[]{K}[]]: this run {K}, nearest stored {OTHER}"])

    _nudge_loss(other, 1e-3)  # now 1.5e-3 from this run's value: beyond the band
    beyond = run(p, mode)
    beyond.assert_outcomes(passed=1, failed=1)
    beyond.stdout.fnmatch_lines([
        "E*flannel snapshot test_loss[[]*[]] moved beyond the noise band: 1 of * compared values differ by more than "
        "arithmetic alone moves them*",
        f"E*compared with the nearest stored class {OTHER}*",
        "E*compared within the noise band for scale * in *flannel_noise_bands.json: 2 x the largest deviation of "
        "portable:2 from portable:1*",
        "E*loss @ step 4 * band 0.001*",
    ])


@pytest.mark.parametrize("mode", list(MODES))
def test_fail_policy_and_a_missing_band(other_class_only, mode):
    p, other = other_class_only
    failed = run(p, mode, "--flannel-missing-class=fail")
    failed.assert_outcomes(passed=1, failed=1)
    failed.stdout.fnmatch_lines([f"E*no snapshot for this run's numerics class {K}; stored for: {OTHER}.",
                                 "E*choose with --flannel-missing-class=skip|fail|tolerant*"])
    assert "unused" not in failed.stdout.str()
    no_band = run(p, mode, "--flannel-missing-class=tolerant")
    no_band.assert_outcomes(passed=1, failed=1)
    no_band.stdout.fnmatch_lines(["E*needs a noise band for scale *, and flannel_noise_bands.json has none. "
                                  "Measure one: flannel-repro noise*"])


def test_snapshot_update_records_this_class_and_keeps_the_other(other_class_only):
    p, other = other_class_only
    update = run(p, "no-xdist", "--snapshot-update")
    assert update.ret == 0
    update.stdout.fnmatch_lines(["*1 snapshot generated.*"])
    names = sorted(x.name for x in other.parent.iterdir())
    assert names == sorted([f"test_loss[{K}].flannel", other.name])
    again = run(p, "no-xdist", "--flannel-missing-class=fail")
    again.assert_outcomes(passed=2)  # this class has its own snapshot now: compared exactly, no policy


def test_bad_policy_and_bands_options_are_usage_errors(tiny_experiment):
    tiny_experiment.makepyfile(test_x="def test_x():\n    pass\n")
    bad = tiny_experiment.runpytest("--flannel-missing-class=maybe")
    assert bad.ret == pytest.ExitCode.USAGE_ERROR
    bad.stderr.fnmatch_lines(["*--flannel-missing-class (ini: flannel_missing_class) accepts skip or fail or tolerant; "
                              "got 'maybe'.*"])
    absent = tiny_experiment.runpytest("--flannel-noise-bands=nowhere.json")
    assert absent.ret == pytest.ExitCode.USAGE_ERROR
    absent.stderr.fnmatch_lines(["*--flannel-noise-bands*accepts the path of an existing noise-bands JSON file*"])
    numerics = tiny_experiment.runpytest("--flannel-numerics=fast")
    assert numerics.ret == pytest.ExitCode.USAGE_ERROR
    numerics.stderr.fnmatch_lines(["*--flannel-numerics (ini: flannel_numerics) accepts native or portable; got 'fast'.*"])


PORTABLE_CHECK = """
import os

def test_worker_runs_portable(trajectory):
    env = trajectory(42).env["numerics"]
    assert env["mode"] == "portable"
    assert env["env"] == {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16", "MKL_CBWR": "AVX2,STRICT"}
    assert env["class"].startswith("cpu-avx512bf16-mkl"), env["class"]
    assert os.environ["MKL_CBWR"] == "AVX2,STRICT"
"""


@pytest.mark.parametrize("mode", list(MODES))
def test_portable_mode_is_arranged_at_start_for_every_worker(tiny_experiment, monkeypatch, mode):
    from flannel_repro.training.numerics import PORTABLE_ENV, cpu_has

    if cpu_has("avx512_bf16") is False:
        pytest.skip("this CPU lacks AVX-512 BF16: portable mode refuses here (tested in tests/test_numerics.py)")
    for key in PORTABLE_ENV:  # a fresh process with nothing pinned: the plugin must arrange it
        monkeypatch.delenv(key, raising=False)
    tiny_experiment.makepyfile(test_p=PORTABLE_CHECK)
    result = tiny_experiment.runpytest_subprocess(*MODES[mode], "--flannel-numerics=portable", "--flannel-threads=1")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["numerics class: cpu-avx512bf16-mkl*-t1 (requested numerics: portable)"])
