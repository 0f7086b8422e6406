"""flannel-repro prune: what no run of this installation can reuse, with sizes and a dry run."""

from __future__ import annotations

import os
import time

import pytest

from flannel_repro import cli
from flannel_repro.training import determinism
from flannel_repro.errors import ArtifactError
from flannel_repro.training.store import RunStore, find_orphans, prune
from tests.conftest import TINY


@pytest.fixture
def store_dir(tmp_path):
    root = tmp_path / "artifacts"
    RunStore(root).obtain(TINY.replace(steps=2))
    return root


def test_current_runs_are_kept(store_dir):
    assert find_orphans(store_dir) == []
    assert (store_dir / "CACHEDIR.TAG").exists()  # the store marks its directory as a cache


def test_runs_of_other_code_broken_files_and_leftovers_are_found(store_dir, monkeypatch, capsys):
    run = next(store_dir.glob("*.safetensors"))
    (store_dir / "broken.safetensors").write_bytes(b"not safetensors")
    partial = store_dir / "seed9-cpu-torch-r0-abc.safetensors.partial-999999-abc123"
    partial.write_bytes(b"x" * 10)
    old = time.time() - 3600
    os.utime(partial, (old, old))
    (store_dir / "gone.safetensors.lock").write_text("")
    monkeypatch.setattr(determinism, "code_version", lambda: "0123456789abcdef")  # as after an edit of the code

    found = {o.path.name: o for o in find_orphans(store_dir)}
    assert set(found) == {run.name, run.name + ".lock", "broken.safetensors", partial.name, "gone.safetensors.lock"}
    assert found[run.name].reason.startswith("flannel-repro code ") and "(now 0123456789abcdef)" in found[run.name].reason
    assert found[run.name].size == run.stat().st_size
    assert found["broken.safetensors"].reason.startswith("unreadable or incomplete")

    assert cli.main(["prune", "--artifacts", str(store_dir), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would delete 5 file(s)" in out and run.name in out and run.exists()

    assert len(prune(store_dir)) == 5
    assert not run.exists() and not partial.exists()
    assert (store_dir / "CACHEDIR.TAG").exists() and (store_dir / "training.log").exists()  # not artifacts
    assert find_orphans(store_dir) == []


def test_missing_directory_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(ArtifactError, match="expected an artifacts directory"):
        find_orphans(tmp_path / "nope")
    assert cli.main(["prune", "--artifacts", str(tmp_path / "nope")]) == 3
    assert "no such directory" in capsys.readouterr().err


def test_session_start_cleans_what_killed_runs_left_but_not_a_run_in_training(tmp_path):
    """Partials of dead writers and progress files of runs no one trains are removed; a progress file
    whose run lock is held (a training in another session) stays."""
    from filelock import FileLock

    from flannel_repro.training.store import clean_leftovers

    root = tmp_path / "artifacts"
    root.mkdir()
    dead = root / "a.safetensors.partial-999999999-0a1b2c3d"  # no such pid
    dead.write_bytes(b"x" * 100)
    old = time.time() - 3600
    os.utime(dead, (old, old))
    fresh = root / "b.safetensors.partial-999999999-0a1b2c3e"  # dead pid but touched a moment ago: maybe another machine
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
