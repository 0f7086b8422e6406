"""flannel_snapshot: syrupy snapshots of run summaries, compared with tolerances, named per device class.

The workflow and the device-naming tests run with and without xdist (``-n 2``, in a subprocess):
under xdist every worker keeps its own syrupy session and the controller merges their reports, so
"unused snapshot" accounting (and the exit code) is where things go wrong if anything does.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flannel_repro.analysis.summary import Summary
from tests.plugin.conftest import TINY_TOML, cpu_class

K = cpu_class(threads=1)  # this machine's numerics class at one thread: the snapshots' names carry it

CI_TESTS = """
from flannel_repro.analysis.summary import summarize_pair

def test_summary(trajectory, flannel_snapshot):
    assert flannel_snapshot == trajectory(42).summary()

def test_pair(trajectory, flannel_snapshot):
    assert flannel_snapshot == summarize_pair(trajectory(42), trajectory(43))

def test_plain():
    pass
"""

MODES = {"no-xdist": [], "n2": ["-p", "xdist", "-n", "2"]}


def run(pytester: pytest.Pytester, mode: str, *args: str) -> pytest.RunResult:
    """In-process without xdist (fast; conftest imported torch first); xdist needs a subprocess."""
    common = ("--flannel-threads", "1", *args)
    if mode == "no-xdist":
        return pytester.runpytest(*common)
    return pytester.runpytest_subprocess(*MODES[mode], *common)


def _snapshot_dir(pytester: pytest.Pytester, module: str) -> Path:
    return pytester.path / "__snapshots__" / module


def _names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@pytest.mark.parametrize("mode", list(MODES))
def test_five_step_workflow(tiny_experiment, mode):
    p = tiny_experiment
    p.makepyfile(test_ci=CI_TESTS)
    snaps = _snapshot_dir(p, "test_ci")

    # 1. the first run writes the snapshots
    first = run(p, mode, "--snapshot-update")
    first.assert_outcomes(passed=3)
    assert first.ret == 0
    first.stdout.fnmatch_lines(
        [
            "flannel snapshots: 0 compared exactly, 0 within the noise band, 2 not compared "
            "(2 written by --snapshot-update)",
            "*2 snapshots generated.*",
        ]
    )
    assert _names(snaps) == [f"test_pair[{K}].flannel", f"test_summary[{K}].flannel"]
    stored = (snaps / f"test_summary[{K}].flannel").read_text()
    assert Summary.from_text(stored).tree["config"]["lr"] == 0.001

    # 2. the second run passes
    second = run(p, mode)
    second.assert_outcomes(passed=3)
    assert second.ret == 0
    second.stdout.fnmatch_lines(
        ["flannel snapshots: 2 compared exactly, 0 within the noise band, 0 not compared", "*2 snapshots passed.*"]
    )
    assert "unused" not in second.stdout.str()

    # 3. a changed learning rate fails, naming the moved fields and the first divergent step
    p.makefile(".toml", flannel=TINY_TOML.replace("steps = 4", "steps = 4\nlr = 0.002"))
    moved = run(p, mode)
    moved.assert_outcomes(passed=1, failed=2)
    assert moved.ret == 1
    moved.stdout.fnmatch_lines(
        [
            f"E*AssertionError: flannel snapshot test_summary[[]{K}[]] moved: * of * compared values differ (tolerance: exact)",
            f"E*snapshot file: __snapshots__/test_ci/test_summary[[]{K}[]].flannel",
            "E*the trajectories part at step 1 (steps 0..0 agree; at step 1 stored *, obtained *)",
            "E*which operation moved it: `flannel-repro oplog ARTIFACT --step 1 -o here.json` here and where*",
            "E*environment: same as stored (torch *",
            "E*field*stored*obtained*difference*allowed",
            "E*config.lr*0.001*0.002*+0.001*exact",
            "E*digest_chain*@1*@1*parts at step 1*exact",
            "E*loss @ step 4 *rel*exact",
            f"E*if the change is intended: pytest --snapshot-update, then review and commit __snapshots__/test_ci/test_summary[[]{K}[]].flannel",
        ]
    )
    moved.stdout.fnmatch_lines(
        [
            f"E*AssertionError: flannel snapshot test_pair[[]{K}[]] moved: *",
            "E*a: the trajectories part at step 1 *",
            "E*b: the trajectories part at step 1 *",
            "flannel snapshots: 2 compared exactly, 0 within the noise band, 0 not compared",  # compared, and failed
            "*2 snapshots failed.*",
        ]
    )
    assert "unused" not in moved.stdout.str()
    assert (snaps / f"test_summary[{K}].flannel").read_text() == stored  # a failure never rewrites

    # 4. syrupy's --snapshot-update accepts the change
    update = run(p, mode, "--snapshot-update")
    update.assert_outcomes(passed=3)
    assert update.ret == 0
    update.stdout.fnmatch_lines(["*2 snapshots updated.*"])
    assert Summary.from_text((snaps / f"test_summary[{K}].flannel").read_text()).tree["config"]["lr"] == 0.002

    # 5. the next run passes
    final = run(p, mode)
    final.assert_outcomes(passed=3)
    assert final.ret == 0
    final.stdout.fnmatch_lines(["*2 snapshots passed.*"])
    assert "unused" not in final.stdout.str()


DEVICE_TESTS = """
import pytest

def test_per_device(trajectory, device, flannel_snapshot):
    assert flannel_snapshot == trajectory(42).summary()
    assert flannel_snapshot == trajectory(43).summary()
    assert flannel_snapshot(name="final") == trajectory(42).summary(steps=[4])

@pytest.mark.parametrize("i", range(6))
def test_plain(i):
    pass
"""


@pytest.mark.parametrize("mode", list(MODES))
def test_snapshots_are_named_per_numerics_class_and_other_classes_are_left_alone(tiny_experiment, mode):
    import torch

    if torch.cuda.is_available() or torch.backends.mps.is_available():
        pytest.skip("a GPU is present: cuda/mps snapshots are this session's own here")
    p = tiny_experiment
    p.makepyfile(test_dev=DEVICE_TESTS)
    snaps = _snapshot_dir(p, "test_dev")
    first = run(p, mode, "--snapshot-update")
    first.assert_outcomes(passed=7)
    first.stdout.fnmatch_lines(["*3 snapshots generated.*"])
    own = [
        f"test_per_device[cpu][{K}.1].flannel",
        f"test_per_device[cpu][{K}.final].flannel",
        f"test_per_device[cpu][{K}].flannel",
    ]
    assert _names(snaps) == own
    assert (
        Summary.from_text((snaps / f"test_per_device[cpu][{K}.1].flannel").read_text()).tree["config"]["model_seed"]
        == 43
    )

    # Snapshots committed from GPU machines, and one left behind by a removed test.
    text = (snaps / f"test_per_device[cpu][{K}].flannel").read_text()
    foreign = [
        "test_per_device[cuda][cuda].flannel",
        "test_per_device[mps][mps].flannel",
        "test_x[cpu+cuda].flannel",
        "test_per_device[cpu][cpu-otherisa-mklother-t9].flannel",
        f"test_x[{K}+cuda-gpu-sm90-det0].flannel",
    ]
    for name in foreign:
        (snaps / name).write_text(text.replace('"device_class": "cpu"', '"device_class": "cuda"'))
    (snaps / f"test_removed[{K}].flannel").write_text(text)

    # Under -n 2 one worker runs no snapshot test: syrupy's fallback discovery there must not count
    # the cuda/mps files as unused. The orphan cpu snapshot is unused, truly.
    check = run(p, mode, "--snapshot-details")
    check.assert_outcomes(passed=7)
    assert check.ret == 1
    check.stdout.fnmatch_lines(
        [
            "*3 snapshots passed. 1 snapshot unused.*",
            f"Unused test_removed[[]{K}[]] (__snapshots__/test_dev/test_removed[[]{K}[]].flannel)",
        ]
    )
    assert "cuda" not in check.stdout.str().split("snapshot report summary")[1]

    cleanup = run(p, mode, "--snapshot-update")
    assert cleanup.ret == 0
    cleanup.stdout.fnmatch_lines(["*1 unused snapshot deleted.*"])
    assert _names(snaps) == sorted(own + foreign)  # the other classes' snapshots survive --snapshot-update

    again = run(p, mode)
    again.assert_outcomes(passed=7)
    assert again.ret == 0
    assert "unused" not in again.stdout.str()


SINGLE_TEST = """
import pytest

{marker}
def test_loss(trajectory, flannel_snapshot):
    assert flannel_snapshot == trajectory(42).summary()
"""


def _nudge_stored_loss(path: Path, delta: float) -> float:
    """Move the stored loss at the last step by `delta`; returns the stored value's magnitude."""
    summary = Summary.from_text(path.read_text())
    last = summary.tree["steps"][-1]
    last["loss"] = last["loss"] + delta
    path.write_text(summary.to_text())
    return abs(last["loss"])


def test_tolerance_edges_from_options_ini_and_marker(tiny_experiment):
    p = tiny_experiment
    p.makepyfile(test_tol=SINGLE_TEST.format(marker=""))
    assert run(p, "no-xdist", "--snapshot-update").ret == 0
    path = _snapshot_dir(p, "test_tol") / f"test_loss[{K}].flannel"
    delta = 1e-3
    magnitude = _nudge_stored_loss(path, delta)

    exact = run(p, "no-xdist")
    assert exact.ret == 1
    exact.stdout.fnmatch_lines(["E*moved: 1 of * compared values differ (tolerance: exact)", "E*loss @ step 4 *exact"])
    assert "the trajectories part" not in exact.stdout.str()  # the digests agree: only the stored float moved

    inside, outside = delta * 1.1, delta * 0.9
    assert run(p, "no-xdist", f"--flannel-atol={inside}").ret == 0
    out = run(p, "no-xdist", f"--flannel-atol={outside}")
    assert out.ret == 1
    out.stdout.fnmatch_lines(
        [
            f"E*moved: 1 of * (tolerance: rtol=0, atol={outside:g})",
            f"E*loss @ step 4 *-1.000e-03 (rel *) *{outside:.3g}",
        ]
    )
    assert run(p, "no-xdist", f"--flannel-rtol={inside / magnitude}").ret == 0
    assert run(p, "no-xdist", f"--flannel-rtol={outside / magnitude}").ret == 1

    p.makeini(f"[pytest]\nflannel_config = flannel.toml\nflannel_progress = 0\nflannel_atol = {inside}\n")
    assert run(p, "no-xdist").ret == 0
    p.makeini(f"[pytest]\nflannel_config = flannel.toml\nflannel_progress = 0\nflannel_atol = {outside}\n")
    assert run(p, "no-xdist").ret == 1

    # the marker is the most specific: it wins over the ini key and the option
    p.makepyfile(test_tol=SINGLE_TEST.format(marker=f"@pytest.mark.flannel(atol={inside})"))
    assert run(p, "no-xdist").ret == 0
    p.makepyfile(test_tol=SINGLE_TEST.format(marker=f"@pytest.mark.flannel(atol={outside})"))
    assert run(p, "no-xdist", f"--flannel-atol={inside}").ret == 1

    # one assertion can loosen its own tolerance
    p.makeini("[pytest]\nflannel_config = flannel.toml\nflannel_progress = 0\n")
    for atol, ret in ((inside, 0), (outside, 1)):
        p.makepyfile(
            test_tol=f"""
            def test_loss(trajectory, flannel_snapshot):
                assert flannel_snapshot.with_tolerance(atol={atol}) == trajectory(42).summary()
        """
        )
        assert run(p, "no-xdist").ret == ret


def test_tolerance_marker_keys_are_not_config_fields(tiny_experiment):
    tiny_experiment.makepyfile("""
        import pytest

        @pytest.mark.flannel(steps=3, rtol=1e-6, atol=0.0)
        def test_short(trajectory, flannel_snapshot):
            t = trajectory(42)
            assert t.steps == 3
            assert str(flannel_snapshot.tolerance) == "rtol=1e-06, atol=0"
    """)
    run(tiny_experiment, "no-xdist").assert_outcomes(passed=1)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--flannel-rtol=-1"], "*--flannel-rtol (ini: flannel_rtol) accepts a finite number >= 0; got '-1'.*"),
        (["--flannel-atol=abc"], "*--flannel-atol (ini: flannel_atol) accepts a finite number >= 0; got 'abc'.*"),
        (["--flannel-atol=inf"], "*--flannel-atol (ini: flannel_atol) accepts a finite number >= 0; got 'inf'.*"),
    ],
)
def test_tolerance_option_errors(tiny_experiment, args, message):
    tiny_experiment.makepyfile("def test_x():\n    pass\n")
    result = tiny_experiment.runpytest(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])


def test_tolerance_marker_errors(tiny_experiment):
    tiny_experiment.makepyfile("""
        import pytest

        @pytest.mark.flannel(rtol="tight")
        def test_x(flannel_snapshot):
            pass
    """)
    result = tiny_experiment.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["*test_x: @pytest.mark.flannel(rtol=...) must be a finite number >= 0 (got 'tight').*"]
    )


def test_missing_snapshot_and_foreign_data(tiny_experiment):
    tiny_experiment.makepyfile("""
        def test_new(trajectory, flannel_snapshot):
            assert flannel_snapshot == trajectory(42)   # a Trajectory stands for its default summary

        def test_wrong_type(flannel_snapshot):
            assert flannel_snapshot == {"loss": 1.0}
    """)
    result = run(tiny_experiment, "no-xdist")
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(
        [
            f"E*AssertionError: no stored snapshot test_new[[]{K}[]] (__snapshots__/*/test_new[[]{K}[]].flannel): "
            "nothing was compared. Write it with pytest test_missing_snapshot_and_foreign_data.py::test_new "
            "--snapshot-update, then review and commit it",
        ]
    )
    result.stdout.fnmatch_lines(
        ["E*TypeError: flannel_snapshot compares run summaries: expected a Summary *, got dict."]
    )


def test_corrupt_snapshot_is_reported_and_can_be_rewritten(tiny_experiment):
    p = tiny_experiment
    p.makepyfile(test_c=SINGLE_TEST.format(marker=""))
    assert run(p, "no-xdist", "--snapshot-update").ret == 0
    path = _snapshot_dir(p, "test_c") / f"test_loss[{K}].flannel"
    path.write_text("<<<<<<< HEAD\n")
    broken = run(p, "no-xdist")
    assert broken.ret == 1
    broken.stdout.fnmatch_lines(
        [
            f"E*flannel snapshot test_loss[[]{K}[]]: the stored snapshot cannot be read: *",
            "E*to rewrite it from this run: pytest --snapshot-update",
        ]
    )
    assert run(p, "no-xdist", "--snapshot-update").ret == 0
    assert json.loads(path.read_text())["kind"] == "run"


def test_snapshot_file_is_reviewable(tiny_experiment):
    """Sorted keys, one value per line, no paths or times: what reviewers see in a diff."""
    p = tiny_experiment
    p.makepyfile(test_r=SINGLE_TEST.format(marker=""))
    assert run(p, "no-xdist", "--snapshot-update").ret == 0
    text = (_snapshot_dir(p, "test_r") / f"test_loss[{K}].flannel").read_text()
    assert text.endswith("}\n") and str(p.path) not in text and "wall" not in text
    lines = text.splitlines()
    assert '  "config_fingerprint": ' in text and '  "digest_chain": [' in lines
    assert max(len(line) for line in lines) < 100


def test_flannel_snapshot_is_documented_and_needs_syrupy(tiny_experiment):
    p = tiny_experiment
    p.runpytest("--fixtures").stdout.fnmatch_lines(["flannel_snapshot*", "*syrupy snapshot of run summaries*"])
    p.makepyfile("def test_x(flannel_snapshot):\n    pass\n")
    result = p.runpytest("-p", "no:syrupy")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*flannel_snapshot needs the syrupy pytest plugin*"])
