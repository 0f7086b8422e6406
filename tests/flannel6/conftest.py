"""Fixtures of the Flannel 6 suite: the divergence bounds derived for this repository's data, or derived in the
session (and cached beside the runs) for any other config and data."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from flannel_repro.analysis.bounds import (
    HELD_OUT,
    Bound,
    bound_configs,
    data_hashes,
    load_bounds,
    measure_bound,
    scale_key,
    seed_list,
    to_toml,
)
from flannel_repro.errors import ConfigError
from flannel_repro.plugin.session import SESSION_KEY, FlannelSession
from flannel_repro.plugin.plan import item_request
from flannel_repro.runs.plan import RunRequest

BOUNDS = Path(__file__).with_name("bounds.toml")
BOUND_PROPERTY = "flannel_bound"  # how the bound a claim used travels to the terminal summary (through xdist too)
_DERIVED: dict[tuple, tuple[Bound, str]] = {}  # bounds derived or loaded in this process, by (key, held-out seeds)
_SEEN: dict[str, dict[str, Any]] = {}  # controller: the bounds the claims used, for the terminal summary


def session_bound_path(artifacts_dir: Path, key: str) -> Path:
    """Where an in-session bound is cached: beside the runs it was measured on, one file per scale key."""
    return Path(artifacts_dir) / "bounds" / f"{key}.toml"


def _cached(path: Path, key: str, held_out: str, session_id: str, reuse_earlier: bool) -> tuple[Bound, str] | None:
    import tomllib

    try:
        table = tomllib.loads(path.read_text(encoding="utf-8")).get("session", {})
    except (FileNotFoundError, tomllib.TOMLDecodeError):
        return None
    made_in = str(table.get("session_id", ""))
    if not reuse_earlier and made_in != session_id:
        return None
    bound = load_bounds(path).get(key)
    if bound is None or bound.held_out != held_out:
        return None  # derived from other held-out seeds (or another base): derive again
    return bound, "derived in this session" if made_in == session_id else "derived in an earlier session"


def held_out_seeds(state: FlannelSession, seeds: tuple[int, ...]) -> tuple[int, ...]:
    """The held-out seeds of an in-session bound: --flannel-derive-bounds's ('none': ()), else the HELD_OUT seeds
    after the claim seeds."""
    held = state.derive_bounds
    return held if held is not None else tuple(range(max(seeds) + 1, max(seeds) + 1 + HELD_OUT))


def held_out_label(base: int, held: tuple[int, ...]) -> str:
    return f"seed {base} vs {seed_list([s for s in held if s != base])}"


@pytest.fixture
def derived_bound(flannel_config, trajectory, request):
    """A function returning the bound for this session's config and data, with its limits for this session's
    number of claim seeds: the committed one (bounds.toml), else one derived in the session from held-out
    seeds (by default the HELD_OUT seeds after the claim seeds; --flannel-derive-bounds=SEEDS for others) and
    cached under the artifacts folder (bounds/<scale key>.toml), reused by later sessions on the same config,
    data and seeds. With --flannel-derive-bounds=none it skips the calling test instead, so call it after the
    test has measured and recorded what it can."""

    def get() -> Bound:
        state = request.config.stash[SESSION_KEY]
        seeds = flannel_config.train_seeds
        k = len(seeds)  # each claim compares every claim seed once per session
        hashes = data_hashes(flannel_config.run)
        key = scale_key(flannel_config.run, hashes)
        committed = load_bounds(BOUNDS).get(key)
        if committed is not None:
            bound, source, path = committed, "committed", BOUNDS
        else:
            held = held_out_seeds(state, seeds)
            if held == ():
                pytest.skip(
                    f"no divergence bound derived for this configuration on this data (scale {key}: config and "
                    "the tokenizer's and corpus's hashes), and --flannel-derive-bounds=none: the measurement "
                    f"was recorded. Drop that option to derive one in the session from {HELD_OUT} held-out "
                    f"seeds, or add one to {BOUNDS} (flannel-repro bounds)"
                )
            overlap = sorted(set(held) & set(seeds))
            if overlap:
                pytest.fail(
                    f"--flannel-derive-bounds: seeds {overlap} are claim seeds; a bound must be derived from "
                    f"seeds the claims do not compare (e.g. {max(seeds) + 1}-{max(seeds) + HELD_OUT})"
                )
            base = seeds[0]
            held_out = held_out_label(base, held)
            path = session_bound_path(state.artifacts_dir, key)
            memo = (key, held_out)
            if memo not in _DERIVED:
                from filelock import FileLock

                path.parent.mkdir(parents=True, exist_ok=True)
                with FileLock(str(path) + ".lock"):  # one xdist worker derives, the others read its result
                    got = _cached(path, key, held_out, state.session_id, state.reuse_earlier)
                    if got is None:
                        bound = measure_bound(
                            flannel_config.run,
                            base,
                            held,
                            lambda cfg: trajectory(model_seed=cfg.model_seed, data_seed=cfg.data_seed),
                            comparisons=k,
                        )
                        tmp = path.with_suffix(f".{os.getpid()}.tmp")
                        tmp.write_text(
                            "# derived in a flannel-repro session (tests/flannel6/conftest.py)\n"
                            + to_toml("session", bound)
                            + f'session_id = "{state.session_id}"\n',
                            encoding="utf-8",
                        )
                        tmp.replace(path)
                        got = bound, "derived in this session"
                _DERIVED[memo] = got
            bound, source = _DERIVED[memo]
        bound = bound.for_session(k)
        request.node.user_properties.append(
            (
                BOUND_PROPERTY,
                json.dumps(
                    {
                        "scale": key,
                        "source": source,
                        "path": str(path),
                        "describe": bound.describe(),
                        "max_frobenius": bound.max_frobenius,
                        "band": [bound.order_share_min, bound.order_share_max],
                    }
                ),
            )
        )
        return bound

    return get


@pytest.hookimpl(tryfirst=True)  # before the plugin drops its transport properties from JUnit XML
def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    for name, value in report.user_properties:
        if name == BOUND_PROPERTY and report.when == "call":
            seen = json.loads(value)
            _SEEN.setdefault(seen["scale"], seen)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _SEEN:
        return
    tr = terminalreporter
    tr.write_sep("-", "flannel6 divergence bounds")
    for seen in _SEEN.values():
        where = "bounds.toml" if seen["source"] == "committed" else f"cached at {seen['path']}"
        lo, hi = seen["band"]
        tr.write_line(
            f"scale {seen['scale']}: {seen['source']} ({where}); final ‖ΔW‖_F <= "
            f"{seen['max_frobenius']:.4g}, data-order share in [{lo:.3g}, {hi:.3g}]"
        )
        tr.write_line(f"  {seen['describe']}")


# --- the plan: the runs these claims ask for beyond each seed's own run (flannel_repro.plugin.hookspecs) ----------


def _partner(seed: int, seeds: tuple[int, ...]) -> int | None:
    """test_determinism.partner_seed's choice (None where that test skips: fewer than two seeds)."""
    return None if len(seeds) < 2 else seeds[0] if seed != seeds[0] else seeds[1]


def _claim_runs(item: pytest.Item, state: FlannelSession) -> list[RunRequest]:
    """The runs `item`'s own trajectory(...) calls ask for, as test_determinism.py makes them."""
    seeds = state.experiment.train_seeds
    name = getattr(item, "originalname", item.name)
    callspec = getattr(item, "callspec", None)
    params = callspec.params if callspec is not None else {}
    seed = params.get("train_seed", seeds[0])
    other = _partner(seed, seeds)

    def run(**call: Any) -> RunRequest:
        return item_request(item, state, **call)

    if name == "test_every_run_starts_from_the_shared_W":
        return [run(train_seed=seed)]
    if name == "test_same_seed_trained_twice_is_bitwise_identical":
        return [run(train_seed=seed), run(train_seed=seed, repeat=1)]
    if other is None:
        return []  # the comparing claims skip
    if name in ("test_different_seeds_part_at_step_1", "test_final_divergence_within_derived_bound"):
        return [run(train_seed=other), run(train_seed=seed)]
    if name == "test_data_order_share_within_derived_band":
        return [run(train_seed=other), run(model_seed=other, data_seed=seed), run(train_seed=seed)]
    if name == "test_divergence_by_source":
        base, other = seeds[0], _partner(seeds[0], seeds)
        runs = [
            run(train_seed=base),
            run(model_seed=base, data_seed=other),
            run(model_seed=other, data_seed=base),
            run(train_seed=base, threads=2),
            run(train_seed=base, repeat=1),
        ]
        return runs + ([run(train_seed=base, engine="hf")] if params.get("device") == "cpu" else [])
    return []


def _bound_runs(item: pytest.Item, state: FlannelSession) -> list[RunRequest]:
    """The held-out runs `derived_bound` trains through `item` (measure_bound's runs, from bound_configs): none
    where a bound is committed for the scale, cached from an earlier session it may reuse, or not to be
    derived (--flannel-derive-bounds=none, or held-out seeds the claims fail on)."""
    seeds = state.experiment.train_seeds
    run = state.run_template
    key = scale_key(run, data_hashes(run))
    held = held_out_seeds(state, seeds)
    if load_bounds(BOUNDS).get(key) is not None or not held or set(held) & set(seeds):
        return []
    label = held_out_label(seeds[0], held)
    # the gate (--flannel-no-train) plans as the shard jobs did, before the bound was cached: its shard hints hold
    cached = _cached(session_bound_path(state.artifacts_dir, key), key, label, state.session_id, state.reuse_earlier)
    if cached is not None and not state.no_train:
        return []
    try:
        ref, pairs = bound_configs(run, seeds[0], held)
    except ConfigError:
        return []  # too few held-out seeds: the claim reports it
    configs = [ref, *(c for _, both, order in pairs for c in (both, order))]
    # as derived_bound's obtain does: trajectory(model_seed=..., data_seed=...) in the calling test
    return [item_request(item, state, model_seed=c.model_seed, data_seed=c.data_seed) for c in configs]


_USES_BOUND = ("test_final_divergence_within_derived_bound", "test_data_order_share_within_derived_band")


def pytest_flannel_plan(config: pytest.Config, items: list[pytest.Item], flannel_session: FlannelSession):
    """The runs of this directory's claims, and the held-out runs of an in-session bound: derived once per process,
    through the first claim that asks for it (its device), so they are planned through the first such item."""
    mine = [item for item in items if Path(item.path).parent == BOUNDS.parent]
    out = [r for item in mine for r in _claim_runs(item, flannel_session)]
    bounded = [i for i in mine if getattr(i, "originalname", "") in _USES_BOUND]
    seeds = flannel_session.experiment.train_seeds
    if bounded and len(seeds) >= 2:
        out += _bound_runs(bounded[0], flannel_session)
    return out
