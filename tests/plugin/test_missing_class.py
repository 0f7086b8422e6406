"""A snapshot stored only for other numerics classes: by default a tolerant comparison within the measured
noise band, or a failure when no band is measured (never a green skip); fail, and skip as an explicit opt-in;
with and without xdist. Every assertion is counted in the summary: compared exactly, within the noise band,
not compared. Another class's snapshot is never this session's: it is not reported unused and
--snapshot-update leaves it alone."""

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
    path.write_text(
        json.dumps(
            {
                "format": BANDS_FORMAT,
                "bands": [
                    {
                        "scale": scale,
                        "exact_through": 0,
                        "margin": 2.0,
                        "measured": {
                            "variants": ["portable:2"],
                            "reference": "portable:1",
                            "seeds": "42",
                            "machine": "test",
                        },
                        "fields": {"run": {"loss @ step 4": allowance}},
                    }
                ],
            }
        )
    )
    return path


def _nudge_loss(path: Path, delta: float) -> None:
    summary = Summary.from_text(path.read_text())
    summary.tree["steps"][-1]["loss"] += delta
    path.write_text(summary.to_text())


@pytest.mark.parametrize("mode", list(MODES))
def test_default_fails_without_a_band_naming_the_classes_and_the_commands(other_class_only, mode):
    p, other = other_class_only
    result = run(p, mode)  # the ini sets no policy: the default
    result.assert_outcomes(passed=1, failed=1)
    assert result.ret == 1
    result.stdout.fnmatch_lines(
        [
            f"E*flannel snapshot test_loss[[]{K}[]]: no snapshot for this run's numerics class {K}; stored for: {OTHER}.",
            "E*Nothing was compared: comparing with another class needs a noise band for scale *, and "
            "flannel_noise_bands.json has none.",
            "E*To record this class: pytest test_mc.py::test_loss --snapshot-update (then review and commit the new file);",
            "E*or measure a band: flannel-repro noise --config FILE -o flannel_noise_bands.json (see docs/gate.md, *",
            "E*policy: --flannel-missing-class=tolerant|fail|skip (ini flannel_missing_class; this session: tolerant).",
        ]
    )
    result.stdout.fnmatch_lines(
        [
            "snapshots stored only for other numerics classes (--flannel-missing-class=tolerant):",
            f"  FAILED  test_loss[[]{K}[]]: this run {K}, nearest stored {OTHER}",
            "flannel snapshots: 0 compared exactly, 0 within the noise band, 1 not compared "
            "(1 failed: no noise band to compare with another class)",
            "  none of this session's 1 snapshot assertion(s) compared anything: the snapshot gate checked nothing",
        ]
    )
    assert "unused" not in result.stdout.str()  # another class's snapshot is not this session's
    assert other.exists()


def test_the_record_command_is_relative_to_where_pytest_runs(other_class_only, monkeypatch):
    p, other = other_class_only
    stored = other.read_text()
    sub = p.path / "sub"
    sub.mkdir()
    (p.path / "test_mc.py").rename(sub / "test_mc.py")
    (p.path / "__snapshots__").rename(sub / "__snapshots__")
    (sub / "test_b.py").write_text(
        "import pytest\n\n@pytest.mark.parametrize('x', ['a b'])\n"
        "def test_p(trajectory, flannel_snapshot, x):\n"
        "    assert flannel_snapshot == trajectory(42).summary()\n"
    )
    (sub / "__snapshots__" / "test_b").mkdir()
    (sub / "__snapshots__" / "test_b" / f"test_p[a b][{OTHER}].flannel").write_text(stored)
    monkeypatch.chdir(sub)  # node ids stay relative to the rootdir (above); the command is for here
    result = run(p, "no-xdist")
    result.assert_outcomes(passed=1, failed=2)
    result.stdout.fnmatch_lines(["E*To record this class: pytest test_mc.py::test_loss --snapshot-update *"])
    result.stdout.fnmatch_lines(["E*To record this class: pytest 'test_b.py::test_p[[]a b[]]' --snapshot-update *"])


@pytest.mark.parametrize("mode", list(MODES))
def test_skip_is_an_explicit_opt_in_and_is_counted_as_not_compared(other_class_only, mode):
    p, other = other_class_only
    result = run(p, mode, "--flannel-missing-class=skip")
    result.assert_outcomes(passed=1, skipped=1)
    assert result.ret == 0
    result.stdout.fnmatch_lines(
        [
            "snapshots stored only for other numerics classes (--flannel-missing-class=skip):",
            f"  SKIPPED test_loss[[]{K}[]]: this run {K}, nearest stored {OTHER}",
            "flannel snapshots: 0 compared exactly, 0 within the noise band, 1 not compared "
            "(1 skipped (--flannel-missing-class=skip))",
            "  none of this session's 1 snapshot assertion(s) compared anything: the snapshot gate checked nothing",
            f"SKIPPED*no snapshot for this run's numerics class {K}; stored for: {OTHER}. Nothing was compared (skipped "
            "by the opt-in --flannel-missing-class=skip); record this class: pytest test_mc.py::test_loss --snapshot-update*",
        ]
    )
    assert "unused" not in result.stdout.str()
    assert other.exists()


@pytest.mark.parametrize("mode", list(MODES))
def test_default_within_the_band_passes_and_beyond_it_fails(other_class_only, mode):
    p, other = other_class_only
    _band(p, other, allowance=1e-3)
    _nudge_loss(other, 0.5e-3)
    within = run(p, mode)  # the default policy: the band exists, so the comparison is tolerant
    within.assert_outcomes(passed=2)
    within.stdout.fnmatch_lines(
        [
            f"  PASSED  test_loss[[]{K}[]]: this run {K}, nearest stored {OTHER}",
            "flannel snapshots: 0 compared exactly, 1 within the noise band, 0 not compared",
        ]
    )
    assert "checked nothing" not in within.stdout.str()

    _nudge_loss(other, 1e-3)  # now 1.5e-3 from this run's value: beyond the band
    beyond = run(p, mode, "--flannel-missing-class=tolerant")  # the same, said explicitly
    beyond.assert_outcomes(passed=1, failed=1)
    beyond.stdout.fnmatch_lines(
        [
            "E*flannel snapshot test_loss[[]*[]] moved beyond the noise band: 1 of * compared values differ by more than "
            "arithmetic alone moves them*",
            f"E*compared with the nearest stored class {OTHER} (policy: --flannel-missing-class=tolerant|fail|skip *; "
            "or record this class: pytest test_mc.py::test_loss --snapshot-update *)",
            "E*compared within the noise band for scale * in *flannel_noise_bands.json: 2 x the largest deviation of "
            "portable:2 from portable:1*",
            "E*loss @ step 4 * band 0.001*",
        ]
    )
    beyond.stdout.fnmatch_lines(["flannel snapshots: 0 compared exactly, 1 within the noise band, 0 not compared"])


@pytest.mark.parametrize("mode", list(MODES))
def test_fail_policy_fails_even_with_a_band(other_class_only, mode):
    p, other = other_class_only
    _band(p, other, allowance=1e-3)
    failed = run(p, mode, "--flannel-missing-class=fail")
    failed.assert_outcomes(passed=1, failed=1)
    failed.stdout.fnmatch_lines(
        [
            f"E*no snapshot for this run's numerics class {K}; stored for: {OTHER}.",
            "E*Nothing was compared (--flannel-missing-class=fail).",
            "E*To record this class: pytest test_mc.py::test_loss --snapshot-update *",
            "E*policy: --flannel-missing-class=tolerant|fail|skip *this session: fail*",
        ]
    )
    failed.stdout.fnmatch_lines(
        [
            "flannel snapshots: 0 compared exactly, 0 within the noise band, 1 not compared "
            "(1 failed (--flannel-missing-class=fail))"
        ]
    )
    assert "unused" not in failed.stdout.str()


def test_snapshot_update_records_this_class_and_keeps_the_other(other_class_only):
    p, other = other_class_only
    update = run(p, "no-xdist", "--snapshot-update")
    assert update.ret == 0
    update.stdout.fnmatch_lines(
        [
            "flannel snapshots: 0 compared exactly, 0 within the noise band, 1 not compared "
            "(1 written by --snapshot-update)",
            "*1 snapshot generated.*",
        ]
    )
    assert "checked nothing" not in update.stdout.str()  # an update run compares nothing by design
    names = sorted(x.name for x in other.parent.iterdir())
    assert names == sorted([f"test_loss[{K}].flannel", other.name])
    again = run(p, "no-xdist", "--flannel-missing-class=fail")
    again.assert_outcomes(passed=2)  # this class has its own snapshot now: compared exactly, no policy
    again.stdout.fnmatch_lines(["flannel snapshots: 1 compared exactly, 0 within the noise band, 0 not compared"])


COUNTED = """
import pytest

@pytest.mark.parametrize("seed", [42, 43])
def test_twice(trajectory, flannel_snapshot, seed):
    assert flannel_snapshot == trajectory(seed).summary()
    assert flannel_snapshot(name="first") == trajectory(seed).summary(steps=[1])

def test_other(trajectory, flannel_snapshot):
    assert flannel_snapshot == trajectory(42).summary()

def test_new(trajectory, flannel_snapshot):
    assert flannel_snapshot == trajectory(43).summary()
"""


@pytest.mark.parametrize("mode", list(MODES))
def test_summary_counts_every_assertion(tiny_experiment, mode):
    """4 assertions compared exactly, 1 within the band, 1 with no snapshot at all, across xdist workers."""
    p = tiny_experiment
    p.makepyfile(test_count=COUNTED.replace("def test_new", "def _later"))
    assert run(p, "no-xdist", "--snapshot-update").ret == 0
    p.makepyfile(test_count=COUNTED)
    snaps = p.path / "__snapshots__" / "test_count"
    other = snaps / f"test_other[{OTHER}].flannel"
    (snaps / f"test_other[{K}].flannel").rename(other)
    _band(p, other, allowance=1e-3)
    result = run(p, mode)
    result.assert_outcomes(passed=3, failed=1)
    result.stdout.fnmatch_lines(
        [
            f"  PASSED  test_other[[]{K}[]]: this run {K}, nearest stored {OTHER}",
            "flannel snapshots: 4 compared exactly, 1 within the noise band, 1 not compared (1 failed: no snapshot stored)",
        ]
    )
    assert "checked nothing" not in result.stdout.str()
    result.stdout.fnmatch_lines(
        [
            "E*no stored snapshot test_new[[]*[]] (*): nothing was compared. Write it with "
            "pytest test_count.py::test_new --snapshot-update, then review and commit it"
        ]
    )


def test_bad_policy_and_bands_options_are_usage_errors(tiny_experiment):
    tiny_experiment.makepyfile(test_x="def test_x():\n    pass\n")
    bad = tiny_experiment.runpytest("--flannel-missing-class=maybe")
    assert bad.ret == pytest.ExitCode.USAGE_ERROR
    bad.stderr.fnmatch_lines(
        ["*--flannel-missing-class (ini: flannel_missing_class) accepts skip or fail or tolerant; got 'maybe'.*"]
    )
    absent = tiny_experiment.runpytest("--flannel-noise-bands=nowhere.json")
    assert absent.ret == pytest.ExitCode.USAGE_ERROR
    absent.stderr.fnmatch_lines(["*--flannel-noise-bands*accepts the path of an existing noise-bands JSON file*"])
    numerics = tiny_experiment.runpytest("--flannel-numerics=fast")
    assert numerics.ret == pytest.ExitCode.USAGE_ERROR
    numerics.stderr.fnmatch_lines(
        ["*--flannel-numerics (ini: flannel_numerics) accepts native or portable*; got 'fast'.*"]
    )


PORTABLE_CHECK = """
import os

def test_worker_runs_portable(trajectory):
    env = trajectory(42).env["numerics"]
    assert env["mode"] == "portable"
    assert env["env"] == {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2,STRICT"}
    assert env["probe"]["aten"] == "AVX2"
    assert env["class"].startswith("cpu-portable-"), env["class"]
    assert os.environ["MKL_CBWR"] == "AVX2,STRICT"
"""


@pytest.mark.parametrize("mode", list(MODES))
def test_portable_mode_is_arranged_at_start_for_every_worker(tiny_experiment, monkeypatch, mode):
    from flannel_repro.training.numerics import NUMERICS_ENV, cpu_has

    if cpu_has("avx2") is False:
        pytest.skip("this CPU lacks AVX2: portable mode refuses here (tested in tests/test_numerics.py)")
    for key in NUMERICS_ENV:  # a fresh process with nothing pinned: the plugin must arrange it
        monkeypatch.delenv(key, raising=False)
    tiny_experiment.makepyfile(test_p=PORTABLE_CHECK)
    result = tiny_experiment.runpytest_subprocess(*MODES[mode], "--flannel-numerics=portable", "--flannel-threads=1")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["numerics class: cpu-portable-*-t1 (requested numerics: portable)"])
