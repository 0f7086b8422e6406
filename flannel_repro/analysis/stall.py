"""The bf16 stall: training that stops moving W because its updates round away.

The notebook trains in pure bf16. A bf16 weight has 8 significant bits, so an update smaller than half
an ulp of the weight (|w| * 2^-9) leaves it unchanged; as Adam's steps shrink with the learning rate,
more and more of W stops moving, and `exp_avg_sq.mul_(0.999)` is a no-op (0.999 is 1.0 in bf16). The
recorder stores, per step, the share of W's entries that changed, the share of proposed updates lost
to rounding and the share of the second moment that moved (`storage.layout.KEY_UPDATES`; see
`training.run_recorder.UpdateTracker` for how the proposed update is recomputed). Runs written before those
statistics existed still give the changed share, recomputed from W.

    profile = stall_profile(run)              # per-step arrays
    profile.stalled_at(min_changed=0.01)      # first step whose windowed mean falls below 1 %
    assert_not_stalled(run, by_step=500)      # a claim, with a located message
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from flannel_repro.analysis.assertions import notify
from flannel_repro.analysis.bitwise import update_fraction
from flannel_repro.analysis.trajectory import Trajectory
from flannel_repro.errors import ArtifactError, ConfigError
from flannel_repro.storage import layout

PLOT = "update-fraction.png"  # the report's plot that shows a stall (flannel_repro.report)


@dataclass
class StallProfile:
    """Per step 0..S (NaN where unknown): `changed`, `lost`, `second_moment_moved` (shares in [0, 1])."""

    name: str
    dtype: str
    steps: np.ndarray
    changed: np.ndarray
    lost: np.ndarray
    second_moment_moved: np.ndarray
    recorded: bool  # False: only `changed` is known (recomputed from W)

    def at(self, step: int) -> dict[str, Any]:
        if not 0 <= step < self.steps.size:
            raise ConfigError(f"{self.name}: expected a step in 0..{self.steps.size - 1}, got {step}.")
        return {"step": int(step), **{f: _num(getattr(self, f)[step]) for f in layout.UPDATE_FIELDS}}

    def windowed(self, window: int) -> np.ndarray:
        """The changed share averaged over the `window` steps ending at each step (NaN before a full window)."""
        if window < 1:
            raise ConfigError(f"window: expected >= 1, got {window}.")
        out = np.full(self.changed.shape, math.nan)
        x = self.changed[1:]
        if x.size >= window:
            c = np.concatenate([[0.0], np.cumsum(x)])
            out[window:] = (c[window:] - c[:-window]) / window
        return out

    def stalled_at(self, *, min_changed: float = 0.01, window: int = 10, by_step: int | None = None) -> int | None:
        """The first step (at most `by_step`) where the share of W's entries changed, averaged over the
        last `window` steps, is below `min_changed`; None when there is none."""
        if not 0.0 <= min_changed <= 1.0:
            raise ConfigError(f"min_changed: expected a share in [0, 1], got {min_changed}.")
        mean = self.windowed(window)
        last = self.steps.size - 1 if by_step is None else min(by_step, self.steps.size - 1)
        hits = np.flatnonzero(mean[: last + 1] < min_changed)
        return int(hits[0]) if hits.size else None

    def rows(self, steps: Sequence[int]) -> list[dict[str, Any]]:
        return [self.at(s) for s in steps if 0 <= s < self.steps.size]

    def lines(self, steps: Sequence[int]) -> list[str]:
        out = [
            f"update statistics of {self.name} ({self.dtype}):",
            f"  {'step':>6} {'changed':>9} {'lost':>9} {'v moved':>9}",
        ]
        for r in self.rows(steps):
            out.append(
                f"  {r['step']:>6} {_pct(r['changed']):>9} {_pct(r['lost']):>9} {_pct(r['second_moment_moved']):>9}"
            )
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dtype": self.dtype,
            "recorded": self.recorded,
            **{f: [_num(v) for v in getattr(self, f)] for f in layout.UPDATE_FIELDS},
        }


def _num(v: float) -> float | None:
    return None if math.isnan(float(v)) else float(v)


def _pct(v: float | None) -> str:
    """A share as a percentage that never rounds across a threshold it is compared with (0.998% is not 1.00%)."""
    if v is None:
        return "-"
    return f"{100 * v:.2f}%" if 0.01 <= v <= 0.9999 or v in (0.0, 1.0) else f"{100 * v:.3g}%"


def stall_profile(run: Trajectory | str) -> StallProfile:
    """The run's per-step update statistics (recorded; or, for older runs, the changed share from W)."""
    traj = run if isinstance(run, Trajectory) else Trajectory(run)
    n = traj.steps + 1
    try:
        u = {k: v.double().numpy() for k, v in traj.updates.items()}
        recorded = True
    except ArtifactError:  # written before the statistics existed: what W itself tells
        nan = np.full(n, math.nan)
        changed = update_fraction(traj.path) if traj.has_W else nan.copy()
        u = {"changed": changed, "lost": nan.copy(), "second_moment_moved": nan.copy()}
        recorded = False
    return StallProfile(
        name=traj.label,
        dtype=traj.config.dtype,
        steps=np.arange(n),
        recorded=recorded,
        changed=u["changed"],
        lost=u["lost"],
        second_moment_moved=u["second_moment_moved"],
    )


def assert_not_stalled(run: Trajectory | str, *, by_step: int, min_changed: float = 0.01, window: int = 10) -> None:
    """Fail when, by `by_step`, the share of W's entries changed per step (mean over `window` steps) has
    fallen below `min_changed`. The message names the step, the shares lost to rounding and of the
    second moment that moved, and the report plot that shows it."""
    __tracebackhide__ = True
    traj = run if isinstance(run, Trajectory) else Trajectory(run)
    if not 1 <= by_step <= traj.steps:
        raise ConfigError(f"by_step: expected a step in 1..{traj.steps} of {traj.label}, got {by_step}.")
    profile = stall_profile(traj)
    at = profile.stalled_at(min_changed=min_changed, window=window, by_step=by_step)
    notify("not_stalled", traj, traj, {"stalled_at": at, "by_step": by_step, "min_changed": min_changed})
    if at is None:
        return
    row = profile.at(at)
    mean = float(profile.windowed(window)[at])
    lost = (
        ""
        if row["lost"] is None
        else (
            f" Of the updates the optimizer proposed at step {at}, {_pct(row['lost'])} were lost to rounding "
            f"(smaller than half a {profile.dtype} ulp of the weight)."
        )
    )
    moved = (
        ""
        if row["second_moment_moved"] is None
        else (f" Adam's second moment (exp_avg_sq) changed in {_pct(row['second_moment_moved'])} of its entries.")
    )
    fix = (
        " The usual fix: float32 weights (dtype = \"float32\"), or bf16 autocast over float32 weights."
        if profile.dtype == "bfloat16"
        else ""
    )
    table = "\n".join(profile.lines(sorted({1, max(1, at - window + 1), at, by_step, traj.steps})))
    raise AssertionError(
        f"{traj.label}: training stalled by step {by_step}: at step {at} the share of W's entries that changed "
        f"fell to {_pct(mean)} (mean over steps {at - window + 1}..{at}; required >= {_pct(min_changed)})."
        f"{lost}{moved}{fix}\nPlot: {PLOT} (flannel-repro report, or --flannel-report).\n{table}\nartifact: {traj.path}"
    )
