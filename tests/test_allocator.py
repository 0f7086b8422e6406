"""The malloc tuning is a speed setting only: it must not move a single bit of the trajectory."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from flannel_repro.analysis.trajectory import Trajectory

SCRIPT = textwrap.dedent("""
    import sys
    from flannel_repro.config import RunConfig
    from flannel_repro.training.harness import train
    cfg = RunConfig(dataset="tiny", vocab_size=512, steps=8, batch_size=8, seq_len=32)
    train(cfg, sys.argv[1])
""")


def _run(path, malloc: str) -> Trajectory:
    env = {**os.environ, "FLANNEL_REPRO_MALLOC": malloc, "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run([sys.executable, "-c", SCRIPT, str(path)], check=True, env=env, capture_output=True)
    return Trajectory(path)


def test_tuned_and_default_malloc_give_identical_trajectories(tmp_path):
    tuned = _run(tmp_path / "tuned.safetensors", "1")
    plain = _run(tmp_path / "plain.safetensors", "0")
    assert tuned.env["malloc"]["applied"] is True
    assert plain.env["malloc"]["applied"] is False
    assert "FLANNEL_REPRO_MALLOC=0" in plain.env["malloc"]["reason"]
    assert (tuned.digests == plain.digests).all()
    assert (tuned.losses[1:].view(-1) == plain.losses[1:].view(-1)).all()
