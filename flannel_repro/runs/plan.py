"""The runs a session needs, known before any claim runs: one `RunRequest` per (config, repeat, resume_at).

A plan is what the local scheduler, CI shards and a distributed engine all work from: each trains requests
into the store, and the claims then read them from it. A pytest session's plan is made from its collected items
by `plugin.plan.session_plan`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from flannel_repro.config import EngineRunConfig, RunConfig, run_config_from_dict
from flannel_repro.errors import ConfigError


@dataclass(frozen=True)
class RunRequest:
    """One run the claims ask for: `RunStore.obtain(config, repeat=repeat, resume_at=resume_at)`."""

    config: RunConfig | EngineRunConfig
    repeat: int = 0
    resume_at: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON values only: what a task on another process or machine is sent."""
        return {"config": self.config.to_dict(), "repeat": self.repeat, "resume_at": self.resume_at}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "RunRequest":
        raw = data.get("config")
        if not isinstance(raw, Mapping):
            raise ConfigError(f"a run request: expected a 'config' table, got {type(raw).__name__}.")
        config = run_config_from_dict(raw, source="a run request")
        resume_at = data.get("resume_at")
        return cls(config, int(data.get("repeat", 0)), None if resume_at is None else int(resume_at))

    def sort_key(self) -> tuple[str, int, int]:
        """A stable order every process computes the same way (shards split by it)."""
        return (self.config.fingerprint(), self.repeat, -1 if self.resume_at is None else self.resume_at)


# --- building a run's config, the one way the `trajectory` fixture and the plan both do it ---------------------


def run_config(
    template: RunConfig,
    *,
    device: str,
    train_seed: int | None = None,
    marker: Mapping[str, Any] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> RunConfig | EngineRunConfig:
    """The config `trajectory(train_seed, device=device, **overrides)` trains in a test whose
    @pytest.mark.flannel gives `marker`: the template with the marker's, then the call's overrides, the device
    and the seed (model_seed = data_seed = train_seed). An `engine` that is not a built-in one is a registered
    engine, which makes its own config. ConfigError for an unknown field or value; TypeError when both a
    train_seed and model_seed / data_seed are given."""
    from flannel_repro.config import ENGINES

    overrides = dict(overrides or {})
    changes: dict[str, Any] = {**(marker or {}), **overrides, "device": device}
    if train_seed is not None:
        if "model_seed" in overrides or "data_seed" in overrides:
            raise TypeError("give train_seed or model_seed/data_seed, not both.")
        changes.update(model_seed=train_seed, data_seed=train_seed)
    engine = changes.get("engine")
    if engine is not None and engine not in ENGINES:  # your registered engine (training.engines)
        from flannel_repro.training.engines import get_engine

        changes.pop("engine")
        return get_engine(engine).config(numerics=template.numerics, **changes)
    return template.replace(**changes)


# --- the plan of a session, from its collected items ------------------------------------------------------------


def sorted_plan(requests: Iterable[RunRequest]) -> list[RunRequest]:
    """`requests` without repeats (one per run key's config, repeat and resume_at), in `sort_key` order."""
    unique: dict[tuple[str, int, int], RunRequest] = {}
    for request in requests:
        unique.setdefault(request.sort_key(), request)
    return [unique[k] for k in sorted(unique)]


def request_label(request: RunRequest) -> str:
    """A readable, unique name of a request, known without computing its run key (no data is loaded):
    `seed42-cpu-torch-r0-<12 hex of the config fingerprint>`, `-resume3` for a resumed run."""
    c = request.config
    seeds = f"seed{c.model_seed}" if c.train_seed is not None else f"m{c.model_seed}-d{c.data_seed}"
    resumed = "" if request.resume_at is None else f"-resume{request.resume_at}"
    return f"{seeds}-{c.device.replace(':', '')}-{c.engine}-r{request.repeat}{resumed}-{c.fingerprint()[:12]}"


def shard(plan: Sequence[RunRequest], k: int, n: int) -> list[RunRequest]:
    """Shard `k` of `n` (1-based) of a sorted plan, round-robin: the shards' sizes differ by at most one."""
    if not 1 <= k <= n:
        raise ConfigError(f"shard: expected K/N with 1 <= K <= N, got {k}/{n}.")
    return list(plan[k - 1 :: n])
