"""The plugin's own hook, for suites to implement in a conftest.py: `pytest_flannel_plan`, the runs their
claims will ask for beyond those the plugin knows of itself (registered in `hooks.pytest_addoption`).

Importing this module imports neither torch nor transformers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from flannel_repro.plugin.session import FlannelSession
    from flannel_repro.runs.plan import RunRequest


@pytest.hookspec
def pytest_flannel_plan(
    config: pytest.Config, items: list[pytest.Item], flannel_session: "FlannelSession"
) -> "list[RunRequest]":
    """The runs the collected `items` will ask for through `trajectory(...)` that the plugin cannot know of:
    the plugin itself plans, for each item parametrized by its `train_seed`, that seed's run on the item's
    device at repeat 0. Return a list of `flannel_repro.runs.plan.RunRequest` (build them with
    `flannel_repro.plugin.plan.item_request(item, flannel_session, ...)`, which makes the config as the fixture
    does); the lists of every implementation are concatenated, then de-duplicated and sorted.

    The plan is what the local scheduler trains before the claims run (--flannel-schedule=plan) and what
    --flannel-shard / --flannel-train-only train; a run it misses is still trained when a claim asks for it,
    except under --flannel-no-train, where that claim fails naming the run."""
    raise NotImplementedError  # a specification: pytest calls the implementations, never this


@pytest.hookspec
def pytest_flannel_planned(config: pytest.Config, plan: "list[RunRequest]", flannel_session: "FlannelSession") -> None:
    """Called once a `--collect-only` session has made its plan: how a tool that collects a suite learns the runs
    its claims need and the session's settings (`flannel-repro train` does), without importing the plugin."""
