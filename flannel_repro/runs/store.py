"""Train once, share everywhere: a directory of run artifacts keyed by everything that moves the numbers.

A run's key hashes the config fingerprint, the data files' hashes, the environment that can change a
result (package versions, this package's code, device, CPU capability, thread count) and the
`repeat` index. A process that needs a run either finds a complete artifact with that exact key, or
takes the run's file lock and trains it while other processes (xdist workers) wait and then read.
Two different `repeat` indices are two different keys, hence always two real trainings.

Which files of an artifacts directory are the store's, and pruning those no run can reuse: `runs.prune`.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from flannel_repro import safeio
from flannel_repro.storage.partials import cleanup_partials
from flannel_repro.errors import ArtifactError, ArtifactWarning, ConfigError, DeterminismWarning, RunMissing
from flannel_repro.config import EngineRunConfig

if TYPE_CHECKING:
    from filelock import FileLock
    from flannel_repro.runs.remote import RemoteStore
    from flannel_repro.storage.run import RunFile
    from flannel_repro.config import RunConfig
    from flannel_repro.analysis.trajectory import Trajectory
    from flannel_repro.data.corpus import CorpusData

KEY_FORMAT = "flannel-repro/run-key/1"


def resolved_threads(config: "RunConfig | EngineRunConfig") -> int:
    import torch

    return config.threads or torch.get_num_threads()


def run_key_material(
    config: "RunConfig | EngineRunConfig", data_hashes: dict[str, str], repeat: int
) -> dict[str, object]:
    """Everything the key is made of, as a readable dict (stored in the artifact's metadata)."""
    from flannel_repro.training.determinism import code_version, device_description, package_versions
    from flannel_repro.training.numerics import numerics_info

    dev = device_description(config.device)
    numerics = numerics_info(
        config.device, threads=resolved_threads(config), deterministic=config.deterministic, mode=config.numerics
    )
    return {
        "format": KEY_FORMAT,
        "config": config.fingerprint(),
        "data": dict(sorted(data_hashes.items())),
        "packages": package_versions(),
        "code": code_version(),
        # a CPU's arithmetic is its numerics class (below), not its model name: machines of one class share runs;
        # a GPU's model stays in the key (its class is not probed)
        "device": {
            k: dev.get(k)
            for k in ("device", "name", "cpu_capability", "capability", "cuda", "cudnn")
            if not (k == "name" and config.device == "cpu")
        },
        "threads": resolved_threads(config),
        # the arithmetic the run gets: a run of another class is never reused as if it were equal
        "numerics": {"class": numerics["class"], "probe": (numerics.get("probe") or {}).get("digest")},
        "repeat": repeat,
    }


def key_of(material: dict[str, object]) -> str:
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:20]


CACHEDIR_TAG = (
    "Signature: 8a477f597d28d172789f06886806bc55\n"
    "# This file is a cache directory tag created by flannel-repro: run artifacts, retrained on demand.\n"
    "# For information about cache directory tags, see: https://bford.info/cachedir/\n"
)


def mark_cache_dir(root: Path) -> None:
    """Create `root` as a cache directory: a CACHEDIR.TAG (backup tools skip it) and a .gitignore that
    ignores everything in it, as pytest does for its own cache. Existing files are left as they are."""
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ArtifactError(
            f"{root}: expected a directory run artifacts can be written to; it could not be created "
            f"({exc.strerror or exc})."
        ) from None
    for name, text in (("CACHEDIR.TAG", CACHEDIR_TAG), (".gitignore", "# created by flannel-repro\n*\n")):
        path = root / name
        if not path.exists():
            try:
                with open(path, "x", encoding="utf-8") as f:  # exclusive: concurrent workers write it once
                    f.write(text)
            except FileExistsError:
                pass
            except OSError as exc:
                raise ArtifactError(
                    f"{root}: expected a directory run artifacts can be written to; writing {name} "
                    f"failed ({exc.strerror or exc})."
                ) from None


# (path, inode, size, mtime) -> problems found: a file is verified once per process until it changes.
_VERIFIED: dict[tuple[str, int, int, int], list[str]] = {}


def _verified(traj: "RunFile") -> list[str]:
    """`traj.verify()`, remembered per process by the file's stat signature."""
    st = traj.path.stat()
    key = (str(traj.path), st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _VERIFIED:
        _VERIFIED[key] = traj.verify()
    return _VERIFIED[key]


def run_name(config: "RunConfig | EngineRunConfig", repeat: int, key: str) -> str:
    seeds = f"seed{config.model_seed}" if config.train_seed is not None else f"m{config.model_seed}-d{config.data_seed}"
    dev = config.device.replace(":", "")
    return f"{seeds}-{dev}-{config.engine}-r{repeat}-{key[:12]}"


@dataclass(frozen=True)
class Obtained:
    trajectory: "Trajectory"
    trained: bool  # True if this process trained it; False if it was read from the store
    replaced: str = ""  # why the artifact found under its key was set aside and trained again ("" if none was)
    fetched: bool = False  # downloaded from a URL store into the local cache by this process


class RunStore:
    """Run artifacts under `root`, shared between processes through file locks.

    `session` tags artifacts written in this test session; with `reuse_earlier=False` an artifact is
    reused only if it carries the same tag (made in this session, maybe by another xdist worker).
    """

    def __init__(
        self,
        root: str | Path,
        *,
        session: str = "",
        reuse_earlier: bool = True,
        lock_timeout_s: float = 6 * 3600,
        checkpoint_every: int = 0,
        remote: "RemoteStore | None" = None,
        train: bool = True,
    ) -> None:
        self.root = Path(root)
        # a store behind a URL (runs.remote): `root` is then this machine's read-through cache of it
        self.remote = remote
        # False: a run that is neither in the cache nor in the store is RunMissing, never trained here
        self.train = train
        # torch-engine and registered-engine runs checkpoint every N steps; a killed run then resumes
        self.checkpoint_every = checkpoint_every
        self.session = session
        self.reuse_earlier = reuse_earlier
        self.lock_timeout_s = lock_timeout_s
        self._rejected: dict[Path, str] = {}  # artifacts that failed verification -> what was wrong
        self._no_wait = False  # obtain_if_free: waiting for another machine's claim is not allowed either

    def path_for(self, config: "RunConfig | EngineRunConfig", repeat: int, key: str) -> Path:
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
            warnings.warn(
                f"{path.name}: the artifact's run-key material does not match its run key (edited after "
                "training); it is trained again",
                ArtifactWarning,
                stacklevel=4,
            )
            traj.close()
            return None
        if not self.reuse_earlier and traj.metadata.get("session") != self.session:
            traj.close()
            return None
        problems = _verified(traj)
        if problems:
            self._rejected[path] = "; ".join(problems)
            warnings.warn(
                f"{path.name}: the artifact failed verification ({'; '.join(problems)}); it is trained again",
                ArtifactWarning,
                stacklevel=4,
            )
            traj.close()
            return None
        return traj

    def obtain(
        self,
        config: "RunConfig | EngineRunConfig",
        *,
        repeat: int = 0,
        resume_at: int | None = None,
        progress: Callable[[int, int, float], None] | None = None,
        on_train_start: Callable[[Path], None] | None = None,
    ) -> Obtained:
        """The trajectory for (config, repeat): from the store if complete and matching, else trained now.

        `resume_at` = k: a separate run, stopped after step k in a fresh process and resumed in another
        (training.resume); equal to the uninterrupted run bitwise when resuming changes nothing."""
        from flannel_repro.data.corpus import load_data

        if repeat < 0:
            raise ValueError(f"'repeat' must be >= 0 (got {repeat}).")
        from flannel_repro.training.numerics import apply as apply_numerics

        apply_numerics(config.numerics, config.device)  # before the key's probe starts oneDNN and MKL
        engine_run = isinstance(config, EngineRunConfig)
        if isinstance(config, EngineRunConfig):  # engine_run (spelt out for the type checker)
            from flannel_repro.training.engines import get_engine

            data = None
            material = run_key_material(config, get_engine(config.engine).key_data(), repeat)
        else:
            data = load_data(config)
            material = run_key_material(config, data.hashes, repeat)
        if resume_at is not None:
            if config.engine != "torch" and not engine_run:
                raise ConfigError(
                    f"resume_at: resume is implemented for engine = 'torch' and registered engines, "
                    f"got engine={config.engine!r}."
                )
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
        cleanup_partials(self.root)
        with run_lock(str(path) + ".lock", timeout=self.lock_timeout_s):
            hit = self._usable(path, key, material)  # another worker may have finished it while we waited
            if hit is not None:
                return Obtained(hit, trained=False)
            if self.remote is None:
                return self._train(config, path, key, material, data, repeat, resume_at, progress, on_train_start)
            return self._through_remote(
                self.remote, config, path, key, material, data, repeat, resume_at, progress, on_train_start
            )

    def obtain_if_free(
        self,
        config: "RunConfig | EngineRunConfig",
        *,
        repeat: int = 0,
        resume_at: int | None = None,
        progress: Callable[[int, int, float], None] | None = None,
        on_train_start: Callable[[Path], None] | None = None,
    ) -> Obtained | None:
        """`obtain`, except that it never waits for the run's lock: None when another process holds it (is
        training the run). The local scheduler (plugin.schedule) trains what no one else is training with it."""
        from filelock import Timeout

        waited, self.lock_timeout_s = self.lock_timeout_s, 0  # run_lock(..., timeout=0): one try
        self._no_wait = True  # and a URL store's claim held by another machine is not waited for either
        try:
            return self.obtain(
                config, repeat=repeat, resume_at=resume_at, progress=progress, on_train_start=on_train_start
            )
        except Timeout:
            return None
        finally:
            self.lock_timeout_s = waited
            self._no_wait = False

    def _through_remote(
        self,
        remote: "RemoteStore",
        config: "RunConfig | EngineRunConfig",
        path: Path,
        key: str,
        material: dict[str, object],
        data: "CorpusData | None",
        repeat: int,
        resume_at: int | None,
        progress: Callable[[int, int, float], None] | None,
        on_train_start: Callable[[Path], None] | None,
    ) -> Obtained:
        """With this process holding the run's local lock: download the run from the URL store, or train it
        under the store's claim and publish it. A bad object is trained again and replaced."""
        from contextlib import nullcontext

        from flannel_repro.runs.remote import owner_id

        if not remote.checked:
            remote.check()  # measures whether claims can be exclusive here; errors name the store
        got, bad = self._download(remote, path, key, material)
        if got is not None:
            return got
        claim = None
        if remote.exclusive and self.train and not bad and self._no_wait:
            claim, _holder = remote.try_claim(path.stem, owner_id(self.session))
            if claim is None:  # another machine is training it: left to it (obtain_if_free returns None)
                from filelock import Timeout

                raise Timeout(str(path))
        elif remote.exclusive and self.train and not bad:
            manifest, claim = remote.wait_for(path.stem, owner_id(self.session))
            if manifest is not None:  # another machine published it while we waited
                got, bad = self._download(remote, path, key, material)
                if got is not None:
                    return got
        with remote.holding(claim) if claim is not None else nullcontext():
            obtained = self._train(config, path, key, material, data, repeat, resume_at, progress, on_train_start)
            obtained = self._publish(remote, obtained, key, material, bad)
        if bad:
            why = f"the store's object failed verification ({bad})"
            obtained = Obtained(
                obtained.trajectory, True, "; ".join(filter(None, [why, obtained.replaced])), obtained.fetched
            )
        return obtained

    def _download(
        self, remote: "RemoteStore", path: Path, key: str, material: dict[str, object]
    ) -> "tuple[Obtained | None, str]":
        """(the run downloaded into the cache and verified, or None; why the store's object is bad, or "")."""
        try:
            manifest = remote.lookup(path.stem)
        except ArtifactError as exc:
            return None, str(exc)
        if manifest is None:
            return None, ""
        if manifest.key != key:
            return None, f"{remote.show(remote.manifest_path(path.stem))}: expected run key {key}, got {manifest.key}"
        try:
            remote.fetch(manifest, path)
        except ArtifactError as exc:
            return None, str(exc)
        traj = self._usable(path, key, material)
        if traj is None:
            why = self._rejected.pop(path, "") or "unreadable or incomplete"
            path.unlink(missing_ok=True)
            return None, f"{remote.show_object(manifest)}: {why}"
        return Obtained(traj, trained=False, fetched=True), ""

    def _publish(
        self, remote: "RemoteStore", obtained: Obtained, key: str, material: dict[str, object], bad: str
    ) -> Obtained:
        """Publish a run trained here. When another machine published the key first, its run wins: it
        replaces this one in the cache, and a difference in the weights is a DeterminismWarning."""
        traj = obtained.trajectory
        path = traj.path
        numerics = str((traj.env.get("numerics") or {}).get("class", ""))
        try:
            won, manifest = remote.publish(
                path.stem,
                key,
                path,
                session=self.session,
                material=json.loads(json.dumps(material)),
                numerics_class=numerics,
                replace=bool(bad),
            )
        except OSError as exc:
            warnings.warn(
                f"{path.name}: trained here, but publishing it to {remote.url} failed ({exc}); it is used from "
                "this machine's cache, and another machine will train it again",
                ArtifactWarning,
                stacklevel=4,
            )
            return obtained
        if won:
            return obtained
        from flannel_repro.analysis.trajectory import Trajectory

        ours = [traj.digest_hex(s) for s in range(traj.steps + 1)]
        traj.close()
        remote.fetch(manifest, path)
        theirs = Trajectory(path)
        published = [theirs.digest_hex(s) for s in range(theirs.steps + 1)]
        differs = next((s for s, (a, b) in enumerate(zip(ours, published)) if a != b), None)
        if differs is not None:
            warnings.warn(
                f"{path.name}: {manifest.published_by.get('owner', 'another machine')} published this run first, and "
                f"its W differs from the one trained here from step {differs}: the same run key trained twice "
                "gave different bits. The published run is used.",
                DeterminismWarning,
                stacklevel=4,
            )
        return Obtained(theirs, trained=True, replaced=obtained.replaced, fetched=False)

    def _train(
        self,
        config: "RunConfig | EngineRunConfig",
        path: Path,
        key: str,
        material: dict[str, object],
        data: "CorpusData | None",
        repeat: int,
        resume_at: int | None,
        progress: Callable[[int, int, float], None] | None,
        on_train_start: Callable[[Path], None] | None,
    ) -> Obtained:
        """Train the run into `path`, with this process holding its lock."""
        from flannel_repro.analysis.trajectory import Trajectory

        if not self.train:
            where = self.remote.url if self.remote is not None else str(self.root)
            raise RunMissing(
                f"{path.stem}: expected this run in the store {where}, got none (run key {key}); this session "
                "trains nothing (--flannel-no-train): train it first (the shard jobs, --flannel-shard=K/N, or "
                "flannel-repro train), or drop --flannel-no-train."
            )
        safeio.own_file(path, "a run artifact")
        if os.path.islink(self.root / "training.log"):  # refused before training; other faults of the log only warn
            safeio.own_file(self.root / "training.log", "the training log")
        if on_train_start is not None:
            on_train_start(path)
        from flannel_repro.training.harness import train  # transformers is imported only when something trains

        metadata = {
            "run_key": key,
            "run_key_material": material,
            "repeat": str(repeat),
            "session": self.session,
            "pid": str(os.getpid()),
        }
        if resume_at is not None:
            from flannel_repro.training.resume import train_in_two_processes

            args: dict[str, object] = {
                "kind": "flannel6",
                "config": config.to_dict(),
                "path": str(path),
                "metadata": metadata,
                "run_key": key,
                "threads": resolved_threads(config),
            }
            if isinstance(config, EngineRunConfig):  # engine_run
                from flannel_repro.training.engines import import_paths

                args.update(kind="engine", imports=import_paths(config))
            start = time.perf_counter()
            train_in_two_processes(args, resume_at)
            self._log_training(path, key, time.perf_counter() - start)
        elif isinstance(config, EngineRunConfig):  # engine_run
            from flannel_repro.training.engines import train_engine

            wall = train_engine(config, path, metadata=metadata, run_key=key, checkpoint_every=self.checkpoint_every)
            self._log_training(path, key, wall)
        else:
            result = train(
                config,
                path,
                data=data,
                progress=progress,
                metadata=metadata,
                run_key=key,
                checkpoint_every=self.checkpoint_every if config.engine == "torch" else 0,
            )
            self._log_training(path, key, result.wall_time_s)
        traj = Trajectory(path)
        replaced = self._rejected.pop(path, "")
        discarded = traj.metadata.get("resume_discarded", "")
        if discarded:  # a checkpoint of it failed verification: trained from the start instead of resumed
            replaced = "; ".join(filter(None, [replaced, f"checkpoint discarded ({discarded})"]))
        return Obtained(traj, trained=True, replaced=replaced)

    def _log_training(self, path: Path, key: str, wall: float) -> None:
        """One line per training in `training.log`: an audit trail of what was trained, by whom, when."""
        line = json.dumps(
            {
                "run": path.name,
                "key": key,
                "session": self.session,
                "pid": os.getpid(),
                "worker": os.environ.get("PYTEST_XDIST_WORKER", ""),
                "wall_time_s": round(wall, 3),
                "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }
        )
        log = self.root / "training.log"
        try:  # never through a link, never blocking on a FIFO
            fd = safeio.open_nofollow(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644, what="the training log")
            try:
                os.write(fd, (line + "\n").encode())  # one short append per line: atomic on POSIX under O_APPEND
            finally:
                os.close(fd)
        except (OSError, ArtifactError) as exc:  # the run itself is published: an audit line must not fail it
            why = exc.strerror or exc if isinstance(exc, OSError) else str(exc).removeprefix(f"{log}: ")
            warnings.warn(
                f"{log}: could not append the training record ({why}); the run {path.name} is complete and is used",
                ArtifactWarning,
                stacklevel=3,
            )


def default_cache_dir(url: str, base: str | Path) -> Path:
    """Where a URL store's runs are cached on this machine by default: one folder per store under `base`."""
    from flannel_repro.runs.remote import redact

    return Path(base) / ".flannel" / "cache" / hashlib.sha256(redact(url).encode()).hexdigest()[:12]


def open_store(
    location: str | Path,
    *,
    cache: str | Path | None = None,
    session: str = "",
    reuse_earlier: bool = True,
    checkpoint_every: int = 0,
    train: bool = True,
    check: bool = False,
) -> RunStore:
    """The run store at `location`: a local folder, or a URL of any fsspec file system (`s3://bucket/runs`,
    `gs://...`, `file:///shared/runs`) cached in `cache` (default: `.flannel/cache/<store>` in the working
    directory). `check`: reach the store now, so a store that cannot be reached, or refuses these
    credentials, is a ConfigError here and not in the middle of a run."""
    from flannel_repro.runs.remote import RemoteStore, is_url

    remote = None
    root = Path(location)
    if is_url(str(location)):
        remote = RemoteStore(str(location))
        if check:
            remote.check()
        root = Path(cache) if cache is not None else default_cache_dir(str(location), Path.cwd())
    return RunStore(
        root,
        session=session,
        reuse_earlier=reuse_earlier,
        checkpoint_every=checkpoint_every,
        remote=remote,
        train=train,
    )


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
    are gone (`storage.partials.stale_partials`), progress files of runs no one is training, and resumable partial
    files that never got a checkpoint (those with one are kept: their run resumes from it). Safe while
    other sessions use the directory: a progress file is removed only while this process holds its
    run's lock (a trainer holds it for the whole training), a partial only when its writer's pid is
    not running and the file has not changed for `older_than_s` (a live writer on another machine sharing
    the directory keeps it fresh). Returns the removed paths."""
    from filelock import Timeout

    directory = Path(root)
    if not directory.is_dir():
        return []
    removed = cleanup_partials(directory, older_than_s=older_than_s)
    for progress in sorted(directory.glob("*.safetensors.progress")):
        run = str(progress)[: -len(".progress")]
        try:
            with run_lock(run + ".lock", timeout=0):
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
            with run_lock(run + ".lock", timeout=0):
                if not Path(run + ".ckpt").exists():
                    partial.unlink()
                    removed.append(partial)
        except (Timeout, OSError):
            continue  # being trained now, removed by another session, or not ours to remove
    return removed


def run_lock(path: str, timeout: float) -> "FileLock":
    """A run's FileLock; a link or special file at the lock's path is an ArtifactError naming it (FileLock
    would open, and truncate, what a link points to)."""
    from filelock import FileLock

    safeio.own_file(path, "a lock file")
    return FileLock(path, timeout=timeout)
