"""Train once, share everywhere: a directory of run artifacts keyed by everything that moves the numbers.

A run's key hashes the config fingerprint, the data files' hashes, the environment that can change a
result (package versions, this package's code, device, CPU capability, thread count) and the
`repeat` index. A process that needs a run either finds a complete artifact with that exact key, or
takes the run's file lock and trains it while other processes (xdist workers) wait and then read.
Two different `repeat` indices are two different keys, hence always two real trainings.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from flannel_repro import safeio
from flannel_repro.storage import stream
from flannel_repro.errors import ArtifactError, ArtifactWarning, ConfigError
from flannel_repro.config import EngineRunConfig

if TYPE_CHECKING:
    from flannel_repro.storage.run import RunFile
    from flannel_repro.config import RunConfig
    from flannel_repro.analysis.trajectory import Trajectory

KEY_FORMAT = "flannel-repro/run-key/1"


def resolved_threads(config: "RunConfig") -> int:
    import torch

    return config.threads or torch.get_num_threads()


def run_key_material(config: "RunConfig", data_hashes: dict[str, str], repeat: int) -> dict[str, object]:
    """Everything the key is made of, as a readable dict (stored in the artifact's metadata)."""
    from flannel_repro.training.determinism import code_version, device_description, package_versions
    from flannel_repro.training.numerics import numerics_info

    dev = device_description(config.device)
    numerics = numerics_info(config.device, threads=resolved_threads(config), deterministic=config.deterministic,
                             mode=config.numerics)
    return {
        "format": KEY_FORMAT,
        "config": config.fingerprint(),
        "data": dict(sorted(data_hashes.items())),
        "packages": package_versions(),
        "code": code_version(),
        "device": {k: dev.get(k) for k in ("device", "name", "cpu_capability", "capability", "cuda", "cudnn")},
        "threads": resolved_threads(config),
        # the arithmetic the run gets: a run of another class is never reused as if it were equal
        "numerics": {"class": numerics["class"], "probe": (numerics.get("probe") or {}).get("digest")},
        "repeat": repeat,
    }


def key_of(material: dict[str, object]) -> str:
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:20]



CACHEDIR_TAG = ("Signature: 8a477f597d28d172789f06886806bc55\n"
                "# This file is a cache directory tag created by flannel-repro: run artifacts, retrained on demand.\n"
                "# For information about cache directory tags, see: https://bford.info/cachedir/\n")


def mark_cache_dir(root: Path) -> None:
    """Create `root` as a cache directory: a CACHEDIR.TAG (backup tools skip it) and a .gitignore that
    ignores everything in it, as pytest does for its own cache. Existing files are left as they are."""
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ArtifactError(f"{root}: expected a directory run artifacts can be written to; it could not be created "
                            f"({exc.strerror or exc}).") from None
    for name, text in (("CACHEDIR.TAG", CACHEDIR_TAG), (".gitignore", "# created by flannel-repro\n*\n")):
        path = root / name
        if not path.exists():
            try:
                with open(path, "x", encoding="utf-8") as f:  # exclusive: concurrent workers write it once
                    f.write(text)
            except FileExistsError:
                pass
            except OSError as exc:
                raise ArtifactError(f"{root}: expected a directory run artifacts can be written to; writing {name} "
                                    f"failed ({exc.strerror or exc}).") from None


# (path, inode, size, mtime) -> problems found: a file is verified once per process until it changes.
_VERIFIED: dict[tuple[str, int, int, int], list[str]] = {}


def _verified(traj: "RunFile") -> list[str]:
    """`traj.verify()`, remembered per process by the file's stat signature."""
    st = traj.path.stat()
    key = (str(traj.path), st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _VERIFIED:
        _VERIFIED[key] = traj.verify()
    return _VERIFIED[key]


def run_name(config: "RunConfig", repeat: int, key: str) -> str:
    seeds = f"seed{config.model_seed}" if config.train_seed is not None else f"m{config.model_seed}-d{config.data_seed}"
    dev = config.device.replace(":", "")
    return f"{seeds}-{dev}-{config.engine}-r{repeat}-{key[:12]}"


@dataclass(frozen=True)
class Obtained:
    trajectory: "Trajectory"
    trained: bool  # True if this process trained it; False if it was read from the store
    replaced: str = ""  # why the artifact found under its key was set aside and trained again ("" if none was)


class RunStore:
    """Run artifacts under `root`, shared between processes through file locks.

    `session` tags artifacts written in this test session; with `reuse_earlier=False` an artifact is
    reused only if it carries the same tag (made in this session, maybe by another xdist worker).
    """

    def __init__(self, root: str | Path, *, session: str = "", reuse_earlier: bool = True,
                 lock_timeout_s: float = 6 * 3600, checkpoint_every: int = 0) -> None:
        self.root = Path(root)
        # torch-engine and registered-engine runs checkpoint every N steps; a killed run then resumes
        self.checkpoint_every = checkpoint_every
        self.session = session
        self.reuse_earlier = reuse_earlier
        self.lock_timeout_s = lock_timeout_s
        self._rejected: dict[Path, str] = {}  # artifacts that failed verification -> what was wrong

    def path_for(self, config: "RunConfig", repeat: int, key: str) -> Path:
        return self.root / f"{run_name(config, repeat, key)}.safetensors"

    def _usable(self, path: Path, key: str, material: dict[str, object]) -> "Trajectory | None":
        from flannel_repro.analysis.trajectory import Trajectory

        if not path.exists():
            return None
        try:
            traj = Trajectory(path)
        except ArtifactError:
            return None  # unreadable or incomplete: train it again (the rename below replaces it)
        if traj.run_key != key:
            traj.close()
            return None
        if traj.key_material != json.loads(json.dumps(material)):
            # the key in the file is right but what it claims to be made of is not: edited after training
            self._rejected[path] = "its run-key material does not match its run key"
            warnings.warn(f"{path.name}: the artifact's run-key material does not match its run key (edited after "
                          "training); it is trained again", ArtifactWarning, stacklevel=4)
            traj.close()
            return None
        if not self.reuse_earlier and traj.metadata.get("session") != self.session:
            traj.close()
            return None
        problems = _verified(traj)
        if problems:
            self._rejected[path] = "; ".join(problems)
            warnings.warn(f"{path.name}: the artifact failed verification ({'; '.join(problems)}); it is trained "
                          "again", ArtifactWarning, stacklevel=4)
            traj.close()
            return None
        return traj

    def obtain(self, config: "RunConfig | EngineRunConfig", *, repeat: int = 0, resume_at: int | None = None,
               progress: Callable[[int, int, float], None] | None = None,
               on_train_start: Callable[[Path], None] | None = None) -> Obtained:
        """The trajectory for (config, repeat): from the store if complete and matching, else trained now.

        `resume_at` = k: a separate run, stopped after step k in a fresh process and resumed in another
        (training.resume); equal to the uninterrupted run bitwise when resuming changes nothing."""
        from flannel_repro.data.corpus import load_data
        from flannel_repro.analysis.trajectory import Trajectory

        if repeat < 0:
            raise ValueError(f"'repeat' must be >= 0 (got {repeat}).")
        from flannel_repro.training.numerics import apply as apply_numerics

        apply_numerics(config.numerics, config.device)  # before the key's probe starts oneDNN and MKL
        engine_run = isinstance(config, EngineRunConfig)
        if engine_run:
            from flannel_repro.training.engines import get_engine

            data = None
            material = run_key_material(config, get_engine(config.engine).key_data(), repeat)
        else:
            data = load_data(config)
            material = run_key_material(config, data.hashes, repeat)
        if resume_at is not None:
            if config.engine != "torch" and not engine_run:
                raise ConfigError(f"resume_at: resume is implemented for engine = 'torch' and registered engines, "
                                  f"got engine={config.engine!r}.")
            if not 1 <= resume_at <= config.steps:
                raise ConfigError(f"resume_at must be a step in [1, {config.steps}] (got {resume_at}).")
            material["resume_at"] = resume_at
        key = key_of(material)
        path = self.path_for(config, repeat, key)
        # a link, directory, FIFO or device at the run's path is refused, not read (a FIFO blocks) nor trained over
        safeio.own_file(path, "a run artifact")
        hit = self._usable(path, key, material)
        if hit is not None:
            return Obtained(hit, trained=False)
        mark_cache_dir(self.root)
        stream.cleanup_partials(self.root)
        with _lock(str(path) + ".lock", timeout=self.lock_timeout_s):
            hit = self._usable(path, key, material)  # another worker may have finished it while we waited
            if hit is not None:
                return Obtained(hit, trained=False)
            safeio.own_file(path, "a run artifact")
            if os.path.islink(self.root / "training.log"):  # refused before training; other faults of the log only warn
                safeio.own_file(self.root / "training.log", "the training log")
            if on_train_start is not None:
                on_train_start(path)
            from flannel_repro.training.harness import train  # transformers is imported only when something trains

            metadata = {"run_key": key, "run_key_material": material, "repeat": str(repeat),
                        "session": self.session, "pid": str(os.getpid())}
            if resume_at is not None:
                from flannel_repro.training.resume import train_in_two_processes

                args: dict[str, object] = {"kind": "flannel6", "config": config.to_dict(), "path": str(path),
                                           "metadata": metadata, "run_key": key, "threads": resolved_threads(config)}
                if engine_run:
                    from flannel_repro.training.engines import import_paths

                    args.update(kind="engine", imports=import_paths(config))
                start = time.perf_counter()
                train_in_two_processes(args, resume_at)
                self._log_training(path, key, time.perf_counter() - start)
            elif engine_run:
                from flannel_repro.training.engines import train_engine

                wall = train_engine(config, path, metadata=metadata, run_key=key, checkpoint_every=self.checkpoint_every)
                self._log_training(path, key, wall)
            else:
                result = train(config, path, data=data, progress=progress, metadata=metadata, run_key=key,
                               checkpoint_every=self.checkpoint_every if config.engine == "torch" else 0)
                self._log_training(path, key, result.wall_time_s)
        traj = Trajectory(path)
        replaced = self._rejected.pop(path, "")
        discarded = traj.metadata.get("resume_discarded", "")
        if discarded:  # a checkpoint of it failed verification: trained from the start instead of resumed
            replaced = "; ".join(filter(None, [replaced, f"checkpoint discarded ({discarded})"]))
        return Obtained(traj, trained=True, replaced=replaced)

    def _log_training(self, path: Path, key: str, wall: float) -> None:
        """One line per training in `training.log`: an audit trail of what was trained, by whom, when."""
        line = json.dumps({"run": path.name, "key": key, "session": self.session, "pid": os.getpid(),
                           "worker": os.environ.get("PYTEST_XDIST_WORKER", ""), "wall_time_s": round(wall, 3),
                           "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
        log = self.root / "training.log"
        try:  # never through a link, never blocking on a FIFO
            fd = safeio.open_nofollow(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644, what="the training log")
            try:
                os.write(fd, (line + "\n").encode())  # one short append per line: atomic on POSIX under O_APPEND
            finally:
                os.close(fd)
        except (OSError, ArtifactError) as exc:  # the run itself is published: an audit line must not fail it
            why = exc.strerror or exc if isinstance(exc, OSError) else str(exc).removeprefix(f"{log}: ")
            warnings.warn(f"{log}: could not append the training record ({why}); the run "
                          f"{path.name} is complete and is used", ArtifactWarning, stacklevel=3)


# --- session start: fail early, clean what killed processes left -------------------------------------


def writable_problem(root: str | Path) -> str | None:
    """Why run artifacts could not be written under `root` (None when they can), found by creating and
    removing a file in `root` or, when it does not exist yet, in its nearest existing ancestor (which
    is where `root` would be created). A real write, not `os.access`: root passes every permission
    check and a read-only file system answers only to a write."""
    import tempfile

    path = Path(root)
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is None:
        return f"none of {path} and its parents exists"
    if not existing.is_dir():
        return f"{existing} is a file, not a directory"
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".flannel-write-probe-")
    except OSError as exc:
        where = "it" if existing == path else f"{existing}, where it would be created,"
        return f"{where} is not writable ({exc.strerror or exc})"
    os.close(fd)
    os.unlink(probe)
    return None


def clean_leftovers(root: str | Path, *, older_than_s: float = 60.0) -> list[Path]:
    """Remove what killed processes left in an artifacts directory: partial artifacts of writers that
    are gone (`stream.stale_partials`), progress files of runs no one is training, and resumable partial
    files that never got a checkpoint (those with one are kept: their run resumes from it). Safe while
    other sessions use the directory: a progress file is removed only while this process holds its
    run's lock (a trainer holds it for the whole training), a partial only when its writer's pid is
    not running and the file has not changed for `older_than_s` (a live writer on another machine sharing
    the directory keeps it fresh). Returns the removed paths."""
    from filelock import Timeout

    directory = Path(root)
    if not directory.is_dir():
        return []
    removed = stream.cleanup_partials(directory, older_than_s=older_than_s)
    for progress in sorted(directory.glob("*.safetensors.progress")):
        run = str(progress)[: -len(".progress")]
        try:
            with _lock(run + ".lock", timeout=0):
                progress.unlink()
        except (Timeout, FileNotFoundError):
            continue  # being trained now, or removed by another session
        except OSError:
            continue  # a directory we cannot write: the writable check reports it
        removed.append(progress)
    # a resumable partial file without its checkpoint was killed before its first checkpoint: nothing to resume
    for partial in sorted(directory.glob("*.safetensors.resumable")):
        run = str(partial)[: -len(".resumable")]
        if Path(run + ".ckpt").exists():
            continue  # resumable: kept for the run's next training
        try:
            if time.time() - partial.stat().st_mtime < older_than_s:
                continue
            with _lock(run + ".lock", timeout=0):
                if not Path(run + ".ckpt").exists():
                    partial.unlink()
                    removed.append(partial)
        except (Timeout, OSError):
            continue  # being trained now, removed by another session, or not ours to remove
    return removed


# --- pruning -----------------------------------------------------------------------------------------


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
    if (not isinstance(key, str) or re.fullmatch(r"[0-9a-f]{20}", key) is None or key[:12] != named.group(2)
            or str(material.get("repeat")) != named.group(1)):
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
    reasons = []
    if material.get("code") not in (None, code):
        reasons.append(f"flannel-repro code {material.get('code')} (now {code})")
    for name, version in sorted((material.get("packages") or {}).items()):
        if packages.get(name) != version:
            reasons.append(f"{name} {version} (now {packages.get(name, 'absent')})")
    return (True, "; ".join(reasons)) if reasons else None


def _side_file_is_ours(path: Path) -> bool:
    """A regular file named after a run name the store gives, with one of the store's side-file suffixes."""
    side = _SIDE_FILE.fullmatch(path.name)
    return (side is not None and _RUN_FILE.fullmatch(side.group(1)) is not None and not path.is_symlink()
            and path.is_file())


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
    for path in stream.stale_partials(directory):
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
                p.name.startswith(path.name[: -len(".progress")] + ".partial-") for p in directory.iterdir()):
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
                add(path, "resume file without its " + ("partial artifact" if suffix == CHECKPOINT_SUFFIX else "checkpoint"))
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


def _lock(path: str, timeout: float):  # noqa: ANN202
    """A run's FileLock; a link or special file at the lock's path is an ArtifactError naming it (FileLock
    would open, and truncate, what a link points to)."""
    from filelock import FileLock

    safeio.own_file(path, "a lock file")
    return FileLock(path, timeout=timeout)


def _lock_is_free(path: Path) -> bool:
    from filelock import Timeout

    try:
        with _lock(str(path), timeout=0):
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
