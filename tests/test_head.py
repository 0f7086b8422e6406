"""The fused LM head + loss reproduces the model's own loss and gradients bit for bit."""

from __future__ import annotations

import json

import pytest
import torch

from flannel_repro.training import head
from flannel_repro.config import notebook_config
from flannel_repro.data.corpus import DataOrder, load_data, make_batch
from flannel_repro.errors import ConfigError, DeterminismError
from flannel_repro.training.harness import train, trainer_counts_shifted_labels, trainer_num_items
from flannel_repro.training.model import build_model, shared_init_W
from flannel_repro.analysis.trajectory import Trajectory


def _setup(cfg, step=1):
    data = load_data(cfg)
    model = build_model(cfg, shared_init_W(cfg))
    model.train()
    starts = DataOrder(data.n_examples(cfg.seq_len), cfg.batch_size, cfg.data_seed).batch(step)
    inputs, labels = make_batch(data.ids, starts, cfg.seq_len, cfg.label_mode)
    n = trainer_num_items(labels, trainer_counts_shifted_labels(model))
    return model, inputs, labels, n


def _loss_and_grads(model, inputs, labels, n, fused, *, amp, chunk=16, scale=None):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        loss = head.model_loss(model, inputs, labels, n, fused, chunk)
    (loss if scale is None else loss * scale).backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def _assert_same(a, b):
    (la, ga), (lb, gb) = a, b
    assert head._same_bits(la, lb), f"loss {la.item()!r} vs {lb.item()!r}"
    assert ga.keys() == gb.keys()
    for k in ga:
        assert head._same_bits(ga[k], gb[k]), f"gradient of {k} differs"


@pytest.mark.parametrize("label_mode", ["next_token", "notebook"])
@pytest.mark.parametrize("dtype,amp", [("bfloat16", "bfloat16"), ("float32", "bfloat16"), ("float32", "none")])
def test_fused_head_is_bitwise_equal_to_the_model(tiny_config, label_mode, dtype, amp):
    cfg = tiny_config.replace(label_mode=label_mode, dtype=dtype, amp=amp)
    model, inputs, labels, n = _setup(cfg)
    ref = _loss_and_grads(model, inputs, labels, n, False, amp=amp != "none")
    fused = _loss_and_grads(model, inputs, labels, n, True, amp=amp != "none")
    _assert_same(ref, fused)
    assert torch.isfinite(ref[0]) and any(g.abs().sum() > 0 for g in ref[1].values())


def test_a_short_last_chunk(tiny_config):
    """48 does not divide the 8 * 32 rows: the last chunk has 16 rows. (Chunk sizes are kept to
    multiples of 16: BLAS edge kernels for odd row counts may sum in another order; the harness's
    run-time check exists for exactly that, see test_engine_falls_back_or_refuses_when_the_check_fails.)"""
    model, inputs, labels, n = _setup(tiny_config)
    _assert_same(
        _loss_and_grads(model, inputs, labels, n, False, amp=True),
        _loss_and_grads(model, inputs, labels, n, True, amp=True, chunk=48),
    )


def test_fused_head_with_an_upstream_gradient_other_than_one(tiny_config):
    """backward() recomputes with the real upstream gradient when it is not 1 (not loss.backward())."""
    model, inputs, labels, n = _setup(tiny_config)
    ref = _loss_and_grads(model, inputs, labels, n, False, amp=True, scale=3.0)
    fused = _loss_and_grads(model, inputs, labels, n, True, amp=True, scale=3.0)
    _assert_same(ref, fused)


def test_ignored_rows_get_no_gradient_and_no_loss(tiny_config):
    model, inputs, labels, n = _setup(tiny_config)
    labels = labels.clone()
    labels[:, : labels.shape[1] // 2] = head.IGNORE_INDEX  # half of every sequence ignored
    ref = _loss_and_grads(model, inputs, labels, n, False, amp=True)
    fused = _loss_and_grads(model, inputs, labels, n, True, amp=True)
    _assert_same(ref, fused)


def test_notebook_scale_batch_is_bitwise_equal():
    """The notebook's shapes (4096 rows x 10,000 logits) with the default chunk size."""
    cfg = notebook_config(42)
    model, inputs, labels, n = _setup(cfg, step=3)
    assert head.verify_fused_head(model, inputs, labels, n, amp_dtype=torch.bfloat16) is None


def test_verify_reports_a_difference(tiny_config, monkeypatch):
    model, inputs, labels, n = _setup(tiny_config)
    real = head._chunk_grads

    def off_by_one_ulp(h, W, targets, g, chunk, grad_logits):
        picked = real(h, W, targets, g, chunk, grad_logits)
        return torch.nextafter(picked, torch.full_like(picked, -1.0))

    monkeypatch.setattr(head, "_chunk_grads", off_by_one_ulp)
    problem = head.verify_fused_head(model, inputs, labels, n, amp_dtype=torch.bfloat16)
    assert problem is not None and problem.startswith("loss ")
    assert all(p.grad is None for p in model.parameters()), "verification must leave no gradients behind"


def _head_meta(path):
    return json.loads(Trajectory(path).metadata["head"])


def test_engine_uses_the_fused_head_and_records_it(tiny_config, tmp_path):
    fused = train(tiny_config, tmp_path / "fused.safetensors")
    ref = train(tiny_config.replace(head="reference"), tmp_path / "ref.safetensors")
    meta = _head_meta(fused.path)
    assert meta["used"] == "fused" and meta["check_failures"] == {} and meta["checked_shapes"] == [[8, 32]]
    assert _head_meta(ref.path)["used"] == "reference"
    a, b = Trajectory(fused.path), Trajectory(ref.path)
    assert torch.equal(a.digests, b.digests) and torch.equal(a.losses.view(torch.int32), b.losses.view(torch.int32))
    assert tiny_config.replace(head="reference").fingerprint() == tiny_config.fingerprint()


def test_engine_falls_back_or_refuses_when_the_check_fails(tiny_config, tmp_path, monkeypatch):
    import flannel_repro.training.harness as harness

    monkeypatch.setattr(harness, "verify_fused_head", lambda *a, **k: "gradient of x differs from the model's")
    result = train(tiny_config, tmp_path / "auto.safetensors")  # auto: falls back, says why
    meta = _head_meta(result.path)
    assert meta["used"] == "reference"
    assert meta["check_failures"] == {"[8, 32]": "gradient of x differs from the model's"}
    with pytest.raises(DeterminismError, match=r"head = 'fused' is not bitwise equal .* gradient of x differs"):
        train(tiny_config.replace(head="fused"), tmp_path / "fused.safetensors")
    assert not (tmp_path / "fused.safetensors").exists()


def test_fused_head_needs_the_torch_engine_without_compile(tiny_config, tmp_path):
    with pytest.raises(ConfigError, match=r"head = 'fused' needs engine = 'torch'.*got engine='hf'"):
        train(tiny_config.replace(head="fused", engine="hf"), tmp_path / "x.safetensors")
    with pytest.raises(ConfigError, match=r"'head' must be one of 'auto', 'fused', 'reference' \(got 'fast'\)"):
        tiny_config.replace(head="fast")


def test_chunk_must_be_positive(tiny_config):
    model, inputs, labels, n = _setup(tiny_config)
    hidden = model.transformer(input_ids=inputs).last_hidden_state
    with pytest.raises(ValueError, match="chunk must be a positive number of rows, got 0"):
        head.fused_head_loss(hidden, model.lm_head.weight, labels, n, chunk=0)
