"""flannel-repro: training-determinism experiments as a pytest reproducibility suite."""

from __future__ import annotations

__version__ = "0.1.0"

from flannel_repro.config import ExperimentConfig, RunConfig, notebook_config
from flannel_repro.errors import ArtifactError, ConfigError, DataError, DeterminismError, FlannelError

# Heavy names (they import torch) load on first use, so `import flannel_repro` and the pytest plugin
# stay light.
_LAZY = {
    "assert_identical": "flannel_repro.assertions",
    "assert_diverged": "flannel_repro.assertions",
    "assert_divergence_below": "flannel_repro.assertions",
    "assert_same_start": "flannel_repro.assertions",
    "measure_divergence": "flannel_repro.assertions",
    "relative_divergence": "flannel_repro.assertions",
    "Trajectory": "flannel_repro.trajectory",
    "summarize": "flannel_repro.summary",
    "summarize_pair": "flannel_repro.summary",
    "train": "flannel_repro.harness",
    "RunStore": "flannel_repro.store",
    "export_notebook": "flannel_repro.artifacts",
    "all_pairs": "flannel_repro.divergence",
    "pair_divergence": "flannel_repro.divergence",
    "update_fraction": "flannel_repro.divergence",
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
    "DataError",
    "DeterminismError",
    "ExperimentConfig",
    "FlannelError",
    "RunConfig",
    "__version__",
    "notebook_config",
]
