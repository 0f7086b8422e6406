"""Determinism claims as assertions whose failures say where two runs part and by how much.

Failures read like pytest-regressions': one summary line, the statistics, a few rows of a per-step
table and the artifact paths. Each helper sets `__tracebackhide__`, so pytest shows the caller's line.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any, Callable, Iterator, Union

import torch

from flannel_repro.analysis.bitwise import first_divergent_step
from flannel_repro.analysis.divergence import PairDivergence, pair_divergence
from flannel_repro.analysis.trajectory import Trajectory

TrajectoryLike = Union[Trajectory, str, Path]

Observer = Callable[[str, Trajectory, Trajectory, dict[str, Any]], None]
_observers: list[Observer] = []


@contextlib.contextmanager
def observe(observer: Observer) -> Iterator[None]:
    """Call `observer(claim, a, b, stats)` after every check made inside the block (the pytest plugin
    collects divergence figures for its terminal summary this way)."""
    _observers.append(observer)
    try:
        yield
    finally:
        _observers.remove(observer)


TABLE_ROWS = 8


def _traj(x: TrajectoryLike) -> Trajectory:
    return x if isinstance(x, Trajectory) else Trajectory(x)


def pair_class(a: Trajectory, b: Trajectory) -> str:
    """What differs between two runs' configs, in words (used to group divergence in reports)."""
    ca, cb = a.config, b.config
    diff = sorted(k for k in ca.to_dict() if getattr(ca, k) != getattr(cb, k))
    seeds = {"model_seed", "data_seed"}
    if not diff:
        resumed = [(t.key_material or {}).get("resume_at") for t in (a, b)]
        if resumed[0] != resumed[1]:
            return "stopped and resumed vs uninterrupted" if None in resumed else "stopped and resumed at other steps"
        return "same config, separate trainings" if a.repeat != b.repeat else "same run"
    if set(diff) == seeds:
        return "different train seeds"
    if diff == ["data_seed"]:
        return "data order only (model_seed fixed)"
    if diff == ["model_seed"]:
        return "model init only (data_seed fixed)"
    return "different " + ", ".join(diff)


def notify(claim: str, a: Trajectory, b: Trajectory, stats: dict[str, Any]) -> None:
    for observer in list(_observers):
        observer(claim, a, b, stats)


def _table_steps(div: PairDivergence, focus: int | None) -> list[int]:
    """A few informative rows: around the first divergent step, then evenly to the end."""
    last = int(div.steps[-1])
    picks = {0, last}
    if focus is not None:
        picks.update(s for s in range(max(0, focus - 1), min(last, focus + 2) + 1))
    span = max(1, last // 4)
    picks.update(range(0, last + 1, span))
    return sorted(picks)[:TABLE_ROWS] if len(picks) > TABLE_ROWS else sorted(picks)


def _explain(
    headline: str,
    a: Trajectory,
    b: Trajectory,
    div: PairDivergence | None,
    *,
    at_step: int | None = None,
    extra: str = "",
) -> str:
    lines = [headline]
    lines.append(f"  a: {a.label}")
    lines.append(f"  b: {b.label}")
    if div is not None:
        step = int(div.steps[-1]) if at_step is None else at_step
        s = div.at(step)
        first = "never" if div.first_step is None else str(div.first_step)
        lines.append(
            f"  first step they part: {first} of {int(div.steps[-1])}; at step {step}: max|ΔW| = {s['max_abs']:.6g}, "
            f"‖ΔW‖_F = {s['frobenius']:.6g}, rows differing = {s['rows_differ']} "
            f"(live {s['rows_differ_live']}, dead {s['rows_differ_dead']})"
        )
        if extra:
            lines.append(f"  {extra}")
        lines.append("")
        lines.extend("  " + row for row in div.table(_table_steps(div, div.first_step)).splitlines())
    elif extra:
        lines.append(f"  {extra}")
    lines.append("")
    lines.append(f"  artifact a: {a.path}")
    lines.append(f"  artifact b: {b.path}")
    return "\n".join(lines)


def _divergence(a: Trajectory, b: Trajectory) -> PairDivergence:
    return pair_divergence(a.reader, b.reader)


def _check_same_run_shape(a: Trajectory, b: Trajectory) -> None:
    __tracebackhide__ = True
    if a.digests.shape != b.digests.shape:
        raise AssertionError(
            f"the two trajectories have different lengths: {a.label} has {a.steps} steps, {b.label} has {b.steps}.\n"
            f"  artifact a: {a.path}\n  artifact b: {b.path}"
        )


def assert_identical(a: TrajectoryLike, b: TrajectoryLike) -> None:
    """Every step of W is bitwise equal (and so are the losses).

    Refuses to compare a run with itself: a claim that two trainings agree needs two trainings.
    """
    __tracebackhide__ = True
    a, b = _traj(a), _traj(b)
    if a.path.resolve() == b.path.resolve():
        raise AssertionError(
            f"assert_identical was given the same artifact twice ({a.path}); ask the trajectory "
            "fixture for repeat=0 and repeat=1 to compare two real trainings."
        )
    _check_same_run_shape(a, b)
    first = first_divergent_step(a.reader, b.reader) if a.has_W and b.has_W else _first_digest_step(a, b)
    losses_equal = torch.equal(a.losses.view(torch.int32), b.losses.view(torch.int32))
    stats: dict[str, Any] = {"first_step": first, "identical": first is None and losses_equal}
    notify("identical", a, b, stats)
    if first is None and losses_equal:
        return
    div = _divergence(a, b) if a.has_W and b.has_W else None
    if first is None:
        bad = int(torch.nonzero(a.losses.view(torch.int32) != b.losses.view(torch.int32))[0])
        headline = f"trajectories are not identical: W agrees at every step but the losses part at step {bad}"
    else:
        headline = f"trajectories are not identical: they part at step {first}"
    why = (
        f"\n  which operation made them part: flannel-repro why {a.path} {b.path}"
        f"\n  (or flannel_repro.first_divergent_operation(a, b) in Python)"
        if first
        else ""
    )
    raise AssertionError(_explain(headline, a, b, div) + why)


def _first_digest_step(a: Trajectory, b: Trajectory) -> int | None:
    neq = (a.digests != b.digests).any(dim=1)
    hits = torch.nonzero(neq)
    return int(hits[0]) if hits.numel() else None


def assert_same_start(a: TrajectoryLike, b: TrajectoryLike) -> None:
    """Both runs start from the same W (step 0 bitwise equal)."""
    __tracebackhide__ = True
    a, b = _traj(a), _traj(b)
    same = torch.equal(a.digests[0], b.digests[0])
    notify("same_start", a, b, {"first_step": None if same else 0})
    if not same:
        raise AssertionError(
            _explain(
                "the two runs do not start from the same W (step 0 differs)",
                a,
                b,
                _divergence(a, b) if a.has_W and b.has_W else None,
                at_step=0,
            )
        )


def assert_diverged(a: TrajectoryLike, b: TrajectoryLike, *, by_step: int | None = None) -> int:
    """The runs part (W differs) at some step, no later than `by_step` if given. Returns that step."""
    __tracebackhide__ = True
    a, b = _traj(a), _traj(b)
    _check_same_run_shape(a, b)
    first = _first_digest_step(a, b)
    notify("diverged", a, b, {"first_step": first, "by_step": by_step})
    if first is not None and (by_step is None or first <= by_step):
        return first
    div = _divergence(a, b) if a.has_W and b.has_W else None
    if first is None:
        headline = (
            f"expected the trajectories to diverge{'' if by_step is None else f' by step {by_step}'}, "
            f"but they are bitwise identical for all {a.steps} steps"
        )
    else:
        headline = f"expected the trajectories to diverge by step {by_step}, but they first part at step {first}"
    raise AssertionError(_explain(headline, a, b, div))


def assert_divergence_below(
    a: TrajectoryLike,
    b: TrajectoryLike,
    *,
    max_frobenius: float | None = None,
    max_abs: float | None = None,
    at_step: int | None = None,
) -> dict[str, Any]:
    """At `at_step` (default: the last step) ‖ΔW‖_F <= max_frobenius and/or max|ΔW| <= max_abs.

    Returns the measured statistics at that step (useful for reporting).
    """
    __tracebackhide__ = True
    if max_frobenius is None and max_abs is None:
        raise TypeError("assert_divergence_below needs max_frobenius and/or max_abs.")
    a, b = _traj(a), _traj(b)
    _check_same_run_shape(a, b)
    step = a.steps if at_step is None else at_step
    if not 0 <= step <= a.steps:
        raise ValueError(f"at_step={step} is outside 0..{a.steps}.")
    div = _divergence(a, b)
    s = div.at(step)
    failures = []
    if max_frobenius is not None and not s["frobenius"] <= max_frobenius:
        failures.append(f"‖ΔW‖_F = {s['frobenius']:.6g} > bound {max_frobenius:.6g}")
    if max_abs is not None and not s["max_abs"] <= max_abs:
        failures.append(f"max|ΔW| = {s['max_abs']:.6g} > bound {max_abs:.6g}")
    notify(
        "divergence_below",
        a,
        b,
        {
            **s,
            "first_step": div.first_step,
            "max_frobenius": max_frobenius,
            "max_abs_bound": max_abs,
            "ok": not failures,
        },
    )
    if failures:
        raise AssertionError(
            _explain(f"divergence at step {step} exceeds its bound: " + "; ".join(failures), a, b, div, at_step=step)
        )
    return s


def measure_divergence(a: TrajectoryLike, b: TrajectoryLike) -> PairDivergence:
    """The full per-step divergence of two trajectories (no assertion)."""
    return _divergence(_traj(a), _traj(b))


def relative_divergence(part: PairDivergence, whole: PairDivergence, step: int | None = None) -> float:
    """‖ΔW_part‖_F / ‖ΔW_whole‖_F at `step` (default last): e.g. data order alone vs both seeds."""
    step = int(whole.steps[-1]) if step is None else step
    denom = whole.at(step)["frobenius"]
    return math.nan if denom == 0 else part.at(step)["frobenius"] / denom
