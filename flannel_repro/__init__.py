"""flannel-repro: training-determinism experiments as a pytest reproducibility suite."""

from __future__ import annotations

from flannel_repro.version import __version__

from flannel_repro.config import EngineRunConfig, ExperimentConfig, RunConfig, notebook_config
from flannel_repro.errors import ArtifactError, ConfigError, DataError, DeterminismError, FlannelError

# Heavy names (they import torch) load on first use, so `import flannel_repro` and the pytest plugin
# stay light.
_LAZY = {
    "assert_identical": "flannel_repro.analysis.assertions",
    "assert_diverged": "flannel_repro.analysis.assertions",
    "assert_divergence_below": "flannel_repro.analysis.assertions",
    "assert_same_start": "flannel_repro.analysis.assertions",
    "measure_divergence": "flannel_repro.analysis.assertions",
    "relative_divergence": "flannel_repro.analysis.assertions",
    "Trajectory": "flannel_repro.analysis.trajectory",
    "summarize": "flannel_repro.analysis.summary",
    "summarize_pair": "flannel_repro.analysis.summary",
    "train": "flannel_repro.training.harness",
    "RunStore": "flannel_repro.runs.store",
    "export_notebook": "flannel_repro.storage.export",
    "all_pairs": "flannel_repro.analysis.divergence",
    "pair_divergence": "flannel_repro.analysis.divergence",
    "update_fraction": "flannel_repro.analysis.bitwise",
    "record_step": "flannel_repro.runs.replay",
    "first_divergent_operation": "flannel_repro.runs.replay",
    "OpLog": "flannel_repro.analysis.oplog",
    "compare_logs": "flannel_repro.analysis.oplog",
    "assert_not_stalled": "flannel_repro.analysis.stall",
    "stall_profile": "flannel_repro.analysis.stall",
    "write_report": "flannel_repro.report",
    "TrajectoryRecorder": "flannel_repro.training.own_training",
    "FlannelCallback": "flannel_repro.training.own_training",
    "register_engine": "flannel_repro.training.engines",
}


def __getattr__(name: str):  # noqa: ANN202
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'flannel_repro' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    *sorted(_LAZY),
    "ArtifactError",
    "ConfigError",
    "EngineRunConfig",
    "DataError",
    "DeterminismError",
    "ExperimentConfig",
    "FlannelError",
    "RunConfig",
    "__version__",
    "notebook_config",
]
