"""The runs a session needs, known before any claim runs: one `RunRequest` per (config, repeat, resume_at).

A plan is what the local scheduler, CI shards and a distributed engine all work from: each trains requests
into the store, and the claims then read them from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

from flannel_repro.config import EngineRunConfig, RunConfig, run_config_from_dict
from flannel_repro.errors import ConfigError

if TYPE_CHECKING:
    import pytest

    from flannel_repro.plugin.session import FlannelSession


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


def item_request(
    item: "pytest.Item", session: "FlannelSession", *, device: str | None = None, **call: Any
) -> RunRequest:
    """The run `trajectory(**call)` asks for in `item`: on `device`, else the item's `device` parameter, else
    the session's first device; with the item's @pytest.mark.flannel overrides. `repeat` and `resume_at` are
    taken from `call` as the fixture takes them."""
    from flannel_repro.plugin.session import marker_overrides

    repeat = int(call.pop("repeat", 0))
    resume_at = call.pop("resume_at", None)
    train_seed = call.pop("train_seed", None)
    dev = device or item_device(item) or session.devices[0]
    config = run_config(
        session.run_template, device=dev, train_seed=train_seed, marker=marker_overrides(item), overrides=call
    )
    return RunRequest(config, repeat, resume_at)


def item_device(item: "pytest.Item") -> str | None:
    """The item's `device` parameter (None when it has none)."""
    callspec = getattr(item, "callspec", None)
    return callspec.params.get("device") if callspec is not None and "device" in callspec.params else None


def automatic_requests(items: Sequence["pytest.Item"], session: "FlannelSession") -> list[RunRequest]:
    """What the plugin knows without asking the suite: each item that uses `trajectory` and is parametrized by
    the plugin's `train_seed` asks for that seed's run on its device, at repeat 0. Items on an absent device
    ask for nothing (they skip)."""
    from flannel_repro.devices import device_present

    out = []
    for item in items:
        if "trajectory" not in getattr(item, "fixturenames", ()) or not _plugin_param(item, "train_seed"):
            continue
        request = item_request(item, session, train_seed=int(item.callspec.params["train_seed"]))  # type: ignore[attr-defined]
        if device_present(request.config.device)[0]:
            out.append(request)
    return out


def _plugin_param(item: "pytest.Item", name: str) -> bool:
    """Whether `item` is parametrized by `name` and that fixture is the plugin's (not the suite's own)."""
    callspec = getattr(item, "callspec", None)
    if callspec is None or name not in callspec.params:
        return False
    info = getattr(item, "_fixtureinfo", None)
    defs: Sequence[Any] = getattr(info, "name2fixturedefs", {}).get(name) or ()
    return bool(defs) and getattr(defs[-1].func, "__module__", None) == "flannel_repro.plugin.hooks"


def session_plan(
    config: "pytest.Config", items: Sequence["pytest.Item"], session: "FlannelSession"
) -> list[RunRequest]:
    """The sorted, de-duplicated runs the session's claims will ask for: the automatic ones
    (`automatic_requests`) and what the suites declare through the `pytest_flannel_plan` hook (every
    implementation's lists, concatenated). Requests on an absent device are dropped (their claims skip)."""
    from flannel_repro.devices import device_present

    declared = config.hook.pytest_flannel_plan(config=config, items=list(items), flannel_session=session)
    requests = [*automatic_requests(items, session), *(r for result in declared for r in result or ())]
    for r in requests:
        if not isinstance(r, RunRequest):
            raise ConfigError(f"pytest_flannel_plan: expected a list of RunRequest, got an item {r!r}.")
    return sorted_plan(r for r in requests if device_present(r.config.device)[0])


def shard(plan: Sequence[RunRequest], k: int, n: int) -> list[RunRequest]:
    """Shard `k` of `n` (1-based) of a sorted plan, round-robin: the shards' sizes differ by at most one."""
    if not 1 <= k <= n:
        raise ConfigError(f"shard: expected K/N with 1 <= K <= N, got {k}/{n}.")
    return list(plan[k - 1 :: n])
