"""Fault probes, second pass (issue 22): checkpoints. Registered into tests.faults.probes.PROBES on import.

A run of the store is interrupted after step 3 with a checkpoint every 2 steps (so the checkpoint is of
step 2 and the partial file holds step 3 too), one thing on disk is changed, and the store is asked for
the run again. It must not resume from what changed: "clear" when it says why and trains the run from the
start, bitwise equal to the uninterrupted run, and a later session reuses that run; "silent" when the
published run differs, or when it was resumed from the changed state without a word.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Callable

from flannel_repro.errors import FlannelError
from flannel_repro.training.resume import checkpoint_path, resumable_path
from flannel_repro.runs.store import RunStore
from tests.faults.probes import CFG, REPO, Outcome, _reference, expect_error, good_store, probe

EVERY = 2  # checkpoint every 2 steps; the run is interrupted after step 3


class _Interrupt(Exception):
    pass


def _interrupted(root: Path) -> Path:
    """The store's artifact path of CFG, after a training interrupted right after step 3."""

    def stop(step: int, steps: int, loss: float) -> None:
        if step == 3:
            raise _Interrupt

    try:
        RunStore(root, checkpoint_every=EVERY).obtain(CFG, progress=stop)
    except _Interrupt:
        pass
    found = sorted(root.glob("*.safetensors.ckpt"))
    assert len(found) == 1, f"expected one checkpoint, found {found}"
    return Path(str(found[0])[: -len(".ckpt")])


def tensor_span(path: Path, name: str) -> tuple[int, int]:
    """(absolute begin, end) of tensor `name`'s bytes in a safetensors file, a partial one too."""
    raw = path.read_bytes()
    # a partial file's length field is 0 until it is published: its header ends where the data region begins
    header, _ = json.JSONDecoder().raw_decode(raw[8:].decode("latin-1"))
    n = len(raw) - 8 - max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
    begin, end = header[name]["data_offsets"]
    return 8 + n + begin, 8 + n + end


def flip_byte(path: Path, at: int) -> None:
    """Flip the lowest bit of the byte at offset `at`."""
    with open(path, "r+b") as f:
        f.seek(at)
        byte = f.read(1)[0]
        f.seek(at)
        f.write(bytes([byte ^ 0x01]))


def in_checkpoint(name: str, where: float = 0.5) -> Callable[[Path], None]:
    def damage(artifact: Path) -> None:
        begin, end = tensor_span(checkpoint_path(artifact), name)
        flip_byte(checkpoint_path(artifact), begin + int(where * (end - begin - 1)))

    return damage


def checkpoint_metadata(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def damage(artifact: Path) -> None:
        path = checkpoint_path(artifact)
        raw = path.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8 : 8 + n])
        edit(header["__metadata__"])
        body = json.dumps(header).encode()
        body += b" " * ((-(8 + len(body))) % 8)
        path.write_bytes(len(body).to_bytes(8, "little") + body + raw[8 + n :])

    return damage


def in_partial(name: str, row: int, rows: int) -> Callable[[Path], None]:
    def damage(artifact: Path) -> None:
        begin, end = tensor_span(resumable_path(artifact), name)
        flip_byte(resumable_path(artifact), begin + row * ((end - begin) // rows) + 1)

    return damage


def next_epoch(meta: dict) -> None:
    state = json.loads(meta["state"])
    state["objects"]["scheduler"]["last_epoch"] += 1
    meta["state"] = json.dumps(state)


def checkpoint_fault(damage: Callable[[Path], None]) -> Callable[[Path], Outcome]:
    def run(workdir: Path) -> Outcome:
        _, _, ref = good_store()
        root = workdir / "artifacts"
        artifact = _interrupted(root)
        damage(artifact)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            try:
                got = RunStore(root, checkpoint_every=EVERY).obtain(CFG)
            except FlannelError as exc:
                return Outcome("unclear", f"the store refused instead of training from the start: {exc}")
        said = [str(w.message) for w in seen if "not resumed, trained from the start" in str(w.message)]
        meta = got.trajectory.metadata
        if _reference(got.trajectory) != ref or got.trajectory.verify():
            return Outcome(
                "silent",
                "the published run differs from the uninterrupted one"
                + (" (resumed from the changed state)" if "resumed_from" in meta else ""),
            )
        if "resumed_from" in meta:
            return Outcome("fine", "resumed, and the run is bitwise the uninterrupted one")
        if not said or not meta.get("resume_discarded") or "checkpoint discarded" not in got.replaced:
            return Outcome("unclear", "trained from the start without saying why")
        got.trajectory.close()
        again = RunStore(root).obtain(CFG)  # a later session reuses the right run
        if again.trained or _reference(again.trajectory) != ref:
            return Outcome("silent", "a later session did not reuse the right run")
        again.trajectory.close()
        return Outcome("clear", f"discarded and trained from the start, bitwise equal: {said[0][:200]}")

    return run


_DAMAGE: dict[str, Callable[[Path], None]] = {
    "a bit in exp_avg of a non-W parameter": in_checkpoint("objects.optimizer.state.3.exp_avg"),
    "a bit in exp_avg_sq of W": in_checkpoint("objects.optimizer.state.0.exp_avg_sq"),
    "a bit in a non-W weight": in_checkpoint("objects.model.transformer.h.1.mlp.c_fc.weight"),
    "a bit in the optimizer's step counter": in_checkpoint("objects.optimizer.state.0.step", 0.9),
    "the scheduler's last_epoch in the state JSON": checkpoint_metadata(next_epoch),
    "the checkpoint's step (2 to 3)": checkpoint_metadata(lambda m: m.update(step="3")),
    "a bit in a W row the partial file holds before the checkpoint": in_partial("W", 1, CFG.steps + 1),
    "a bit in a loss the partial file holds before the checkpoint": in_partial("losses", 2, CFG.steps + 1),
    "a bit in a digest the partial file holds after the checkpoint": in_partial("digests", 3, CFG.steps + 1),
}
for _name, _damage in _DAMAGE.items():
    probe("checkpoint", _name)(checkpoint_fault(_damage))


def directory_at(where: Callable[[Path], Path]) -> Callable[[Path], Outcome]:
    """A probe: a directory in place of the interrupted run's checkpoint or partial file (`where(artifact)`)."""

    def run(workdir: Path) -> Outcome:
        root = workdir / "artifacts"
        path = where(_interrupted(root))
        path.unlink()
        path.mkdir()
        return expect_error(lambda: RunStore(root, checkpoint_every=EVERY).obtain(CFG), str(path), "got a directory")

    return run


probe("checkpoint", "the checkpoint path is a directory")(directory_at(checkpoint_path))
probe("checkpoint", "the resumable partial path is a directory")(directory_at(resumable_path))


@probe("checkpoint", "the checkpoint path is a symbolic link to a file outside the folder")
def _ckpt_link(workdir: Path) -> Outcome:
    root = workdir / "artifacts"
    artifact = _interrupted(root)
    outside = workdir / "outside.bin"
    outside.write_bytes(b"not yours")
    checkpoint_path(artifact).unlink()
    checkpoint_path(artifact).symlink_to(outside)
    outcome = expect_error(
        lambda: RunStore(root, checkpoint_every=EVERY).obtain(CFG), str(checkpoint_path(artifact)), "symbolic link"
    )
    if outside.read_bytes() != b"not yours":
        return Outcome("outside", "the file outside the folder was written through the link")
    return outcome


_FULL_DISK = r"""
import os, subprocess, sys, warnings
sys.path.insert(0, sys.argv[2])
from tests.faults.probes import CFG
from flannel_repro.errors import ArtifactError
from flannel_repro.runs.store import RunStore
try:
    RunStore(sys.argv[1], checkpoint_every=1).obtain(CFG)
except ArtifactError as e:
    print(e); raise SystemExit(3)
print("trained"); raise SystemExit(0)
"""


@probe("checkpoint", "the disk fills while a checkpoint is written (a real 1.9 MB tmpfs, a checkpoint every step)")
def _ckpt_disk_full(workdir: Path) -> Outcome:
    mount = workdir / "small"
    mount.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1900k", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if made.returncode != 0:  # not root, or a container without the capability: the same fault, simulated
        outcome = _ckpt_enospc(workdir)
        return Outcome(
            outcome.kind, f"(no tmpfs could be mounted here, simulated: {made.stderr.strip()[:80]}) {outcome.detail}"
        )
    try:
        root = mount / "artifacts"
        done = subprocess.run(
            [sys.executable, "-c", _FULL_DISK, str(root), str(REPO)],
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "FLANNEL_REPRO_CACHE": str(workdir / "cache")},
        )
        names = sorted(p.name for p in root.iterdir()) if root.exists() else []
        temps = [n for n in names if n.endswith(".tmp") or ".partial-" in n]
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)
    if done.returncode == 0:
        return Outcome("unclear", "it trained: 1.9 MB was enough, so the probe did not fill the disk")
    if done.returncode != 3 or "Traceback" in done.stderr:
        return Outcome("unclear", f"exit {done.returncode}: {done.stderr.strip()[-400:]}")
    message = done.stdout.strip()
    if ".ckpt" not in message or "MB" not in message:
        return Outcome("unclear", f"the error does not name the checkpoint and the space: {message[:300]}")
    if temps:
        return Outcome("silent", f"temporary files left behind: {temps}")
    return Outcome("clear", message[:300])


@probe("checkpoint", "ENOSPC while the checkpoint's bytes are written (simulated at fsync)")
def _ckpt_enospc(workdir: Path) -> Outcome:
    import errno

    from flannel_repro.storage import checkpoint

    real = os.fsync

    def full(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".tmp") and ".ckpt." in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd)

    root = workdir / "artifacts"
    checkpoint.os.fsync = full  # type: ignore[attr-defined]
    try:
        outcome = expect_error(
            lambda: RunStore(root, checkpoint_every=1).obtain(CFG), ".ckpt", "MB", "No space left on device"
        )
    finally:
        checkpoint.os.fsync = real  # type: ignore[attr-defined]
    temps = sorted(p.name for p in root.iterdir() if p.name.endswith(".tmp") or ".partial-" in p.name)
    return Outcome("silent", f"temporary files left behind: {temps}") if temps else outcome
