"""Issue 21, item 6: a run's thread count, and so its numerics class and bits, must not follow `-n`.

A snapshot written under plain `pytest --snapshot-update` is compared exactly under `pytest -n 2` on the same
machine, with no `flannel_threads` in the ini: it passes when nothing changed and fails when the learning rate
changed. (Before, plain pytest trained on every core and each xdist worker on one: another class, a skip.)
"""

from __future__ import annotations

import pytest

TEST = """
def test_loss(trajectory, flannel_snapshot):
    assert flannel_snapshot == trajectory(42).summary()
"""


def _project(pytester: pytest.Pytester, lr: str) -> None:
    pytester.makefile(
        ".toml",
        flannel=f"""
dataset = "tiny"
vocab_size = 512
steps = 3
batch_size = 8
seq_len = 32
lr = {lr}

[experiment]
n_runs = 1
base_train_seed = 42
""",
    )
    # no flannel_threads here: the default must be the same with and without xdist
    pytester.makeini("[pytest]\nflannel_config = flannel.toml\nflannel_progress = 0\n")


def test_snapshot_written_without_xdist_is_compared_exactly_under_n2(tiny_experiment):
    p = tiny_experiment
    p.makepyfile(test_lr=TEST)
    _project(p, "0.0011")
    written = p.runpytest_subprocess("--snapshot-update")
    assert written.ret == 0, written.stdout.str()
    [snap] = list((p.path / "__snapshots__" / "test_lr").iterdir())
    assert snap.name.endswith("-t1].flannel"), snap.name  # one thread, not this machine's core count

    same = p.runpytest_subprocess("-p", "xdist", "-n", "2", "--flannel-fresh")
    same.assert_outcomes(passed=1)
    same.stdout.fnmatch_lines(["flannel snapshots: 1 compared exactly, 0 within the noise band, 0 not compared"])

    _project(p, "0.001")
    changed = p.runpytest_subprocess("-p", "xdist", "-n", "2", "--flannel-fresh")
    changed.assert_outcomes(failed=1)
    changed.stdout.fnmatch_lines(["flannel snapshots: 1 compared exactly, 0 within the noise band, 0 not compared"])
    assert "config" in changed.stdout.str()
