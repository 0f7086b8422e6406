"""Tests of the run artifact as the harness writes it (flannel_repro.storage.layout) and of the export to the
original notebook's single file (flannel_repro.storage.export)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flannel_repro.errors import ArtifactError
from flannel_repro.storage import layout
from flannel_repro.storage.export import NOTEBOOK_KEYS, export_notebook
from flannel_repro.storage.format import DIGEST_SIZE, digest_tensor
from flannel_repro.storage.layout import KEY_DIGESTS, KEY_W, META_FORMAT, RUN_FORMAT, run_config
from flannel_repro.storage.reader import ArtifactReader
from tests.test_writer_reader import H, S, V, assert_same, base_config, make_runs, make_trajectory, write_run


def test_trajectory_reads_without_mapping(tmp_path: Path) -> None:
    from flannel_repro.analysis.trajectory import Trajectory

    paths, Ws, _ = make_runs(tmp_path, 1)
    traj = Trajectory(paths[0])
    try:
        assert torch.isnan(traj.losses[0]) and traj.digests.shape == (S + 1, DIGEST_SIZE)
        assert int(traj.live_mask.sum()) == 40
        assert_same(traj.W_at(4), Ws[0][4])
        buf = torch.empty(V, H, dtype=torch.bfloat16)
        assert traj.W_at(5, out=buf) is buf and torch.equal(buf.view(torch.int16), Ws[0][5].view(torch.int16))
        assert_same(traj.W_initial, Ws[0][0])
        assert traj.reader._mm is None
        assert_same(traj.W[6], Ws[0][6])  # the array-like view maps the file
        traj.release_pages()
        assert_same(traj.W[6], Ws[0][6])
    finally:
        traj.close()


def test_run_artifact_layout(tmp_path: Path) -> None:
    paths, Ws, _ = make_runs(tmp_path, 1)
    with ArtifactReader(paths[0]) as r:
        assert r.metadata[META_FORMAT] == RUN_FORMAT
        assert run_config(r)["steps"] == S
        assert r.spec(KEY_W).shape == (S + 1, V, H)
        assert r.spec(KEY_DIGESTS).shape == (S + 1, DIGEST_SIZE)
        assert bytes(r[KEY_DIGESTS][2].numpy()) == digest_tensor(Ws[0][2])


def test_export_notebook(tmp_path: Path) -> None:
    paths, Ws, w0 = make_runs(tmp_path)
    out = export_notebook(paths, tmp_path / "notebook.safetensors")
    assert out == tmp_path / "notebook.safetensors" and not list(tmp_path.glob("*.partial-*"))
    nb = load_file(str(out))
    assert set(nb) == set(NOTEBOOK_KEYS)
    shapes = {"W": (3, S + 1, V, H), "losses": (3, S + 1), "W_initial": (V, H)}
    for k, dt in NOTEBOOK_KEYS.items():
        assert nb[k].dtype == dt, k
        assert tuple(nb[k].shape) == shapes.get(k, ()), k
    assert_same(nb["W"], torch.stack(Ws))
    assert_same(nb["W_initial"], w0)
    assert torch.isnan(nb["losses"][:, 0]).all()
    expected_losses = torch.linspace(5.0, 3.0, S + 1).to(torch.bfloat16)
    assert torch.equal(nb["losses"][:, 1:], expected_losses[1:].expand(3, S))
    ints = dict(n_runs=3, init_seed=42, base_train_seed=42, n_steps=S, n_live=40, n_dead=10, vocab_size=V, hidden_dim=H)
    for k, v in ints.items():
        assert nb[k].item() == v, k
    floats = dict(init_scale=0.02, learning_rate=1e-3, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999)
    for k, v in floats.items():
        assert nb[k].item() == torch.tensor(v, dtype=torch.float32).item(), k
    assert nb["recorded_W"].item() is True and nb["recorded_losses"].item() is True


def test_export_converts_float32_runs(tmp_path: Path) -> None:
    w0 = torch.randn(V, H, generator=torch.Generator().manual_seed(1)) * 0.02
    W = torch.stack([w0 + 0.001 * t for t in range(S + 1)])
    paths = [write_run(tmp_path / f"f{i}.safetensors", W, config=base_config()) for i in range(2)]
    nb = load_file(str(export_notebook(paths, tmp_path / "nb.safetensors")))
    assert_same(nb["W"][1], W.to(torch.bfloat16))


def test_export_refuses_mismatched_runs(tmp_path: Path) -> None:
    paths, Ws, w0 = make_runs(tmp_path, 2)
    other0 = w0.clone()
    other0.view(torch.int16)[0, 0] += 1
    bad = write_run(tmp_path / "bad_init.safetensors", make_trajectory(7, other0), config=base_config())
    with pytest.raises(ArtifactError, match=r"bad_init.*W_initial"):
        export_notebook([*paths, bad], tmp_path / "nb.safetensors")
    small = (0.02 * torch.randn(V, H - 2)).to(torch.bfloat16)
    bad_shape = write_run(
        tmp_path / "bad_shape.safetensors", make_trajectory(8, small), config=base_config(hidden_dim=H - 2)
    )
    with pytest.raises(ArtifactError, match=r"bad_shape.*hidden_dim"):
        export_notebook([*paths, bad_shape], tmp_path / "nb.safetensors")
    bad_steps = write_run(
        tmp_path / "bad_steps.safetensors", make_trajectory(9, w0, S - 1), config=base_config(steps=S - 1)
    )
    with pytest.raises(ArtifactError, match=r"bad_steps.*steps"):
        export_notebook([paths[0], bad_steps], tmp_path / "nb.safetensors")
    lying = write_run(tmp_path / "lying.safetensors", make_trajectory(9, w0, S - 1), config=base_config())
    with pytest.raises(ArtifactError, match=r"lying.*expected shape"):
        export_notebook([paths[0], lying], tmp_path / "nb.safetensors")
    assert not (tmp_path / "nb.safetensors").exists()
    assert not list(tmp_path.glob("*.partial-*"))


def test_write_run_checks_the_number_of_steps(tmp_path: Path) -> None:
    W = torch.zeros(4, 6, 3, dtype=torch.bfloat16)  # steps 0..3
    live = torch.ones(6, dtype=torch.bool)
    with pytest.raises(ArtifactError, match=r"expected W for steps 0\.\.2, got more"):
        layout.write_run(tmp_path / "long.safetensors", W, steps=2, live_mask=live, config={})
    with pytest.raises(ArtifactError, match=r"expected W for steps 0\.\.2, got no step"):
        layout.write_run(tmp_path / "empty.safetensors", [], steps=2, live_mask=live, config={})
    with pytest.raises(ArtifactError, match=r"rows never written: \{'updates': 1, 'W': 1, 'digests': 1\}"):
        layout.write_run(tmp_path / "short.safetensors", W[:2], steps=2, live_mask=live, config={})
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "nothing half-written may stay behind"
    ok = layout.write_run(tmp_path / "ok.safetensors", W[:3], steps=2, live_mask=live, config={})
    with ArtifactReader(ok) as r:
        assert r["W"].shape == (3, 6, 3) and torch.isnan(r["losses"]).all()
