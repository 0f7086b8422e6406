"""Pruning an artifacts directory: which files are the run store's (ownership) and which of those no run of
this installation can reuse (orphans).

`scan_artifacts` lists both the store's orphans (owned: `prune` deletes them) and the files the store did not
write (not owned: listed, never deleted); `find_orphans` is the owned ones.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from flannel_repro.storage.partials import stale_partials
from flannel_repro.errors import ArtifactError, ConfigError
from flannel_repro.runs.store import KEY_FORMAT, key_of, run_lock, run_name

if TYPE_CHECKING:
    from flannel_repro.runs.remote import RemoteStore


@dataclass(frozen=True)
class Orphan:
    """A file in an artifacts directory: one the store wrote that no run of this installation can reuse
    (`owned`: prune deletes it), or one the store did not write (not `owned`: listed, never deleted)."""

    path: Path
    size: int  # bytes
    reason: str
    owned: bool = True


# The name the store gives a run (`run_name` + .safetensors): group 1 its repeat, group 2 its run key's first 12 hex digits.
_RUN_FILE = re.compile(r"(?:seed\d+|m\d+-d\d+)-.+-r(\d+)-([0-9a-f]{12})\.safetensors")
# The store's side files of a run: its lock, progress file, checkpoint pair (training.resume) and partial files.
_SIDE_FILE = re.compile(r"(.+\.safetensors)(\.lock|\.progress|\.ckpt|\.resumable|\.partial-\d+-[0-9a-f]+)")
NOT_OURS = "not ours, kept"


def _artifact_verdict(path: Path, code: str, packages: dict[str, str]) -> tuple[bool, str] | None:
    """(owned, reason) for a *.safetensors file; None for a run of this store that runs here can reuse.

    Owned: the store's name for its run key, and the store's run-key material (KEY_FORMAT) beside that key."""
    from flannel_repro.storage.layout import header_metadata
    from flannel_repro.storage.run import RunFile

    named = _RUN_FILE.fullmatch(path.name)
    if named is None:
        return False, f"{NOT_OURS}: a name the run store does not give"
    if path.is_symlink() or not path.is_file():
        return False, f"{NOT_OURS}: expected a regular file, got {'a link' if path.is_symlink() else 'another kind'}"
    meta = header_metadata(path)
    if isinstance(meta, str):
        return False, f"{NOT_OURS}: unreadable header ({meta})"
    try:
        material = json.loads(meta.get("run_key_material", "null"))
    except (TypeError, ValueError):
        material = None
    got = material.get("format") if isinstance(material, dict) else None
    if got != KEY_FORMAT:
        return False, f"{NOT_OURS}: expected run-key material of format {KEY_FORMAT!r}, got {got!r}"
    key = meta.get("run_key", "")
    if (
        not isinstance(key, str)
        or re.fullmatch(r"[0-9a-f]{20}", key) is None
        or key[:12] != named.group(2)
        or str(material.get("repeat")) != named.group(1)
    ):
        return False, f"{NOT_OURS}: its name does not carry its run key {key!r} and repeat {material.get('repeat')!r}"
    try:
        traj = RunFile(path)
    except ArtifactError as exc:
        return True, f"damaged run of this store ({str(exc).split(': ', 1)[-1][:80]}); retrained when needed"
    try:
        expected = run_name(traj.config, int(material["repeat"]), key) + ".safetensors"
    except (ArtifactError, ConfigError, KeyError, TypeError, ValueError) as exc:
        return True, f"damaged run of this store ({str(exc).split(': ', 1)[-1][:80]}); retrained when needed"
    finally:
        traj.close()
    if expected != path.name:
        return False, f"{NOT_OURS}: the run store names this run {expected}"
    if key_of(material) != key:
        return True, "damaged run of this store (its run-key material does not hash to its run key)"
    reasons = stale_reasons(material, code, packages)
    return (True, "; ".join(reasons)) if reasons else None


def stale_reasons(material: dict, code: str, packages: dict[str, str]) -> list[str]:
    """Why a run with this run-key material can be reused by no run of this installation: another flannel-repro
    code or package versions (empty when it can be)."""
    reasons = []
    if material.get("code") not in (None, code):
        reasons.append(f"flannel-repro code {material.get('code')} (now {code})")
    for name, version in sorted((material.get("packages") or {}).items()):
        if packages.get(name) != version:
            reasons.append(f"{name} {version} (now {packages.get(name, 'absent')})")
    return reasons


def _side_file_is_ours(path: Path) -> bool:
    """A regular file named after a run name the store gives, with one of the store's side-file suffixes."""
    side = _SIDE_FILE.fullmatch(path.name)
    return (
        side is not None and _RUN_FILE.fullmatch(side.group(1)) is not None and not path.is_symlink() and path.is_file()
    )


def scan_artifacts(root: str | Path) -> list[Orphan]:
    """What prune finds in an artifacts directory: the store's files no run of this installation can reuse
    (owned) and the artifacts and side files the store did not write (not owned: kept).

    Owned, deleted by prune: runs of this store trained by other code of this package or other package
    versions (every edit of the code changes every key), runs of this store that are damaged (the store
    trains them again), partial files of killed writers, resume files no run can resume, and lock and
    progress files of runs that are gone. Ownership is the store's own: the name it gives a run key and,
    for an artifact, its run-key material (KEY_FORMAT) in the metadata. Anything else is kept and listed:
    an unreadable file, a file without that material (a run recorded with TrajectoryRecorder), a name
    the store does not give.

    Runs of other numerics classes or thread counts are *not* orphans: another machine sharing the
    directory, or another setting, still reuses them.
    """
    from flannel_repro.training.determinism import code_version, package_versions

    directory = Path(root)
    if not directory.is_dir():
        raise ArtifactError(f"prune: expected an artifacts directory, got {str(directory)!r} (no such directory).")
    code, packages = code_version(), package_versions()
    found: list[Orphan] = []

    def add(path: Path, reason: str, owned: bool = True) -> None:
        try:
            found.append(Orphan(path, path.lstat().st_size, reason, owned))
        except FileNotFoundError:
            pass  # removed meanwhile by another process

    entries = sorted(directory.iterdir())
    for path in entries:
        if path.name.endswith(".safetensors"):
            verdict = _artifact_verdict(path, code, packages)
            if verdict is not None:
                add(path, verdict[1], owned=verdict[0])
        elif _SIDE_FILE.fullmatch(path.name) and not _side_file_is_ours(path):
            add(path, f"{NOT_OURS}: a side file of no run name the store gives", owned=False)
    for path in stale_partials(directory):
        if _side_file_is_ours(path):
            add(path, "partial file of a writer that is gone")
    _resume_orphans(directory, code, add)
    going = {o.path for o in found if o.owned}
    for path in sorted(directory.glob("*.safetensors.lock")):
        if not _side_file_is_ours(path):
            continue
        run = Path(str(path)[: -len(".lock")])
        resumable = Path(f"{run}.ckpt").exists() and Path(f"{run}.ckpt") not in going
        if (run in going or not run.exists()) and not resumable and _lock_is_free(path):
            add(path, "lock of a run that is gone" if run not in going else "lock of a run pruned with it")
    for path in sorted(directory.glob("*.safetensors.progress")):
        if not _side_file_is_ours(path):
            continue
        if not Path(str(path)[: -len(".progress")]).exists() and not any(
            p.name.startswith(path.name[: -len(".progress")] + ".partial-") for p in directory.iterdir()
        ):
            add(path, "progress file of a run that is gone")
    return found


def find_orphans(root: str | Path) -> list[Orphan]:
    """The files prune deletes: `scan_artifacts`'s owned ones."""
    return [o for o in scan_artifacts(root) if o.owned]


def _resume_orphans(directory: Path, code: str, add: Callable[[Path, str], None]) -> None:
    """Checkpoints and resumable partial files that no run can resume (training.resume): beside a published
    artifact, without their partner, or made by other code (its runs have other keys). A pair whose run
    is being trained (its lock is held) is never one."""
    from flannel_repro.storage import checkpoint
    from flannel_repro.training.resume import CHECKPOINT_SUFFIX, RESUMABLE_SUFFIX

    for suffix, partner in ((CHECKPOINT_SUFFIX, RESUMABLE_SUFFIX), (RESUMABLE_SUFFIX, CHECKPOINT_SUFFIX)):
        for path in sorted(directory.glob(f"*.safetensors{suffix}")):
            if not _side_file_is_ours(path):
                continue  # listed as not ours by scan_artifacts
            artifact = Path(str(path)[: -len(suffix)])
            lock = Path(f"{artifact}.lock")
            if lock.exists() and not _lock_is_free(lock):
                continue
            if artifact.exists():
                add(path, "resume file of a run that finished")
            elif not Path(f"{artifact}{partner}").exists():
                add(
                    path,
                    "resume file without its " + ("partial artifact" if suffix == CHECKPOINT_SUFFIX else "checkpoint"),
                )
            elif suffix == CHECKPOINT_SUFFIX:
                try:
                    made_by = checkpoint.load(path).info.get("code")
                except ArtifactError:
                    add(path, "unreadable checkpoint")
                    add(Path(f"{artifact}{partner}"), "partial artifact of an unreadable checkpoint")
                    continue
                if made_by not in (None, code):
                    add(path, f"checkpoint of flannel-repro code {made_by} (now {code})")
                    add(Path(f"{artifact}{partner}"), f"partial artifact of flannel-repro code {made_by} (now {code})")


def _lock_is_free(path: Path) -> bool:
    from filelock import Timeout

    try:
        with run_lock(str(path), timeout=0):
            return True
    except Timeout:
        return False
    except ArtifactError:
        return False  # a link or special file: not ours to take, so never counted free


def prune(root: str | Path, *, dry_run: bool = False, found: list[Orphan] | None = None) -> list[Orphan]:
    """Delete the owned files of `found` (`scan_artifacts(root)` when None; nothing with `dry_run`); returns
    what was (or would be) deleted. Files the store did not write are never deleted."""
    orphans = [o for o in (scan_artifacts(root) if found is None else found) if o.owned]
    if not dry_run:
        for orphan in orphans:
            try:
                orphan.path.unlink()
            except FileNotFoundError:
                pass
    return orphans


# --- a store behind a URL (runs.remote) -------------------------------------------------------------------------

UNPUBLISHED_GRACE_S = 3600.0  # an object no manifest names is an upload in flight until it is this old


def scan_store(remote: "RemoteStore", *, now: float | None = None) -> list[Orphan]:
    """What prune finds in a URL store, as paths relative to its prefix: runs published by other code or
    package versions (manifest and object), damaged manifests, objects no manifest names (older than
    UNPUBLISHED_GRACE_S: a publish that died between upload and manifest), and expired claims. Anything
    outside the store's layout (runs/, objects/, claims/) is never looked at, so never deleted."""
    import time

    from flannel_repro.training.determinism import code_version, package_versions

    now = time.time() if now is None else now
    code, packages = code_version(), package_versions()
    found: list[Orphan] = []
    named: set[str] = set()
    sizes = {rel: (size, mtime) for rel, size, mtime in remote.objects()}
    for run, manifest in remote.manifests():
        where = Path("runs") / f"{run}.json"
        if isinstance(manifest, str):
            found.append(Orphan(where, 0, f"damaged manifest ({manifest[-120:]}); retrained when needed"))
            continue
        named.add(manifest.object)
        reasons = stale_reasons(manifest.run_key_material, code, packages)
        if reasons:
            found.append(Orphan(where, 0, "; ".join(reasons)))
            size = sizes.get(manifest.object, (0, 0.0))[0]
            found.append(Orphan(Path(manifest.object), size, f"the object of {run}: " + "; ".join(reasons)))
    for rel, (size, mtime) in sizes.items():
        if rel not in named and mtime and now - mtime > UNPUBLISHED_GRACE_S:
            found.append(Orphan(Path(rel), size, "an object no manifest names (a publish that did not finish)"))
    for claim in remote.claims():
        if claim.expired(now):
            found.append(Orphan(Path(remote.claim_relpath(claim)), 0, f"expired claim of {claim.owner}"))
    return found


def prune_store(remote: "RemoteStore", *, dry_run: bool = False, found: list[Orphan] | None = None) -> list[Orphan]:
    """Delete what `scan_store` found (nothing with `dry_run`): each manifest before its object, so a run
    is never published without its bytes. Returns what was (or would be) deleted."""
    orphans = scan_store(remote) if found is None else found
    if not dry_run:
        for orphan in sorted(orphans, key=lambda o: not str(o.path).startswith("runs/")):
            remote.remove(str(orphan.path))
    return orphans
