"""Claims fail with the divergence table; runs are trained once per key, with and without xdist."""

from __future__ import annotations

import json

import pytest

USER_TESTS = """
import pytest
from flannel_repro import assert_identical, assert_diverged, assert_divergence_below

@pytest.mark.parametrize("seed", [42, 43])
def test_repeatable(trajectory, seed):
    assert_identical(trajectory(seed, repeat=0), trajectory(seed, repeat=1))

def test_seeds_part(trajectory):
    assert_diverged(trajectory(42), trajectory(43), by_step=1)

def test_bounded(trajectory):
    assert_divergence_below(trajectory(42), trajectory(43), max_frobenius=10.0)

def test_digest(trajectory):
    print("DIGEST", trajectory(43).digest_hex(4))
"""


def test_failing_claim_prints_summary_table_and_paths(tiny_experiment):
    tiny_experiment.makepyfile("""
        from flannel_repro import assert_identical

        def test_wrong_claim(trajectory):
            assert_identical(trajectory(42), trajectory(43))
    """)
    result = tiny_experiment.runpytest()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*assert_identical(trajectory(42), trajectory(43))*",
            "E*trajectories are not identical: they part at step 1",
            "E*a: seed=42 cpu torch repeat=0",
            "E*b: seed=43 cpu torch repeat=0",
            "E*first step they part: 1 of 4; at step 4: max|ΔW| = *, ‖ΔW‖_F = *, rows differing = * (live *, dead *)",
            "E*step | *max|ΔW| | *‖ΔW‖_F | *rows≠ | *live≠ | *dead≠",
            "E*artifact a: *seed42-cpu-torch-r0-*.safetensors",
            "E*artifact b: *seed43-cpu-torch-r0-*.safetensors",
        ]
    )
    # __tracebackhide__: no frames from inside flannel_repro.analysis.assertions
    assert "flannel_repro/assertions.py" not in result.stdout.str()


def test_bound_failure_names_the_bound(tiny_experiment):
    tiny_experiment.makepyfile("""
        from flannel_repro import assert_divergence_below

        def test_tight(trajectory):
            assert_divergence_below(trajectory(42), trajectory(43), max_frobenius=1e-9)
    """)
    result = tiny_experiment.runpytest()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["E*divergence at step 4 exceeds its bound: ‖ΔW‖_F = * > bound 1e-09"])


def test_same_artifact_twice_is_refused(tiny_experiment):
    tiny_experiment.makepyfile("""
        from flannel_repro import assert_identical

        def test_self(trajectory):
            t = trajectory(42)
            assert_identical(t, trajectory(42))
    """)
    result = tiny_experiment.runpytest()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["E*was given the same artifact twice*repeat=0 and repeat=1*"])


def _trainings(pytester) -> list[dict]:
    log = pytester.path / ".flannel" / "artifacts" / "training.log"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


@pytest.mark.parametrize("xdist_args", [[], ["-n", "0"], ["-n", "2"]], ids=["no-xdist", "n0", "n2"])
def test_user_suite_trains_each_run_once(tiny_experiment, xdist_args):
    tiny_experiment.makepyfile(test_user=USER_TESTS)
    result = tiny_experiment.runpytest_subprocess("-p", "xdist", "--flannel-threads", "1", "-s", *xdist_args)
    result.assert_outcomes(passed=5)
    trained = _trainings(tiny_experiment)
    runs = [t["run"] for t in trained]
    # seeds 42 and 43, repeats 0 and 1: four distinct runs, each trained exactly once
    assert len(runs) == 4 and len(set(runs)) == 4, runs
    result.stdout.fnmatch_lines(
        [
            "*= flannel-repro =*",
            "seed *device*engine*steps*final loss*artifact",
            "*different train seeds: * check(s), first divergent step 1*",
            "*same config, separate trainings: 2 check(s), 2 bitwise identical, never diverged*",
        ]
    )
    if xdist_args == ["-n", "2"]:
        assert {t["worker"] for t in trained} <= {"gw0", "gw1"}
    # a second session reuses everything; --flannel-fresh retrains
    again = tiny_experiment.runpytest_subprocess("-p", "xdist", "--flannel-threads", "1", *xdist_args)
    again.assert_outcomes(passed=5)
    assert len(_trainings(tiny_experiment)) == 4
    fresh = tiny_experiment.runpytest_subprocess(
        "-p", "xdist", "--flannel-threads", "1", "--flannel-fresh", *xdist_args
    )
    fresh.assert_outcomes(passed=5)
    assert len(_trainings(tiny_experiment)) == 8


def test_results_identical_with_and_without_xdist(pytester):
    """The same user test file, run in two fresh directories, one with -n 2: same digests."""
    from tests.plugin.conftest import TINY_TOML

    digests = []
    for args in ([], ["-n", "2"]):
        pytester.makefile(".toml", flannel=TINY_TOML)
        pytester.makeini("[pytest]\nflannel_config = flannel.toml\nflannel_progress = 0\n")
        pytester.makepyfile(test_user=USER_TESTS)
        out = pytester.runpytest_subprocess(
            "-p", "xdist", "-s", "--flannel-threads", "1", "--flannel-artifacts", f"art{len(digests)}", *args
        )
        out.assert_outcomes(passed=5)
        if args:
            # under xdist, worker output is not shown; read the digest from the artifact instead
            from flannel_repro.analysis.trajectory import Trajectory

            path = next((pytester.path / "art1").glob("seed43-cpu-torch-r0-*.safetensors"))
            digests.append(Trajectory(path).digest_hex(4))
        else:
            line = next(x for x in out.stdout.lines if "DIGEST" in x)
            digests.append(line.split("DIGEST ")[1].split()[0])
    assert digests[0] == digests[1]


def test_artifacts_directory_is_marked_as_a_cache(tiny_experiment):
    """Like pytest's own cache: backup tools skip it (CACHEDIR.TAG), git ignores it (.gitignore)."""
    tiny_experiment.makepyfile("def test_run(trajectory):\n    trajectory(42)\n")
    tiny_experiment.runpytest().assert_outcomes(passed=1)
    root = tiny_experiment.path / ".flannel" / "artifacts"
    assert (root / "CACHEDIR.TAG").read_text().startswith("Signature: 8a477f597d28d172789f06886806bc55\n")
    assert (root / ".gitignore").read_text().splitlines()[-1] == "*"
    (root / ".gitignore").write_text("# mine\n")
    tiny_experiment.runpytest("--flannel-fresh").assert_outcomes(passed=1)
    assert (root / ".gitignore").read_text() == "# mine\n"  # never overwritten
