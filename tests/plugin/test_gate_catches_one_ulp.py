"""A single-bit change to W_initial is caught by a snapshot gate, with the first divergent step."""

from __future__ import annotations

ONE_ULP = """
import torch
import flannel_repro.training.harness as harness
import flannel_repro.training.model as model

_original = model.shared_init_W


def _one_ulp_up(config):
    w = _original(config).clone()
    w.view(torch.int16)[0, 0] += 1  # next representable bf16 value of W[0, 0]
    return w


model.shared_init_W = _one_ulp_up
harness.shared_init_W = _one_ulp_up
"""

GATE = """
def test_gate(trajectory, flannel_snapshot):
    assert flannel_snapshot == trajectory(42).summary()
"""


def test_one_ulp_change_to_W_initial_fails_the_gate(tiny_experiment):
    tiny_experiment.makepyfile(test_gate=GATE)
    tiny_experiment.runpytest_subprocess("--snapshot-update").assert_outcomes(passed=1)
    tiny_experiment.runpytest_subprocess().assert_outcomes(passed=1)
    tiny_experiment.makeconftest(ONE_ULP)
    # A patch in a conftest is not part of the run key (which hashes flannel_repro's own source, so an
    # edit of model.py would retrain by itself): ask for fresh trainings.
    result = tiny_experiment.runpytest_subprocess("--flannel-fresh")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "E*flannel snapshot test_gate[[]cpu-*-t*[]] moved: *",
            "E*the trajectories part at step 0*",
            "E*digests.first *",
        ]
    )
