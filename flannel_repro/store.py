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
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from flannel_repro import artifacts
from flannel_repro.errors import ArtifactError

if TYPE_CHECKING:
    from flannel_repro.config import RunConfig
    from flannel_repro.trajectory import Trajectory

KEY_FORMAT = "flannel-repro/run-key/1"


def resolved_threads(config: "RunConfig") -> int:
    import torch

    return config.threads or torch.get_num_threads()


def run_key_material(config: "RunConfig", data_hashes: dict[str, str], repeat: int) -> dict[str, object]:
    """Everything the key is made of, as a readable dict (stored in the artifact's metadata)."""
    from flannel_repro.determinism import code_version, device_description, package_versions
    from flannel_repro.numerics import numerics_info

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



def run_name(config: "RunConfig", repeat: int, key: str) -> str:
    seeds = f"seed{config.model_seed}" if config.train_seed is not None else f"m{config.model_seed}-d{config.data_seed}"
    dev = config.device.replace(":", "")
    return f"{seeds}-{dev}-{config.engine}-r{repeat}-{key[:12]}"


@dataclass(frozen=True)
class Obtained:
    trajectory: "Trajectory"
    trained: bool  # True if this process trained it; False if it was read from the store


class RunStore:
    """Run artifacts under `root`, shared between processes through file locks.

    `session` tags artifacts written in this test session; with `reuse_earlier=False` an artifact is
    reused only if it carries the same tag (made in this session, maybe by another xdist worker).
    """

    def __init__(self, root: str | Path, *, session: str = "", reuse_earlier: bool = True,
                 lock_timeout_s: float = 6 * 3600) -> None:
        self.root = Path(root)
        self.session = session
        self.reuse_earlier = reuse_earlier
        self.lock_timeout_s = lock_timeout_s

    def path_for(self, config: "RunConfig", repeat: int, key: str) -> Path:
        return self.root / f"{run_name(config, repeat, key)}.safetensors"

    def _usable(self, path: Path, key: str) -> "Trajectory | None":
        from flannel_repro.trajectory import Trajectory

        if not path.exists():
            return None
        try:
            traj = Trajectory(path)
        except ArtifactError:
            return None  # unreadable or incomplete: train it again (the rename below replaces it)
        if traj.run_key != key:
            traj.close()
            return None
        if not self.reuse_earlier and traj.metadata.get("session") != self.session:
            traj.close()
            return None
        return traj

    def obtain(self, config: "RunConfig", *, repeat: int = 0,
               progress: Callable[[int, int, float], None] | None = None,
               on_train_start: Callable[[Path], None] | None = None) -> Obtained:
        """The trajectory for (config, repeat): from the store if complete and matching, else trained now."""
        from filelock import FileLock

        from flannel_repro.data import load_data
        from flannel_repro.trajectory import Trajectory

        if repeat < 0:
            raise ValueError(f"'repeat' must be >= 0 (got {repeat}).")
        from flannel_repro.numerics import apply as apply_numerics

        apply_numerics(config.numerics, config.device)  # before the key's probe starts oneDNN and MKL
        data = load_data(config)
        material = run_key_material(config, data.hashes, repeat)
        key = key_of(material)
        path = self.path_for(config, repeat, key)
        hit = self._usable(path, key)
        if hit is not None:
            return Obtained(hit, trained=False)
        self.root.mkdir(parents=True, exist_ok=True)
        artifacts.cleanup_partials(self.root)
        with FileLock(str(path) + ".lock", timeout=self.lock_timeout_s):
            hit = self._usable(path, key)  # another worker may have finished it while we waited
            if hit is not None:
                return Obtained(hit, trained=False)
            if on_train_start is not None:
                on_train_start(path)
            from flannel_repro.harness import train  # transformers is imported only when something trains

            result = train(config, path, data=data, progress=progress,
                           metadata={"run_key": key, "run_key_material": material, "repeat": str(repeat),
                                     "session": self.session, "pid": str(os.getpid())})
            self._log_training(path, key, result.wall_time_s)
        return Obtained(Trajectory(path), trained=True)

    def _log_training(self, path: Path, key: str, wall: float) -> None:
        """One line per training in `training.log`: an audit trail of what was trained, by whom, when."""
        line = json.dumps({"run": path.name, "key": key, "session": self.session, "pid": os.getpid(),
                           "worker": os.environ.get("PYTEST_XDIST_WORKER", ""), "wall_time_s": round(wall, 3),
                           "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
        with open(self.root / "training.log", "a", encoding="utf-8") as f:
            f.write(line + "\n")  # one short append per line: atomic on POSIX under O_APPEND
