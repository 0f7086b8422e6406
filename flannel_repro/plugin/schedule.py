"""When the session's runs train: the local scheduler, CI shards and the gate job, all working from the plan
(`plugin.plan.session_plan`).

- `--flannel-schedule=plan`: before any claim runs, each process (each xdist worker) walks the plan in the same
  order and trains every run that is not in the store and that no other process is training (its lock is free),
  so no worker waits on a run while one is left for it to train; the claims then read the runs from the store.
- `--flannel-shard=K/N` and `--flannel-train-only`: the collected claims are replaced by one test item per run of
  the shard (or of the whole plan), so `-n auto` spreads the training over workers and each run passes or fails.
- `--flannel-no-train`: the claims read the store only; a missing run fails the claim that asked for it, naming
  the run and the shard job that should have trained it (`missing_message`).

Importing this module imports neither torch nor transformers.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import pytest

from flannel_repro.errors import FlannelError
from flannel_repro.plugin.report import ProgressWriter
from flannel_repro.plugin.session import SESSION_KEY, FlannelSession, RunRecord
from flannel_repro.plugin.plan import session_plan
from flannel_repro.runs.plan import RunRequest, request_label, shard

if TYPE_CHECKING:
    from flannel_repro.config import EngineRunConfig, RunConfig
    from flannel_repro.runs.store import Obtained

TRAIN_NODE = "flannel-train"  # the node ids of run items: flannel-train::<request label>


def record_run(state: FlannelSession, got: "Obtained", repeat: int, resume_at: int | None, threads: int) -> None:
    """A row of the terminal summary for a run this process trained or read (one trained here wins)."""
    traj = got.trajectory
    c = traj.config
    name = traj.path.stem
    if not got.trained and name in state.runs:
        return
    seed = str(c.train_seed) if c.train_seed is not None else f"m{c.model_seed}/d{c.data_seed}"
    state.runs[name] = RunRecord(
        name=name,
        seed=seed + (f" r{repeat}" if repeat else "") + (f" resumed@{resume_at}" if resume_at else ""),
        device=c.device,
        engine=c.engine,
        steps=c.steps,
        final_loss=traj.final_loss,
        wall_time_s=traj.wall_time_s,
        steps_per_s=traj.steps_per_s,
        threads=int(traj.metadata.get("threads", threads)),
        path=str(traj.path),
        trained_here=got.trained,
        numerics_class=str((traj.env.get("numerics") or {}).get("class", "")),
        replaced=got.replaced,
        fetched=got.fetched,
    )


def obtain_run(
    config: pytest.Config,
    cfg: "RunConfig | EngineRunConfig",
    *,
    repeat: int = 0,
    resume_at: int | None = None,
    wait: bool = True,
) -> "Obtained | None":
    """Get a run through the session's store, showing progress while it trains, and record it. With
    `wait=False`, None when another process holds the run's lock (it is training it)."""
    state = config.stash[SESSION_KEY]
    threads = state.apply_threads()
    reporter = ProgressWriter(config, state.progress_interval)
    store = state.store()
    get = store.obtain if wait else store.obtain_if_free
    got = get(cfg, repeat=repeat, resume_at=resume_at, progress=reporter.step, on_train_start=reporter.start)
    if got is not None:
        record_run(state, got, repeat, resume_at, threads)
    return got


def plan_of(config: pytest.Config, items: Sequence[pytest.Item]) -> list[RunRequest]:
    """The session's plan, computed once per process from its collected items."""
    state = config.stash[SESSION_KEY]
    if state.plan is None:
        try:
            state.plan = session_plan(config, items, state)
        except (FlannelError, TypeError) as exc:
            raise pytest.UsageError(f"flannel plan: {exc}") from None
    return state.plan


def train_plan(config: pytest.Config, plan: Sequence[RunRequest]) -> tuple[int, int]:
    """Walk `plan` once, training each run that is not in the store and whose lock is free (others are being
    trained by another process, or are already stored). Returns (trained here, left to other processes). A run
    that fails to train is left to the claim that asks for it, which reports the error."""
    trained = busy = 0
    for request in plan:
        try:
            got = obtain_run(config, request.config, repeat=request.repeat, resume_at=request.resume_at, wait=False)
        except (FlannelError, OSError, RuntimeError, ValueError) as exc:
            _say(config, f"flannel: planned run {request_label(request)} failed to train ({exc}); its claims report it")
            continue
        if got is None:
            busy += 1
            continue
        trained += got.trained
        got.trajectory.close()
    return trained, busy


def _say(config: pytest.Config, line: str) -> None:
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None and not hasattr(config, "workerinput"):
        reporter.write_line(line)


# --- shards: one test item per planned run -------------------------------------------------------------------


class RunItem(pytest.Item):
    """One run of the plan, as a test: it passes when the run is in the store (trained here or found there)."""

    def __init__(self, *, request: RunRequest, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.request = request

    def runtest(self) -> None:
        r = self.request
        got = obtain_run(self.config, r.config, repeat=r.repeat, resume_at=r.resume_at, wait=True)
        assert got is not None  # wait=True always obtains
        self.user_properties.append(("flannel_run", got.trajectory.path.name))
        got.trajectory.close()

    def reportinfo(self) -> tuple[Path, int | None, str]:
        return self.path, None, f"train {self.name}"


def run_items(session: pytest.Session, plan: Sequence[RunRequest], state: FlannelSession) -> list[pytest.Item]:
    """One RunItem per run of this session's shard (--flannel-shard=K/N) or of the whole plan."""
    mine = shard(plan, *state.shard) if state.shard is not None else list(plan)
    return [
        RunItem.from_parent(session, name=label, nodeid=f"{TRAIN_NODE}::{label}", request=r)
        for r, label in ((r, request_label(r)) for r in mine)
    ]


def missing_message(state: FlannelSession, plan: Sequence[RunRequest] | None, request: RunRequest, why: str) -> str:
    """Why a claim under --flannel-no-train fails: the run is not in the store, and which job should have trained it."""
    label = request_label(request)
    keys = [r.sort_key() for r in plan or ()]
    if request.sort_key() not in keys:
        return (
            f"{why}\nIt is not in this session's plan ({label}): no shard job trains it. Declare it in a "
            "pytest_flannel_plan hook (flannel_repro.plugin.hookspecs), or train it with a session without "
            "--flannel-no-train."
        )
    i = keys.index(request.sort_key())
    examples = ", ".join(f"--flannel-shard={i % n + 1}/{n}" for n in (2, 3, 4))
    return (
        f"{why}\nIt is run {i + 1} of this session's plan of {len(keys)} (item {TRAIN_NODE}::{label}): the shard job "
        f"--flannel-shard=K/N with K = {i} mod N + 1 trains it ({examples}), and --flannel-train-only trains the "
        "whole plan; run it with the same options and code before this gate job, on this store."
    )
