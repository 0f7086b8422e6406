"""Disks fill and paths are odd: a run that cannot fit is refused before training, a disk that fills
while writing is an ArtifactError naming the path and the size (nothing half-written is left), and a
training record that cannot be appended does not fail a published run."""

from __future__ import annotations

import errno
import re
import os
from collections import namedtuple
from pathlib import Path

import pytest
import torch

from flannel_repro.errors import ArtifactError, ArtifactWarning
from flannel_repro.storage import writer
from flannel_repro.storage.layout import run_artifact_specs
from flannel_repro.runs.store import RunStore
from tests.conftest import TINY

Usage = namedtuple("Usage", "total used free")


def _writer(path):
    specs = run_artifact_specs(steps=2, vocab_size=512, hidden_dim=64, batch_size=4)
    return writer.ArtifactWriter(path, specs, {"format": "test"})


def test_a_run_that_cannot_fit_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.setattr(writer.shutil, "disk_usage", lambda p: Usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(
        ArtifactError,
        match=r"run\.safetensors: the artifact needs 0\.\d MB, and the file system of "
        r".* has 0\.0 MB free\. Free some space \(flannel-repro prune\)",
    ):
        with _writer(tmp_path / "run.safetensors"):
            pass
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ArtifactError, match="the artifact needs"):
        RunStore(tmp_path / "artifacts").obtain(TINY.replace(steps=2))
    left = [p.name for p in (tmp_path / "artifacts").iterdir()]
    assert not [n for n in left if n.endswith(".safetensors") or ".partial-" in n], left  # (its lock file stays)


def test_a_disk_that_fills_while_writing_names_the_path_and_leaves_nothing(tmp_path, monkeypatch):
    real = os.pwrite
    calls = {"n": 0}

    def filling(fd, data, offset):
        calls["n"] += 1
        if calls["n"] > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(writer.os, "pwrite", filling)
    with pytest.raises(
        ArtifactError,
        match=r"run\.safetensors: out of space while writing \(No space left on "
        r"device\): the artifact needs 0\.\d MB and .* free\. Nothing was published",
    ):
        with _writer(tmp_path / "run.safetensors") as w:
            for t in range(3):
                w.write_row("W", t, torch.zeros(512, 64, dtype=torch.bfloat16))
    assert list(tmp_path.iterdir()) == []  # the partial file is gone


def test_a_training_record_that_cannot_be_appended_does_not_fail_the_run(tmp_path):
    root = tmp_path / "artifacts"
    root.mkdir()
    (root / "training.log").mkdir()  # cannot be opened for appending
    with pytest.warns(ArtifactWarning, match="could not append the training record"):
        got = RunStore(root).obtain(TINY.replace(steps=2))
    assert got.trained and got.trajectory.verify() == []


_FSIZE_CHILD = """
import resource, sys
from pathlib import Path
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[2]), resource.RLIM_INFINITY))
from flannel_repro.errors import ArtifactError
from flannel_repro.runs.store import RunStore
sys.path.insert(0, sys.argv[3])
from tests.conftest import TINY
try:
    RunStore(Path(sys.argv[1])).obtain(TINY.replace(steps=4))
except ArtifactError as exc:
    print("ArtifactError:", exc)
    raise SystemExit(3)
"""


def test_a_real_file_size_limit_refuses_the_run_before_training(tmp_path):
    """Not simulated: the kernel's per-process file-size limit (ulimit -f) stands in for a too-small
    disk (this machine cannot mount one). The artifact's space is reserved before training, so the
    run is refused at once with the path, the size and the limit, and nothing is left behind."""
    import subprocess
    import sys

    root = tmp_path / "artifacts"
    limit = 64 * 1024  # the tiny run's artifact is ~1.6 MB; its token cache and small files fit under this
    done = subprocess.run(
        [sys.executable, "-c", _FSIZE_CHILD, str(root), str(limit), str(Path(__file__).parents[1])],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "FLANNEL_REPRO_CACHE": str(tmp_path / "cache")},
    )
    assert done.returncode == 3, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    assert re.search(
        r"\.safetensors: out of space while reserving its space \(File too large\): the artifact needs "
        r"\d+\.\d MB .* this process may write files of at most 0\.1 MB \(ulimit -f\)",
        done.stdout,
    ), done.stdout
    left = [p.name for p in root.iterdir()]
    assert not [n for n in left if n.endswith(".safetensors") or ".partial-" in n], left
    assert "training.log" not in left  # refused before anything trained
