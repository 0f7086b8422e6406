"""flannel-repro: training-determinism experiments as a pytest reproducibility suite."""

from __future__ import annotations

__version__ = "0.1.0"

from flannel_repro.config import ExperimentConfig, RunConfig, notebook_config
from flannel_repro.errors import ArtifactError, ConfigError, DataError, DeterminismError, FlannelError

__all__ = [
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
