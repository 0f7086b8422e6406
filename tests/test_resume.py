"""Resume equals uninterrupted: checkpoints (safetensors + JSON, never pickle), stop/resume at several steps,
a kill -9 while training, and the `resume_at` claim through the plugin."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from flannel_repro.bits import bits_view
from flannel_repro.errors import ArtifactError, ArtifactWarning, ConfigError
from flannel_repro.storage import checkpoint
from flannel_repro.storage.run import RunFile
from flannel_repro.training.harness import train
from flannel_repro.training.resume import TrainingStopped, checkpoint_path, resumable_path
from tests.conftest import TINY
from tests.faults.probes_checkpoints import checkpoint_metadata, in_checkpoint, in_partial, next_epoch, tensor_span
from tests.plugin.conftest import TINY_TOML

# every optional recording on: resume must restore everything each of them depends on
FULL = TINY.replace(steps=10, record_grads=True, record_momentum=True, record_variance=True, record_logits=True)


def assert_bitwise_equal_artifacts(a_path, b_path) -> None:
    a, b = RunFile(a_path), RunFile(b_path)
    try:
        assert sorted(a.reader.keys()) == sorted(b.reader.keys())
        for key in a.reader.keys():
            ta, tb = a.reader.read(key), b.reader.read(key)
            assert ta.dtype == tb.dtype and ta.shape == tb.shape, key
            if ta.dtype.is_floating_point:  # bits, not values: NaN rows (step 0's loss) must match too
                ta, tb = bits_view(ta), bits_view(tb)
            assert torch.equal(ta, tb), f"{key} differs"
    finally:
        a.close()
        b.close()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    path = tmp_path_factory.mktemp("ref") / "ref.safetensors"
    return train(FULL, path, metadata={"run_key": "k"}).path


@pytest.mark.parametrize("stop", [1, 4, FULL.steps])
def test_stopped_and_resumed_equals_uninterrupted(tmp_path, reference, stop):
    path = tmp_path / "run.safetensors"
    with pytest.raises(TrainingStopped) as info:
        train(FULL, path, metadata={"run_key": "k"}, stop_at=stop)
    assert info.value.step == stop
    assert not path.exists() and checkpoint_path(path).exists() and resumable_path(path).exists()
    assert checkpoint.load(checkpoint_path(path)).step == stop
    train(FULL, path, metadata={"run_key": "k"}, checkpoint_every=3)
    assert RunFile(path).metadata["resumed_from"] == str(stop)
    assert not checkpoint_path(path).exists() and not resumable_path(path).exists()  # nothing left behind
    assert_bitwise_equal_artifacts(reference, path)


def test_checkpoints_of_another_run_are_not_resumed(tmp_path, reference):
    path = tmp_path / "run.safetensors"
    with pytest.raises(TrainingStopped):
        train(FULL, path, metadata={"run_key": "other"}, stop_at=4)
    train(FULL, path, metadata={"run_key": "k"}, checkpoint_every=3)  # another key: trained from the start
    assert "resumed_from" not in RunFile(path).metadata
    assert_bitwise_equal_artifacts(reference, path)


def _header_byte(path):
    with open(resumable_path(path), "r+b") as f:
        f.seek(40)
        f.write(b"#")


def _wrong_digest_after_the_checkpoint(path):
    begin, _ = tensor_span(resumable_path(path), "digests")
    with open(resumable_path(path), "r+b") as f:
        f.seek(begin + 5 * 32)
        f.write(b"\x01" * 32)


DAMAGE = {
    "a bit of a non-W weight": in_checkpoint("objects.model.transformer.h.0.attn.c_attn.weight"),
    "a bit of exp_avg of a non-W parameter": in_checkpoint("objects.optimizer.state.3.exp_avg"),
    "a bit of exp_avg_sq of W": in_checkpoint("objects.optimizer.state.0.exp_avg_sq"),
    "a bit of the optimizer's step counter": in_checkpoint("objects.optimizer.state.0.step", 0.9),
    "the scheduler's last_epoch in the state JSON": checkpoint_metadata(next_epoch),
    "the checkpoint's step": checkpoint_metadata(lambda m: m.update(step=str(int(m["step"]) + 1))),
    "a bit of a written W row of the partial file": in_partial("W", 1, FULL.steps + 1),
    "a bit of a written loss of the partial file": in_partial("losses", 2, FULL.steps + 1),
    "a byte of the partial file's header": _header_byte,
    "a wrong digest recorded after the checkpoint": _wrong_digest_after_the_checkpoint,
}


@pytest.mark.parametrize("damage", list(DAMAGE), ids=list(DAMAGE))
def test_a_damaged_checkpoint_or_partial_file_is_discarded_and_the_run_trained_from_the_start(
    tmp_path, reference, damage
):
    """Nothing on disk is trusted between the stopped and the resuming process: whatever was changed, the
    published run is the uninterrupted one, and its metadata says why the checkpoint was not resumed."""
    path = tmp_path / "run.safetensors"
    with pytest.raises(TrainingStopped):
        train(FULL, path, metadata={"run_key": "k"}, stop_at=4)
    DAMAGE[damage](path)
    with pytest.warns(ArtifactWarning, match=r"run\.safetensors: not resumed, trained from the start"):
        train(FULL, path, metadata={"run_key": "k"})
    meta = RunFile(path).metadata
    assert "resumed_from" not in meta and meta["resume_discarded"], meta.get("resume_discarded")
    assert not checkpoint_path(path).exists() and not resumable_path(path).exists()
    assert_bitwise_equal_artifacts(reference, path)


def test_a_checkpoint_or_partial_path_that_is_not_a_file_is_a_named_error(tmp_path):
    path = tmp_path / "run.safetensors"
    checkpoint_path(path).mkdir()
    with pytest.raises(
        ArtifactError,
        match=r"run\.safetensors\.ckpt: expected a checkpoint .a regular file. or nothing"
        r", got a directory",
    ):
        train(FULL, path, metadata={"run_key": "k"}, checkpoint_every=2)
    checkpoint_path(path).rmdir()
    resumable_path(path).mkdir()
    with pytest.raises(
        ArtifactError,
        match=r"run\.safetensors\.resumable: expected a resumable partial artifact .a "
        r"regular file. or nothing, got a directory",
    ):
        train(FULL, path, metadata={"run_key": "k"}, checkpoint_every=2)
    assert resumable_path(path).is_dir() and not path.exists()  # not ours: left as it was


def test_stop_at_and_engine_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"'stop_at' must be a step in \[1, 10\] \(got 11\)"):
        train(FULL, tmp_path / "a.safetensors", stop_at=11)
    with pytest.raises(ConfigError, match="engine = 'torch' and registered engines .got engine='hf'"):
        train(FULL.replace(engine="hf"), tmp_path / "b.safetensors", checkpoint_every=2)
    assert not list(tmp_path.iterdir())


_CHILD = """
import sys
from tests.conftest import TINY
from flannel_repro.training.harness import train
cfg = TINY.replace(steps=int(sys.argv[2]), record_momentum=True, record_variance=True, threads=1)
train(cfg, sys.argv[1], metadata={"run_key": "k"}, checkpoint_every=2)
"""


def _train_in_child_and_kill(path, steps: int, min_step: int) -> int:
    """Start the run in a child process, SIGKILL it once its checkpoint reaches `min_step`; the checkpoint's step."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(path), str(steps)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and child.poll() is None:
            ckpt = checkpoint_path(path)
            if ckpt.exists() and checkpoint.load(ckpt).step >= min_step:
                break
            time.sleep(0.02)
        assert child.poll() is None, f"the child ended before it could be killed: {child.stderr.read()[-2000:]!r}"
        child.send_signal(signal.SIGKILL)  # no handler runs, nothing is cleaned up
    finally:
        child.wait(60)
    assert child.returncode == -signal.SIGKILL
    assert not path.exists() and resumable_path(path).exists()
    return checkpoint.load(checkpoint_path(path)).step


def test_kill_9_while_training_then_resume_equals_uninterrupted(tmp_path):
    """Killed twice (the second time while resuming), at whatever moment the polling lands on (writing a row,
    hashing, writing a checkpoint); training the run again resumes from the last checkpoint and ends bitwise
    equal to a run that was never killed."""
    steps = 400
    # one thread pinned in every process: a fresh process would otherwise take all cores, and another thread
    # count is other arithmetic (an xdist worker of this suite runs with one)
    cfg = TINY.replace(steps=steps, record_momentum=True, record_variance=True, threads=1)
    path = tmp_path / "run.safetensors"
    first = _train_in_child_and_kill(path, steps, 4)
    second = _train_in_child_and_kill(path, steps, first + 6)  # this child resumed from `first`
    assert 4 <= first < first + 6 <= second < steps

    train(cfg, path, metadata={"run_key": "k"}, checkpoint_every=2)
    assert int(RunFile(path).metadata["resumed_from"]) >= second  # from the last checkpoint, not from 0
    reference = train(cfg, tmp_path / "ref.safetensors", metadata={"run_key": "k"}).path
    assert_bitwise_equal_artifacts(reference, path)


def test_checkpoint_state_round_trips_without_pickle(tmp_path):
    state = {
        "a": torch.arange(4, dtype=torch.bfloat16),
        "ints": {0: {"step": torch.tensor(3.0)}, 7: [1, 2]},
        "tuple": (0.9, 0.999),
        "floats": [math.inf, -math.inf, 1e-300],
        "nan": math.nan,
        "none": None,
        "flag": True,
        "text": "x",
    }
    path = checkpoint.save(tmp_path / "c.ckpt", 5, state, {"run_key": "r"})
    got = checkpoint.load(path)
    assert got.step == 5 and got.info == {"run_key": "r"}
    assert torch.equal(got.state["a"], state["a"]) and got.state["a"].dtype == torch.bfloat16
    assert got.state["ints"][7] == [1, 2] and torch.equal(got.state["ints"][0]["step"], torch.tensor(3.0))
    assert got.state["tuple"] == (0.9, 0.999) and isinstance(got.state["tuple"], tuple)
    assert got.state["floats"] == [math.inf, -math.inf, 1e-300] and math.isnan(got.state["nan"])
    assert (got.state["none"], got.state["flag"], got.state["text"]) == (None, True, "x")
    # the file is plain safetensors with JSON metadata
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        assert json.loads(f.metadata()["info"]) == {"run_key": "r"}


def test_checkpoint_errors_name_the_thing(tmp_path):
    with pytest.raises(
        ArtifactError,
        match=r"checkpoint state opt\.fn: .*got builtin_function_or_method; it cannot be stored without pickling",
    ):
        checkpoint.save(tmp_path / "c.ckpt", 1, {"opt": {"fn": len}})
    assert not list(tmp_path.iterdir())  # nothing half-written
    (tmp_path / "bad.ckpt").write_bytes(b"not safetensors")
    with pytest.raises(
        ArtifactError, match=r"bad\.ckpt: expected a checkpoint \(safetensors\), got an unreadable file"
    ):
        checkpoint.load(tmp_path / "bad.ckpt")
    with pytest.raises(ArtifactError, match=r"missing\.ckpt: expected a checkpoint, found no such file"):
        checkpoint.load(tmp_path / "missing.ckpt")


def test_resume_at_claim_in_a_session(pytester):
    """`trajectory(42, resume_at=k)` is trained stopped at k in one fresh process and resumed in another;
    the claim that it equals the uninterrupted run passes, for the first step and the last."""
    pytester.makefile(".toml", flannel=TINY_TOML)
    pytester.makepyfile("""
        import pytest
        from flannel_repro import assert_identical

        @pytest.mark.parametrize("k", [1, 4])
        def test_resume_changes_nothing(trajectory, k):
            resumed = trajectory(42, resume_at=k)
            assert resumed.metadata["resumed_from"] == str(k)
            assert_identical(trajectory(42), resumed)

        def test_resume_at_out_of_range(trajectory):
            trajectory(42, resume_at=5)
    """)
    result = pytester.runpytest_subprocess(
        "--flannel-config=flannel.toml", "--flannel-threads=1", "-p", "no:cacheprovider"
    )
    result.assert_outcomes(passed=2, errors=0, failed=1)
    result.stdout.fnmatch_lines(["*resume_at must be a step in [[]1, 4[]] (got 5)*"])


def test_prune_keeps_a_resumable_run_and_removes_what_cannot_resume(tmp_path):
    from flannel_repro.runs.prune import prune

    # names the run store gives (prune touches only the store's files)
    live = tmp_path / "seed42-cpu-torch-r0-00000000000a.safetensors"
    with pytest.raises(TrainingStopped):
        train(FULL, live, metadata={"run_key": "k"}, stop_at=3)
    done = tmp_path / "seed42-cpu-torch-r0-00000000000b.safetensors"
    train(FULL, done, metadata={"run_key": "k"})
    checkpoint_path(done).write_bytes(checkpoint_path(live).read_bytes())  # a checkpoint beside a finished run
    lonely = tmp_path / "seed42-cpu-torch-r0-00000000000c.safetensors"
    resumable_path(lonely).write_bytes(b"\0" * 64)  # a partial file whose checkpoint is gone
    found = {o.path.name: o.reason for o in prune(tmp_path, dry_run=True)}
    assert found.get(done.name + ".ckpt") == "resume file of a run that finished", found
    assert found.get(lonely.name + ".resumable") == "resume file without its checkpoint", found
    assert not any(name.startswith(live.name) for name in found), found
    prune(tmp_path)
    assert checkpoint_path(live).exists() and resumable_path(live).exists()
    train(FULL, live, metadata={"run_key": "k"})  # still resumes after the prune
    assert RunFile(live).metadata["resumed_from"] == "3"


def test_session_start_removes_a_resumable_file_without_checkpoint_and_keeps_one_with(tmp_path):
    from flannel_repro.runs.store import clean_leftovers

    keep = tmp_path / "keep.safetensors"
    with pytest.raises(TrainingStopped):
        train(FULL, keep, metadata={"run_key": "k"}, stop_at=2)
    lone = resumable_path(tmp_path / "lone.safetensors")
    lone.write_bytes(b"\0" * 64)  # killed before its first checkpoint
    assert clean_leftovers(tmp_path, older_than_s=0) == [lone]
    assert resumable_path(keep).exists() and checkpoint_path(keep).exists() and not lone.exists()
