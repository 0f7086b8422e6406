"""Resuming a run: checkpoints while training, and continuing a stopped or killed run bitwise.

A resumable run writes its artifact under a fixed temporary name, `<artifact>.resumable`, and every
`every` steps a checkpoint, `<artifact>.ckpt` (`flannel_repro.storage.checkpoint`): the full training
state at that step plus the artifact's header metadata and the digest of the recorded tensor there.
The order of the two writes is what keeps them consistent after a kill at any moment: the artifact's
rows up to step k are fsynced *before* the checkpoint of step k is renamed into place, so a checkpoint
never points at rows that are not on disk. Rows after k that a killed run wrote are written again,
with the same values, by the resumed run. When the run finishes, the artifact is published atomically
and the checkpoint is deleted; a checkpoint left beside a published artifact is ignored and removed.

Resuming rebuilds the loop from the config, loads the state, checks that the restored tensor's digest
is the checkpoint's, adopts the temporary file (its header checked byte for byte) and continues at
step k + 1. Data orders are pure functions of (data seed, step), so the data position is the step.

Nothing on disk is trusted between the two processes. The checkpoint carries the digest of every tensor
and of its metadata (checked by `checkpoint.load`), and the digest of each tensor's rows through step k
of the partial file as they were on disk when it was taken (checked by `ArtifactWriter.reopen`). The
steps a stopped run recorded after k are compared, as the resumed run writes them again, with what it
writes. Any mismatch is a `ResumeError`: the checkpoint and partial file are discarded, and the run
trains from the start (`resume_discarded` in its metadata says why).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from flannel_repro.errors import ArtifactError, ArtifactWarning, ConfigError, ResumeError, TrainingStopped
from flannel_repro.storage import checkpoint
from flannel_repro.storage.format import digest_tensor

CHECKPOINT_SUFFIX = ".ckpt"
RESUMABLE_SUFFIX = ".resumable"


def checkpoint_path(artifact: str | Path) -> Path:
    return Path(f"{artifact}{CHECKPOINT_SUFFIX}")


def resumable_path(artifact: str | Path) -> Path:
    return Path(f"{artifact}{RESUMABLE_SUFFIX}")


def find_resumable(artifact: str | Path, run_key: str) -> tuple[checkpoint.Checkpoint | None, str]:
    """The checkpoint to resume `artifact` from, or None (no checkpoint, no partial file, or another run's),
    and why a checkpoint of this run was discarded ("" when none was).

    A checkpoint beside a published artifact is stale (the run finished after it) and is removed. A
    checkpoint that fails verification (`checkpoint.load` checks every tensor's and the metadata's digest)
    is discarded with its partial file: the run trains from the start, and the reason is returned. Anything
    but a regular file at either name (a directory, a link, a FIFO) is an ArtifactError: not ours to remove."""
    ckpt_file, partial = checkpoint_path(artifact), resumable_path(artifact)
    has_ckpt = checkpoint.require_own_file(ckpt_file, "a checkpoint")
    has_partial = checkpoint.require_own_file(partial, "a resumable partial artifact")
    if Path(artifact).exists():
        ckpt_file.unlink(missing_ok=True)
        return None, ""
    if not has_ckpt or not has_partial:
        return None, ""
    try:
        ckpt = checkpoint.load(ckpt_file)
    except ResumeError as exc:
        return None, discard(artifact, str(exc))
    if ckpt.info.get("run_key") != run_key or "artifact_metadata" not in ckpt.info:
        return None, ""
    if not isinstance(ckpt.info.get("partial_digests"), dict):
        return None, discard(artifact, f"{ckpt_file}: the checkpoint records no digests of the partial file's rows")
    return ckpt, ""


def discard(artifact: str | Path, reason: str, *, warn: bool = True) -> str:
    """Remove the checkpoint and partial file of `artifact` that failed verification, warn with `reason`
    (an ArtifactWarning: the run trains from the start) and return it, for the run's metadata
    (`resume_discarded`). `warn=False` where the caller raises instead."""
    import warnings

    for path in (checkpoint_path(artifact), resumable_path(artifact)):
        if checkpoint.require_own_file(path, "a checkpoint or resumable partial artifact"):
            path.unlink(missing_ok=True)
    if warn:
        warnings.warn(
            f"{Path(artifact).name}: not resumed, trained from the start: {reason}", ArtifactWarning, stacklevel=3
        )
    return reason


def check_resumed_digest(
    ckpt: checkpoint.Checkpoint, prior: Mapping[int, bytes], step: int, digest: bytes, partial: Path | None
) -> None:
    """After resuming from `ckpt`: step `step`'s digest must be the one the stopped run recorded there
    (`prior`, read from the partial file before it was continued), where that run got so far."""
    want = prior.get(step)
    if want is not None and want != digest:
        raise ResumeError(
            f"{partial}: resumed from step {ckpt.step}, step {step} has digest {digest.hex()[:16]}..., the "
            f"stopped run recorded {want.hex()[:16]}... there: resuming does not continue that run."
        )


def prior_digests(writer: Any, digests_key: str, start: int, stop: int) -> dict[int, bytes]:
    """The per-step digests a stopped run wrote after its checkpoint (rows start..stop-1 that are not zero)."""
    rows = writer.rows_on_disk(digests_key, start, stop)
    return {start + i: bytes(r) for i, r in enumerate(rows) if r.any()}


@dataclass
class Checkpointer:
    """When to checkpoint (every `every` steps; 0 = never) and where to stop (`stop_at`, for tests of resume
    and the `resume_at` claim), for the artifact at `artifact` of run `run_key`."""

    artifact: Path
    run_key: str
    every: int = 0
    stop_at: int | None = None

    def __post_init__(self) -> None:
        if self.every < 0:
            raise ConfigError(f"'checkpoint_every' must be >= 0 steps (got {self.every}).")

    @property
    def enabled(self) -> bool:
        return self.every > 0 or self.stop_at is not None

    def due(self, step: int, steps: int) -> bool:
        if self.stop_at is not None and step == self.stop_at:
            return True
        return self.every > 0 and step % self.every == 0 and step < steps

    def save(
        self,
        step: int,
        writer: Any,
        tensor: torch.Tensor,
        state: Mapping[str, Any],
        *,
        last_loss: float,
        extra: Mapping[str, Any] | None = None,
    ) -> Path:
        """fsync the artifact's rows, then write the checkpoint of `step` (see the module docstring)."""
        from flannel_repro.training.determinism import code_version

        from flannel_repro.storage.layout import written_through

        writer.sync()
        info = {
            "code": code_version(),
            "run_key": self.run_key,
            "artifact_metadata": [
                list(kv) for kv in writer.metadata.items()
            ],  # ordered "last_loss": repr(float(last_loss)),
            "digest": digest_tensor(tensor.detach().to("cpu")).hex(),
            # what the partial file's rows through `step` hash to: a resume checks them before continuing
            "partial_digests": writer.prefix_digests(written_through(writer.specs, step)),
            **(extra or {}),
        }
        path = checkpoint.save(checkpoint_path(self.artifact), step, state, info)
        writer.keep_partial = True  # from now on an interrupted run leaves what its resume needs
        if self.stop_at is not None and step == self.stop_at:
            raise TrainingStopped(step, path)
        return path

    def done(self) -> None:
        checkpoint_path(self.artifact).unlink(missing_ok=True)


def check_restored(ckpt: checkpoint.Checkpoint, tensor: torch.Tensor) -> None:
    """The restored recorded tensor must be the one the checkpoint was taken of."""
    got = digest_tensor(tensor.detach().to("cpu")).hex()
    if got != ckpt.info.get("digest"):
        raise ResumeError(
            f"{ckpt.path}: the restored state at step {ckpt.step} has digest {got[:16]}..., the "
            f"checkpoint recorded {str(ckpt.info.get('digest'))[:16]}...; it cannot be resumed."
        )


# --- the training state ---------------------------------------------------------------------------


class TrainingState:
    """The objects a checkpoint saves and restores, by name: anything with state_dict() / load_state_dict()
    (model, optimizer, LR scheduler) and torch.Generators (get_state / set_state), plus the global RNGs."""

    def __init__(self, objects: Mapping[str, Any] | None) -> None:
        self.objects = dict(objects or {})
        for name, obj in self.objects.items():
            if not isinstance(obj, torch.Generator) and not (
                hasattr(obj, "state_dict") and hasattr(obj, "load_state_dict")
            ):
                raise ConfigError(
                    f"state[{name!r}]: expected an object with state_dict()/load_state_dict() (model, "
                    f"optimizer, scheduler) or a torch.Generator, got {type(obj).__name__}."
                )
        self._generators = {n: g for n, g in self.objects.items() if isinstance(g, torch.Generator)}

    def capture(self) -> dict[str, Any]:
        return {
            "objects": {n: o.state_dict() for n, o in self.objects.items() if n not in self._generators},
            "rng": checkpoint.rng_state(self._generators),
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        saved = state["objects"]
        for name, obj in self.objects.items():
            if name in self._generators:
                continue
            if name not in saved:
                raise ArtifactError(f"checkpoint: no state for {name!r} (saved: {sorted(saved) or 'none'}).")
            if isinstance(obj, torch.nn.Module):
                with torch.no_grad():
                    obj.load_state_dict(saved[name])
            else:
                obj.load_state_dict(saved[name])
        checkpoint.set_rng_state(state["rng"], self._generators)


# --- resume_at: stop in one fresh process, resume in another ----------------------------------------


def train_in_two_processes(train_args: Mapping[str, Any], stop_at: int, *, timeout_s: float = 6 * 3600) -> None:
    """Train a run stopped after `stop_at` in one fresh Python process and resumed in a second one.

    `train_args` are the JSON-able arguments of `training.resume_child` (kind, config, path, metadata, ...)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    for stop in (stop_at, None):
        payload = json.dumps({**train_args, "stop_at": stop})
        proc = subprocess.run(
            [sys.executable, "-m", "flannel_repro.training.resume_child", payload],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
        if proc.returncode != 0:
            phase = f"stopped at step {stop_at}" if stop is not None else "resumed"
            raise RuntimeError(
                f"the run {phase} in a fresh process failed (exit {proc.returncode}):\n{proc.stderr.strip()[-3000:]}"
            )
