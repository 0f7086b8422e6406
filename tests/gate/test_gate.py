"""This repository's reproducibility gate: committed CPU snapshots of the CI-scale runs.

A change to code, config, data or dependencies that moves a training trajectory fails here with
the fields that moved and the first step where the trajectories part. Accept an intended change
with `pytest tests/gate --snapshot-update` and commit the rewritten `__snapshots__` files.
"""

from __future__ import annotations

import pytest

from flannel_repro.config import PRESETS
from flannel_repro.analysis.summary import summarize_pair

GATE_SCALE = PRESETS["ci"]().run.fingerprint()


@pytest.fixture(autouse=True)
def _only_at_the_recorded_scale(flannel_config):
    if flannel_config.run.fingerprint() != GATE_SCALE:
        pytest.skip(
            f"the gate's snapshots were recorded at the CI scale (config {GATE_SCALE}); "
            f"this session runs config {flannel_config.run.fingerprint()}"
        )


def test_run_summary_did_not_move(trajectory, train_seed, device, flannel_snapshot):
    assert flannel_snapshot == trajectory(train_seed).summary()


def test_seed_pair_divergence_did_not_move(trajectory, device, flannel_config, flannel_snapshot):
    base, other = flannel_config.train_seeds[:2]
    assert flannel_snapshot == summarize_pair(trajectory(base), trajectory(other))
