"""The plan of a pytest session: the runs its collected items will ask for (`session_plan`), from the items the
plugin parametrizes itself and from what suites declare through the `pytest_flannel_plan` hook.

The run-level pieces (`RunRequest`, `run_config`, `sorted_plan`, `shard`) live in `runs.plan`, below the plugin;
this module is the part that reads pytest items. Importing it imports neither torch nor transformers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from flannel_repro.errors import ConfigError
from flannel_repro.runs.plan import RunRequest, run_config, sorted_plan

if TYPE_CHECKING:
    import pytest

    from flannel_repro.plugin.session import FlannelSession


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
