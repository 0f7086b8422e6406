"""The run as the analysis sees it: the artifact's view (`storage.run.RunFile`) plus its summary.

`flannel_repro.Trajectory` is this class; the `trajectory` fixture and `train()`'s store return it.
"""

from __future__ import annotations

from typing import Iterable

from flannel_repro.analysis.summary import Summary, summarize
from flannel_repro.storage.run import RunFile


class Trajectory(RunFile):
    """One recorded run: `W_at(t)`, `losses`, `digests`, `config`, `env`, ... and `summary()`."""

    def summary(self, steps: Iterable[int] | None = None) -> Summary:
        """Small, stable statistics of this run for snapshots (`analysis.summary.summarize`): config
        fingerprint, loss and W statistics at steps 0, 1, 10, 100, ... and the last (or `steps`),
        update fractions, and the per-step digest chain."""
        return summarize(self, steps)
