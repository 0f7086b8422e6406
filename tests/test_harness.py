"""One run end to end: what the artifact holds, repeatability, seeds, optional recordings, kills."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from flannel_repro.storage.format import digest_tensor
from flannel_repro.data.corpus import DataOrder, load_data
from flannel_repro.errors import ConfigError
from flannel_repro.training.harness import train
from flannel_repro.training.model import shared_init_W
from flannel_repro.analysis.trajectory import Trajectory


def test_artifact_contents(tiny_config, tmp_path):
    cfg = tiny_config.with_train_seed(45)
    result = train(cfg, tmp_path / "run.safetensors")
    traj = Trajectory(result.path)
    S, V, H = cfg.steps, cfg.vocab_size, cfg.hidden_dim
    assert traj.W.shape == (S + 1, V, H) and traj.W.dtype == torch.bfloat16
    assert torch.equal(traj.W_at(0), shared_init_W(cfg))
    assert traj.losses.shape == (S + 1,) and traj.losses.dtype == torch.float32
    assert torch.isnan(traj.losses[0]) and torch.isfinite(traj.losses[1:]).all()
    for t in range(S + 1):
        assert bytes(traj.digests[t].tolist()) == digest_tensor(traj.W_at(t).contiguous())
    order = DataOrder(load_data(cfg).n_examples(cfg.seq_len), cfg.batch_size, cfg.data_seed)
    assert torch.equal(traj.batch_starts, torch.stack(list(order.batches(S))))
    assert traj.config == cfg
    env = traj.env
    assert env["packages"]["torch"] == torch.__version__.split("+")[0] or env["packages"]["torch"].startswith(
        torch.__version__.split("+")[0]
    )
    assert env["threads"] >= 1 and "deterministic_algorithms" in env
    assert json.loads(traj.metadata["data"])["n_live"] == int(traj.live_mask.sum())
    assert result.final_loss == pytest.approx(float(traj.losses[-1]))
    assert result.steps_per_s > 0


def test_same_seed_twice_is_bitwise_identical_and_seeds_differ(tiny_config, tmp_path):
    a = Trajectory(train(tiny_config.with_train_seed(42), tmp_path / "a.safetensors").path)
    b = Trajectory(train(tiny_config.with_train_seed(42), tmp_path / "b.safetensors").path)
    c = Trajectory(train(tiny_config.with_train_seed(43), tmp_path / "c.safetensors").path)
    assert torch.equal(a.digests, b.digests)
    assert torch.equal(a.W_at(0), c.W_at(0))
    assert not torch.equal(a.W_at(1), c.W_at(1))


def test_model_seed_and_data_seed_act_separately(tiny_config, tmp_path):
    base = tiny_config.replace(model_seed=42, data_seed=42)
    same_order = Trajectory(train(base.replace(model_seed=7), tmp_path / "m.safetensors").path)
    same_model = Trajectory(train(base.replace(data_seed=7), tmp_path / "d.safetensors").path)
    ref = Trajectory(train(base, tmp_path / "r.safetensors").path)
    assert torch.equal(same_order.batch_starts, ref.batch_starts)
    assert not torch.equal(same_model.batch_starts, ref.batch_starts)
    assert not torch.equal(same_order.W_at(1), ref.W_at(1))  # other init of the transformer blocks


def test_optional_recordings(tiny_config, tmp_path):
    cfg = tiny_config.replace(
        record_grads=True, record_momentum=True, record_variance=True, record_logits=True, probe_examples=2
    )
    traj = Trajectory(train(cfg, tmp_path / "all.safetensors").path)
    S, V, H, T = cfg.steps, cfg.vocab_size, cfg.hidden_dim, cfg.seq_len
    for key in ("grads", "exp_avg", "exp_avg_sq"):
        t = traj.optional(key)
        assert t.shape == (S + 1, V, H)
        assert not t[0].any(), f"{key} at step 0 must be zero"
        assert t[1].any(), f"{key} at step 1 must be recorded"
    assert (traj.optional("exp_avg_sq")[1:].float() >= 0).all()
    logits = traj.optional("probe_logits")
    assert logits.shape == (S + 1, 2, T, V)
    assert not torch.equal(logits[0], logits[S])


def test_not_recording_W_keeps_digests(tiny_config, tmp_path):
    traj = Trajectory(train(tiny_config.replace(record_W=False), tmp_path / "nw.safetensors").path)
    assert not traj.has_W and traj.digests.shape == (tiny_config.steps + 1, 32)
    from flannel_repro.errors import ArtifactError

    with pytest.raises(ArtifactError, match="W was not recorded"):
        _ = traj.W


def test_absent_device_is_a_clear_error(tiny_config, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA is present; this checks the message when it is absent")
    with pytest.raises(
        ConfigError,
        match=r"device 'cuda' was asked for but is not available: CUDA is not available \(torch.cuda.is_available\(\) is False\)",
    ):
        train(tiny_config.replace(device="cuda"), tmp_path / "x.safetensors")
    assert not list(tmp_path.iterdir())


def test_killed_run_leaves_no_complete_artifact(tiny_config, tmp_path):
    """SIGKILL in the middle of training: no file at the final name; the partial is not readable as whole."""
    out = tmp_path / "killed.safetensors"
    script = textwrap.dedent(f"""
        import os, signal
        from flannel_repro.config import RunConfig
        from flannel_repro.training.harness import train
        cfg = RunConfig(dataset="tiny", vocab_size=512, steps=50, batch_size=8, seq_len=32)
        def progress(step, steps, loss):
            if step == 5:
                os.kill(os.getpid(), signal.SIGKILL)
        train(cfg, {str(out)!r}, progress=progress)
    """)
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not out.exists()
    partials = list(tmp_path.glob("killed.safetensors.partial-*"))
    assert len(partials) == 1
    from flannel_repro.errors import ArtifactError

    with pytest.raises(ArtifactError):
        Trajectory(partials[0])


def test_interrupted_run_by_exception_cleans_up(tiny_config, tmp_path):
    out = tmp_path / "boom.safetensors"

    def progress(step, steps, loss):
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(tiny_config, out, progress=progress)
    assert list(tmp_path.iterdir()) == []


def test_shared_W_initial_matches_the_notebook_print():
    """The notebook printed W_initial's statistics (seed 42, randn(10000, 64) * 0.02 -> bf16):
    'Mean:  -0.000041', 'Std:   0.020019'. Our W_initial must print the same."""
    from flannel_repro.config import RunConfig

    w = shared_init_W(RunConfig())
    assert tuple(w.shape) == (10000, 64) and w.dtype == torch.bfloat16
    assert f"{w.float().mean():.6f}" == "-0.000041"
    assert f"{w.float().std():.6f}" == "0.020019"
