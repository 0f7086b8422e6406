"""The bf16 stall diagnostic: the update statistics the recorder stores, the claim helper, and that
recording them changes nothing about training."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from flannel_repro import assert_not_stalled, stall_profile, train
from flannel_repro.analysis import stall
from flannel_repro.data.corpus import load_data
from flannel_repro.errors import ConfigError
from flannel_repro.storage.run import RunFile
from flannel_repro.training.harness import TorchLoop, torch_threads
from flannel_repro.training.model import embedding, shared_init_W
from tests.conftest import TINY

BASE = TINY.replace(steps=10).with_train_seed(42)


def _run(tmp_path: Path, name: str, **changes) -> Path:
    return train(BASE.replace(**changes), tmp_path / f"{name}.safetensors").path


def test_bf16_rounds_adams_second_moment_decay_away() -> None:
    """The fact behind `second_moment_moved`: 0.999 is 1.0 in bf16, so exp_avg_sq.mul_(beta2) is a no-op."""
    assert torch.tensor(0.999, dtype=torch.bfloat16).item() == 1.0
    v = torch.tensor([1e-6, 0.5, 3.0], dtype=torch.bfloat16)
    assert torch.equal(v.clone().mul_(0.999), v)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_recording_changes_nothing(tmp_path: Path, dtype: str) -> None:
    """W after every step of a recorded run is bitwise W of the same loop driven without the recorder (the
    update statistics read the optimizer's state; they must never write it)."""
    cfg = BASE.replace(dtype=dtype, amp="bfloat16" if dtype == "bfloat16" else "none", threads=1)
    run = RunFile(train(cfg, tmp_path / "r.safetensors").path)
    with torch_threads(1):
        loop = TorchLoop(cfg, load_data(cfg), shared_init_W(cfg))
        for t in range(1, cfg.steps + 1):
            loop.step(t)
            w = embedding(loop.model).detach()
            assert torch.equal(w.view(torch.uint8), run.W_at(t).view(torch.uint8)), f"{dtype}: W differs at step {t}"


def test_statistics_of_bf16_and_float32(tmp_path: Path) -> None:
    bf16 = stall_profile(_run(tmp_path, "bf16"))
    f32 = stall_profile(_run(tmp_path, "f32", dtype="float32", amp="none"))
    assert bf16.recorded and f32.recorded
    for p in (bf16, f32):
        assert all(math.isnan(getattr(p, f)[0]) for f in ("changed", "lost", "second_moment_moved"))
    assert (f32.changed[1:] > 0.99).all() and (f32.second_moment_moved[1:] > 0.99).all()
    # an entry that did not change either had no proposed update or lost it to rounding
    assert (bf16.lost[1:] <= 1 - bf16.changed[1:] + 1e-6).all() and (bf16.lost[1:] >= 0).all()
    assert bf16.lost[1:].sum() > f32.lost[1:].sum()
    # the changed share agrees with W itself
    from flannel_repro.analysis.bitwise import update_fraction

    np.testing.assert_allclose(
        bf16.changed[1:], update_fraction(bf16_path := tmp_path / "bf16.safetensors")[1:], rtol=0, atol=1e-7
    )
    assert bf16_path.exists()


def test_hf_engine_records_the_same_statistics(tmp_path: Path) -> None:
    torch_run = stall_profile(_run(tmp_path, "torch", steps=4))
    hf_run = stall_profile(_run(tmp_path, "hf", steps=4, engine="hf"))
    for f in ("changed", "lost", "second_moment_moved"):
        np.testing.assert_array_equal(getattr(torch_run, f), getattr(hf_run, f), err_msg=f)


def test_stall_claim_fails_with_a_located_message(tmp_path: Path) -> None:
    """With a learning rate far below bf16's resolution of the weights, the updates round away."""
    path = _run(tmp_path, "stalled", lr=1e-6)
    profile = stall_profile(path)
    at = profile.stalled_at(min_changed=0.05, window=3)
    assert at is not None and 3 <= at <= BASE.steps
    with pytest.raises(AssertionError) as info:
        assert_not_stalled(path, by_step=BASE.steps, min_changed=0.05, window=3)
    text = str(info.value)
    assert f"training stalled by step {BASE.steps}: at step {at} the share of W's entries that changed fell to" in text
    assert "were lost to rounding (smaller than half a bfloat16 ulp of the weight)" in text
    assert "Adam's second moment (exp_avg_sq) changed in" in text
    assert f"Plot: {stall.PLOT}" in text and "float32 weights" in text and str(path) in text
    # the same seed with float32 weights does not stall: the cure
    assert_not_stalled(
        _run(tmp_path, "cured", lr=1e-6, dtype="float32", amp="none"), by_step=BASE.steps, min_changed=0.05, window=3
    )


def test_stall_claim_passes_while_training_moves(tmp_path: Path) -> None:
    assert_not_stalled(_run(tmp_path, "moving"), by_step=5, min_changed=0.5, window=3)


def test_stall_arguments_are_checked(tmp_path: Path) -> None:
    path = _run(tmp_path, "args", steps=3)
    with pytest.raises(ConfigError, match=r"by_step: expected a step in 1\.\.3 of seed=42 .*, got 9"):
        assert_not_stalled(path, by_step=9)
    with pytest.raises(ConfigError, match=r"min_changed: expected a share in \[0, 1\], got 2"):
        stall_profile(path).stalled_at(min_changed=2)
    with pytest.raises(ConfigError, match=r"window: expected >= 1, got 0"):
        stall_profile(path).windowed(0)


def test_plot_names_agree() -> None:
    from flannel_repro.report.names import STALL_PLOT

    assert stall.PLOT == STALL_PLOT
