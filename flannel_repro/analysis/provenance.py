"""What summaries and digest chains record about where a run came from.

A run is given as a RunFile or the path of its artifact (`RunFileOrPath`, opened by `open_run`).
Recorded about it: the config with the device reduced to its class (cpu, cuda or mps) and that
config's fingerprint, the hashes that identify its data, and the part of its environment that can
move its numbers (`environment_subset`: versions, device, threads, deterministic flags, ...).

This module imports only the standard library at import time (RunFile when a run is opened).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Mapping, Union

from flannel_repro.devices import DEVICE_KINDS, device_kind

if TYPE_CHECKING:
    from flannel_repro.storage.run import RunFile

__all__ = [
    "RunFileOrPath",
    "DEVICE_CLASSES",
    "ENV_KEYS",
    "DATA_KEYS",
    "open_run",
    "device_class",
    "environment_subset",
    "config_dict",
    "config_fingerprint",
    "data_identity",
]

RunFileOrPath = Union["RunFile", str, "os.PathLike[str]"]  # a RunFile, or the path of a run's artifact

DEVICE_CLASSES = DEVICE_KINDS

# The part of `Trajectory.env` worth keeping with a summary: what can move a trajectory's numbers.
ENV_KEYS = (
    "flannel_repro",
    "code_version",
    "python",
    "packages",
    "device",
    "threads",
    "deterministic_algorithms",
    "cudnn_deterministic",
    "cudnn_benchmark",
    "allow_tf32",
    "env",
    "numerics",
)
# Data description fields that identify the data (the origin label and paths do not).
DATA_KEYS = ("tokenizer_sha256", "corpus_sha256", "token_mask_sha256", "n_tokens", "n_live", "n_dead")


def open_run(run: RunFileOrPath) -> "RunFile":
    """`run` itself if it is a RunFile, else the RunFile of the artifact at that path."""
    from flannel_repro.storage.run import RunFile  # here, not at the top: importing this module stays light

    return run if isinstance(run, RunFile) else RunFile(run)


def device_class(device: str) -> str:
    """'cuda:1' -> 'cuda'; 'cpu' -> 'cpu' (ConfigError for anything that is not a device string)."""
    return device_kind(device)


def environment_subset(env: Mapping[str, Any]) -> dict[str, Any]:
    """The keys of an environment fingerprint (`determinism.environment_fingerprint`) that can move a
    trajectory: versions, device, threads, deterministic flags, allocator/thread environment variables."""
    return {k: env[k] for k in ENV_KEYS if k in env}


def config_dict(traj: "RunFile") -> dict[str, Any]:
    """The run's fingerprinted config fields, with the device reduced to its class."""
    import dataclasses

    cfg = traj.config
    out = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.metadata.get("fingerprint", True)}
    if "params" in out:  # an engine run's own hyperparameters (a read-only mapping)
        out["params"] = dict(out["params"])
    out["device"] = device_class(cfg.device)
    return out


def config_fingerprint(traj: "RunFile") -> str:
    """The fingerprint of the run's config with the device reduced to its class."""
    cfg = traj.config
    return cfg.replace(device=device_class(cfg.device)).fingerprint()


def data_identity(traj: "RunFile") -> dict[str, Any]:
    """The entries of the run's data description that identify its data (`DATA_KEYS`)."""
    return {k: traj.data_info[k] for k in DATA_KEYS if k in traj.data_info}
