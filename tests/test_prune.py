"""flannel-repro prune: what no run of this installation can reuse, with sizes and a dry run."""

from __future__ import annotations

import os
import time

import pytest

from flannel_repro import cli
from flannel_repro.training import determinism
from flannel_repro.errors import ArtifactError
from flannel_repro.runs.prune import find_orphans, prune, scan_artifacts
from flannel_repro.runs.store import RunStore
from tests.conftest import TINY


@pytest.fixture
def store_dir(tmp_path):
    root = tmp_path / "artifacts"
    RunStore(root).obtain(TINY.replace(steps=2))
    return root


def test_current_runs_are_kept(store_dir):
    assert find_orphans(store_dir) == []
    assert (store_dir / "CACHEDIR.TAG").exists()  # the store marks its directory as a cache


STORE_NAME = "seed9-cpu-torch-r0-0123456789ab.safetensors"  # a name the store gives a run (run_name)


def test_runs_of_other_code_and_leftovers_are_found(store_dir, monkeypatch, capsys):
    run = next(store_dir.glob("*.safetensors"))
    partial = store_dir / f"{STORE_NAME}.partial-999999-abc123"
    partial.write_bytes(b"x" * 10)
    old = time.time() - 3600
    os.utime(partial, (old, old))
    (store_dir / f"{STORE_NAME}.lock").write_text("")
    monkeypatch.setattr(determinism, "code_version", lambda: "0123456789abcdef")  # as after an edit of the code

    found = {o.path.name: o for o in find_orphans(store_dir)}
    assert set(found) == {run.name, run.name + ".lock", partial.name, f"{STORE_NAME}.lock"}
    assert (
        found[run.name].reason.startswith("flannel-repro code ") and "(now 0123456789abcdef)" in found[run.name].reason
    )
    assert found[run.name].size == run.stat().st_size

    assert cli.main(["prune", "--artifacts", str(store_dir), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would delete 4 file(s)" in out and run.name in out and run.exists()

    assert len(prune(store_dir)) == 4
    assert not run.exists() and not partial.exists()
    assert (store_dir / "CACHEDIR.TAG").exists() and (store_dir / "training.log").exists()  # not artifacts
    assert find_orphans(store_dir) == []


def _recorded_run(path):
    """A run recorded by hand with TrajectoryRecorder (docs/your-own-training.md): no store can retrain it."""
    import torch

    from flannel_repro import TrajectoryRecorder

    lin = torch.nn.Linear(4, 4)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    with TrajectoryRecorder(path, {"w": lin.weight}, steps=2, optimizer=opt, batch_size=1) as rec:
        for s in range(2):
            opt.zero_grad()
            lin(torch.randn(1, 4)).sum().backward()
            opt.step()
            rec.step(loss=1.0, batch=[s])


def test_files_the_store_did_not_write_are_kept_and_listed(store_dir, monkeypatch, capsys):
    """Ownership is the store's name for a run key and its run-key material, never "unreadable": a user's
    model, a hand-recorded run, an unreadable file, a store-like name on a foreign file are listed, never deleted."""
    from safetensors.torch import save_file
    import torch

    run = next(store_dir.glob("*.safetensors"))
    save_file({"w": torch.ones(3)}, str(store_dir / "model.safetensors"))
    _recorded_run(store_dir / "my-run.safetensors")
    (store_dir / "broken.safetensors").write_bytes(b"not safetensors")
    (store_dir / STORE_NAME).write_bytes(b"not safetensors")  # a store-like name, no run-key material
    (store_dir / "gone.safetensors.lock").write_text("")  # a lock of no name the store gives
    kept = ["broken.safetensors", "gone.safetensors.lock", "model.safetensors", "my-run.safetensors", STORE_NAME]
    before = {n: (store_dir / n).read_bytes() for n in kept}
    monkeypatch.setattr(determinism, "code_version", lambda: "0123456789abcdef")

    found = {o.path.name: o for o in scan_artifacts(store_dir)}
    assert sorted(n for n, o in found.items() if not o.owned) == kept
    assert all(found[n].reason.startswith("not ours, kept") for n in kept)
    assert {o.path.name for o in find_orphans(store_dir)} == {run.name, run.name + ".lock"}

    assert cli.main(["prune", "--artifacts", str(store_dir), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would delete 2 file(s)" in out and "kept 5 file(s) the run store did not write" in out
    assert all(f"{n}: not ours, kept" in out for n in kept)
    assert cli.main(["prune", "--artifacts", str(store_dir)]) == 0
    assert "my-run.safetensors: not ours, kept" in capsys.readouterr().out
    assert not run.exists()
    assert {n: (store_dir / n).read_bytes() for n in kept} == before


def test_a_damaged_run_of_the_store_is_deleted(store_dir):
    """A run the store wrote (its name and run-key material say so) that no longer reads is retrained on demand."""
    run = next(store_dir.glob("*.safetensors"))
    raw = run.read_bytes()
    run.write_bytes(raw[: len(raw) // 2])  # the header, with its metadata, survives
    found = {o.path.name: o for o in find_orphans(store_dir)}
    assert set(found) == {run.name, run.name + ".lock"}
    assert found[run.name].reason.startswith("damaged run of this store")
    prune(store_dir)
    assert not run.exists()


def test_missing_directory_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(ArtifactError, match="expected an artifacts directory"):
        find_orphans(tmp_path / "nope")
    assert cli.main(["prune", "--artifacts", str(tmp_path / "nope")]) == 3
    assert "no such directory" in capsys.readouterr().err


def test_session_start_cleans_what_killed_runs_left_but_not_a_run_in_training(tmp_path):
    """Partials of dead writers and progress files of runs no one trains are removed; a progress file
    whose run lock is held (a training in another session) stays."""
    from filelock import FileLock

    from flannel_repro.runs.store import clean_leftovers

    root = tmp_path / "artifacts"
    root.mkdir()
    dead = root / "a.safetensors.partial-999999999-0a1b2c3d"  # no such pid
    dead.write_bytes(b"x" * 100)
    old = time.time() - 3600
    os.utime(dead, (old, old))
    fresh = (
        root / "b.safetensors.partial-999999999-0a1b2c3e"
    )  # dead pid but touched a moment ago: maybe another machine
    fresh.write_bytes(b"x")
    orphan = root / "c.safetensors.progress"
    orphan.write_text("{}")
    busy = root / "d.safetensors.progress"
    busy.write_text("{}")
    with FileLock(str(root / "d.safetensors.lock")):
        removed = clean_leftovers(root)
    assert sorted(p.name for p in removed) == [dead.name, orphan.name]
    assert fresh.exists() and busy.exists()
    assert clean_leftovers(tmp_path / "absent") == []
