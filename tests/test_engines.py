"""The lean loop is the notebook's experiment: bitwise equal to the transformers Trainer on CPU.

This equality is what lets the fast `torch` engine stand in for the notebook's `hf` engine.
"""

from __future__ import annotations

import pytest
import torch

from flannel_repro.config import RunConfig, notebook_config
from flannel_repro.training.harness import train
from flannel_repro.analysis.trajectory import Trajectory

STEPS = 20


def _train_both(cfg: RunConfig, tmp_path):
    out = {}
    for engine in ("hf", "torch"):
        result = train(cfg.replace(engine=engine), tmp_path / f"{engine}.safetensors")
        out[engine] = Trajectory(result.path)
    return out["hf"], out["torch"]


def _assert_bitwise(a: Trajectory, b: Trajectory) -> None:
    for t in range(a.steps + 1):
        wa, wb = a.W_at(t), b.W_at(t)
        assert torch.equal(wa.view(torch.int16), wb.view(torch.int16)), f"W differs at step {t}"
    assert torch.equal(a.digests, b.digests)
    la, lb = a.losses, b.losses
    assert torch.isnan(la[0]) and torch.isnan(lb[0])
    assert torch.equal(la[1:].view(torch.int32), lb[1:].view(torch.int32)), "losses differ bitwise"
    assert torch.equal(a.batch_starts, b.batch_starts)


@pytest.mark.parametrize("label_mode", ["notebook", "next_token"])
def test_engines_bitwise_equal_on_the_notebook_config(label_mode, tmp_path):
    """The notebook's exact configuration (10,000-token vocabulary, batch 32, seq 128, bf16) for 20 steps."""
    cfg = notebook_config(43).replace(steps=STEPS, label_mode=label_mode)
    hf, lean = _train_both(cfg, tmp_path)
    _assert_bitwise(hf, lean)
    assert not torch.equal(lean.W_at(STEPS), lean.W_at(0)), "training did not move W"


def test_engines_bitwise_equal_with_weight_decay_and_constant_schedule(tiny_config, tmp_path):
    """Knobs the notebook left at defaults: the two engines must agree on them too."""
    cfg = tiny_config.replace(
        steps=STEPS, weight_decay=0.1, lr_schedule="constant", warmup_steps=3, max_grad_norm=0.5
    ).with_train_seed(44)
    hf, lean = _train_both(cfg, tmp_path)
    _assert_bitwise(hf, lean)


def test_hf_engine_writes_no_checkpoint(tiny_config, tmp_path, monkeypatch):
    import tempfile

    made = []
    real = tempfile.mkdtemp

    def spy(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(tempfile, "mkdtemp", spy)
    train(tiny_config.replace(engine="hf", steps=3), tmp_path / "run.safetensors")
    assert made, "the hf engine did not use a scratch output_dir"
    import os

    assert not any(os.path.exists(d) for d in made), "scratch output_dir left behind"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.safetensors"]
