"""The pytest plugin's hooks and fixtures (the `pytest11` entry point): each hands off to the session
(`plugin.session`), the reporter (`plugin.report`) or the snapshot extension (`plugin.snapshot`).

Registered through the entry point, so it is active after `pip install`, and inert in a suite that
does not use it: it parametrizes only tests whose `device` / `train_seed` are its own fixtures, and
changes the environment only in sessions that train runs. Importing this module imports neither torch
nor transformers: `pytest --help` stays fast.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any, Generator, Iterator, Sequence

import pytest

from flannel_repro.config import ENGINES, EngineRunConfig, ExperimentConfig, RunConfig
from flannel_repro.devices import device_present
from flannel_repro.errors import ConfigError
from flannel_repro.plugin.report import ControllerReporter
from flannel_repro.runs.plan import RunRequest, run_config
from flannel_repro.plugin.session import (
    MARKER,
    SESSION_KEY,
    SNAPSHOT_SUFFIX,
    FlannelSession,
    RunRecord,
    add_options,
    build_session,
    marker_overrides,
    marker_tolerance,
)

pytest.register_assert_rewrite("flannel_repro.analysis.assertions")

if TYPE_CHECKING:
    from flannel_repro.analysis.trajectory import Trajectory


def pytest_addoption(parser: pytest.Parser, pluginmanager: pytest.PytestPluginManager) -> None:
    from flannel_repro.plugin import hookspecs

    pluginmanager.add_hookspecs(hookspecs)  # pytest_flannel_plan, for suites' conftest.py files
    add_options(parser)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}(**overrides): override RunConfig fields (steps=, lr=, engine=, ...) for the trajectories of one test; "
        "rtol= / atol= set the float tolerance of its flannel_snapshot comparisons.",
    )
    session = build_session(config)
    config.stash[SESSION_KEY] = session
    # Portable numerics must be in the environment before oneDNN and MKL start (they read it once): set
    # here, before any test runs; xdist workers inherit it. Whether it took effect is checked when a
    # run trains (numerics.check), which refuses rather than train with other arithmetic.
    from flannel_repro.errors import NumericsError
    from flannel_repro.training.numerics import arrange

    try:
        arrange(session.run_template.numerics)
    except NumericsError as exc:
        raise pytest.UsageError(f"--flannel-numerics: {exc}") from None
    if config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(_XdistHooks(), "flannel-xdist")
    if not hasattr(config, "workerinput"):
        # what killed sessions left (partial artifacts, progress files) goes before anything trains
        from flannel_repro.runs.store import clean_leftovers

        session.leftovers_removed = [p.name for p in clean_leftovers(session.artifacts_dir)]
        config.pluginmanager.register(ControllerReporter(config), "flannel-reporter")
    _hide_summary_snapshots_from_other_extensions(config)


def _hide_summary_snapshots_from_other_extensions(config: pytest.Config) -> None:
    """Add the `.flannel` suffix to syrupy's --snapshot-ignore-file-extensions.

    syrupy's default (amber) discovery walks `__snapshots__` recursively and counts every file no
    test used as unused; summaries of a device class this session does not run (a cuda snapshot on
    a CPU-only machine) would be reported, and deleted by --snapshot-update. Our extension discovers
    its own files, filtered by device class (flannel_repro.plugin.snapshot)."""
    if not hasattr(config.option, "ignore_file_extensions"):
        return  # syrupy not loaded
    current = list(config.option.ignore_file_extensions or [])
    if SNAPSHOT_SUFFIX not in current:
        config.option.ignore_file_extensions = [*current, SNAPSHOT_SUFFIX]


class _XdistHooks:
    """Registered only when pytest-xdist is loaded (its hooks do not exist otherwise)."""

    @pytest.hookimpl
    def pytest_configure_node(self, node: Any) -> None:
        # All workers share the controller's session id: "fresh" means fresh for this session.
        node.workerinput["flannel_session"] = node.config.stash[SESSION_KEY].session_id

    @pytest.hookimpl
    def pytest_testnodedown(self, node: Any, error: Any) -> None:
        session = node.config.stash[SESSION_KEY]
        for row in json.loads(getattr(node, "workeroutput", {}).get("flannel_runs", "[]")):
            rec = RunRecord(**row)
            known = session.runs.get(rec.name)
            # the worker that trained a run (or downloaded it from the store) tells its story, not one that reused it
            if known is None or (rec.trained_here, rec.fetched) > (known.trained_here, known.fetched):
                session.runs[rec.name] = rec


def pytest_sessionfinish(session: pytest.Session) -> None:
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        state = session.config.stash[SESSION_KEY]
        workeroutput["flannel_runs"] = json.dumps([r.to_json() for r in state.runs.values()])


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    state = config.stash[SESSION_KEY]
    if any("trajectory" in getattr(item, "fixturenames", ()) for item in items):
        # cuBLAS reads its workspace setting once, when CUDA starts; deterministic CUDA runs need it
        # fixed. Set after collection, before any test runs (in each xdist worker, which collects
        # too), and only in sessions that train runs: a suite that does not use the plugin keeps its
        # environment. A value already set wins. Every artifact records it (environment fingerprint).
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    for item in items:
        if "trajectory" in getattr(item, "fixturenames", ()):
            item.user_properties.append(("flannel_uses_trajectory", "1"))  # travels with every report
        marker_tolerance(item)
        overrides = marker_overrides(item)
        if overrides:
            try:
                engine = overrides.get("engine")
                if engine is not None and engine not in ENGINES:  # a registered engine: its own config
                    from flannel_repro.training.engines import get_engine

                    get_engine(engine).config(**{k: v for k, v in overrides.items() if k != "engine"})
                else:
                    state.run_template.replace(**overrides)
            except ConfigError as exc:
                raise pytest.UsageError(f"{item.nodeid}: @pytest.mark.{MARKER}: {exc}") from None


def _resolves_to_ours(metafunc: pytest.Metafunc, name: str) -> bool:
    """Whether fixture `name` is, for this test, the one this plugin defines. A suite's own `device` or
    `train_seed` (any conftest or module fixture wins over a plugin's) is never parametrized by us."""
    if name not in metafunc.fixturenames:
        return False
    defs = getattr(metafunc, "_arg2fixturedefs", None)  # pytest's own resolution (stable since pytest 3)
    if not isinstance(defs, dict):
        return "trajectory" in metafunc.fixturenames  # unknown internals: only tests that train runs
    chain: Sequence[Any] = defs.get(name) or ()
    return bool(chain) and getattr(chain[-1].func, "__module__", None) == __name__


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    state = metafunc.config.stash[SESSION_KEY]
    if _resolves_to_ours(metafunc, "device") and not _already_parametrized(metafunc, "device"):
        devices = state.selected_devices()
        metafunc.parametrize("device", devices, indirect=True, ids=devices)
    if _resolves_to_ours(metafunc, "train_seed") and not _already_parametrized(metafunc, "train_seed"):
        seeds = list(state.experiment.train_seeds)
        metafunc.parametrize("train_seed", seeds, indirect=True, ids=[f"seed{s}" for s in seeds])


def _already_parametrized(metafunc: pytest.Metafunc, name: str) -> bool:
    """True when the test parametrizes `name` itself (its own values win over the session's)."""
    for mark in metafunc.definition.iter_markers("parametrize"):
        argnames = mark.args[0] if mark.args else mark.kwargs.get("argnames", ())
        if isinstance(argnames, str):
            argnames = [a.strip() for a in argnames.split(",")]
        if name in argnames:
            return True
    return False


# --- fixtures ------------------------------------------------------------------------------------------------


def _state(request: pytest.FixtureRequest) -> FlannelSession:
    return request.config.stash[SESSION_KEY]


@pytest.fixture(scope="session")
def flannel_config(request: pytest.FixtureRequest) -> ExperimentConfig:
    """The session's experiment config (ExperimentConfig): the template RunConfig in `.run`,
    `.train_seeds`, `.devices`; built from --flannel-* options, ini keys and --flannel-config."""
    return _state(request).experiment


@pytest.fixture(scope="session")
def _flannel_data(request: pytest.FixtureRequest):  # noqa: ANN202
    from flannel_repro.data.corpus import load_data

    return load_data(_state(request).run_template)


@pytest.fixture(scope="session")
def tokenizer(request: pytest.FixtureRequest):  # noqa: ANN201
    """The `tokenizers.Tokenizer` of the session's data (embedded default, or --flannel-tokenizer)."""
    from flannel_repro.data.corpus import data_files
    from flannel_repro.data.files import load_tokenizer

    cfg = _state(request).run_template
    return load_tokenizer(data_files(cfg).tokenizer, cfg.vocab_size)


@pytest.fixture(scope="session")
def corpus(_flannel_data):  # noqa: ANN001, ANN201
    """The tokenised corpus (`CorpusData`: `.ids` int64 tensor, `.mask`, `.hashes`, `.n_tokens`)."""
    return _flannel_data


@pytest.fixture(scope="session")
def token_mask(_flannel_data):  # noqa: ANN001, ANN201
    """The live/dead token mask (`TokenMask`: live_mask, dead_mask, dead_indices, n_live, n_dead)."""
    return _flannel_data.mask


@pytest.fixture(scope="session")
def shared_init_W(request: pytest.FixtureRequest):  # noqa: ANN201
    """W_initial (V, H) from `init_seed`, on CPU in the run dtype: identical on every worker and device."""
    from flannel_repro.training.model import shared_init_W as make

    return make(_state(request).run_template)


@pytest.fixture(scope="session")
def train_seed(request: pytest.FixtureRequest) -> int:
    """Parametrized over the session's training seeds (--flannel-seeds / --flannel-runs)."""
    return int(getattr(request, "param", _state(request).experiment.base_train_seed))


@pytest.fixture(scope="session")
def device(request: pytest.FixtureRequest) -> str:
    """Parametrized over the selected devices: cpu always, cuda and mps where present. A device
    asked for with --flannel-devices that is absent is a skip with the reason."""
    state = _state(request)
    name = getattr(request, "param", state.devices[0])
    present, why = device_present(name)
    if not present:
        if state.devices_explicit:
            pytest.skip(f"device {name!r} requested but absent: {why}")
        pytest.skip(f"{name} not present on this machine: {why}")
    return name


@pytest.fixture
def trajectory(request: pytest.FixtureRequest):  # noqa: ANN201
    """Factory: `trajectory(train_seed=None, *, device=None, repeat=0, resume_at=None, **overrides) -> Trajectory`.

    Trains the run (or reads it from the artifacts directory when an identical run was already made
    by this or another xdist worker) and returns a lazy, memory-mapped Trajectory. `train_seed` sets
    model_seed and data_seed together (the notebook's seed); pass model_seed= / data_seed= to set
    them apart. `repeat` > 0 trains the same run again, separately: use it to test repeatability.
    `device` defaults to the test's `device` parameter, else the first selected device. Other
    keyword arguments override RunConfig fields, after any @pytest.mark.flannel(...) overrides.
    """
    state = _state(request)
    marker = marker_overrides(request.node)
    callspec = getattr(request.node, "callspec", None)
    default_device = callspec.params.get("device") if callspec is not None and "device" in callspec.params else None

    def make(
        train_seed: int | None = None,
        *,
        device: str | None = None,
        repeat: int = 0,
        resume_at: int | None = None,
        **overrides: Any,
    ) -> "Trajectory":
        __tracebackhide__ = True
        dev = device or default_device or state.devices[0]
        present, why = device_present(dev)
        if not present:
            pytest.skip(f"device {dev!r} requested but absent: {why}")
        try:  # the same config the plan makes for this call (runs.plan.run_config): the same run key
            cfg = run_config(state.run_template, device=dev, train_seed=train_seed, marker=marker, overrides=overrides)
        except ConfigError as exc:
            raise pytest.UsageError(f"{request.node.nodeid}: trajectory(...): {exc}") from None
        return obtain(request.config, cfg, repeat=repeat, resume_at=resume_at)

    return make


@pytest.fixture
def flannel_snapshot(request: pytest.FixtureRequest):  # noqa: ANN201
    """syrupy snapshot of run summaries: `assert flannel_snapshot == trajectory(42).summary()`.

    One reviewable text file per test and device class (`__snapshots__/<file>/<test>[cpu].flannel`).
    Floats compare within rtol/atol (@pytest.mark.flannel(rtol=, atol=) > --flannel-rtol/--flannel-atol
    > ini flannel_rtol/flannel_atol; default exact); digests, ints and strings exactly. A mismatch
    lists the moved fields and the step where the digest chains part. Accept changes with
    `pytest --snapshot-update`.
    """
    from flannel_repro.plugin.snapshot import snapshot_assertion
    from flannel_repro.analysis.compare import Tolerance

    tolerance = {**_state(request).tolerance, **marker_tolerance(request.node)}
    return snapshot_assertion(request, Tolerance(**tolerance))


# --- claims and the terminal summary (controller only) ------------------------------------------------------


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    """Collect what the assertion helpers measured, as user_properties (they travel through xdist)."""
    if "trajectory" not in getattr(item, "fixturenames", ()):
        return (yield)
    from flannel_repro.analysis.assertions import observe, pair_class

    def record(claim: str, a: Any, b: Any, stats: dict[str, Any]) -> None:
        keep = {k: v for k, v in stats.items() if isinstance(v, (int, float, str, bool, type(None)))}
        item.user_properties.append(
            (
                "flannel_claim",
                json.dumps({"claim": claim, "pair_class": pair_class(a, b), "a": a.label, "b": b.label, **keep}),
            )
        )

    with observe(record):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A failing claim names the report plot that shows it (a section of the failure's output)."""
    report = yield
    if report.failed and report.when == "call" and "trajectory" in getattr(item, "fixturenames", ()):
        from flannel_repro.report.names import plots_for

        props: list[tuple[str, Any]] = item.user_properties  # ours hold JSON text
        claims = [json.loads(v) for k, v in props if k == "flannel_claim"]
        plots = plots_for(claims, sources=any(k == "flannel_sources" for k, _ in item.user_properties))
        if plots:
            folder = item.config.stash[SESSION_KEY].report_dir
            where = (
                f"in {folder}"
                if folder is not None
                else "in the report: rerun with --flannel-report=DIR, or run flannel-repro report on the artifacts"
            )
            report.sections.append(("flannel-repro plot", f"the plot that shows it: {', '.join(plots)} {where}"))
    return report


@pytest.fixture
def flannel_record(request: pytest.FixtureRequest):  # noqa: ANN201
    """`flannel_record(name, number)`: a figure this test measured, summarised (n, min, max) in the terminal
    summary, the JSON report and JUnit XML's testsuite properties. Unlike `record_property`, it adds nothing
    to the test's own XML entry, so pytest's default xunit2 family warns about nothing."""

    def record(name: str, value: float) -> None:
        if not isinstance(name, str) or not name:
            raise TypeError(f"flannel_record: expected a non-empty name, got {name!r}.")
        number = float(value)
        request.node.user_properties.append(("flannel_metric", json.dumps([name, number])))

    return record


def obtain(
    config: pytest.Config, cfg: RunConfig | EngineRunConfig, *, repeat: int = 0, resume_at: int | None = None
) -> "Trajectory":
    """Get a run through the session's store, showing progress while it trains; its row of the terminal summary
    is recorded by plugin.schedule.obtain_run. Under --flannel-no-train a run missing from the store fails the
    test, naming the run and the shard job that should have trained it."""
    from flannel_repro.errors import RunMissing
    from flannel_repro.plugin.schedule import missing_message, obtain_run

    missing = ""
    try:
        got = obtain_run(config, cfg, repeat=repeat, resume_at=resume_at)
    except ConfigError as exc:
        raise pytest.UsageError(f"trajectory(...): {exc}") from None
    except RunMissing as exc:
        state = config.stash[SESSION_KEY]
        missing = missing_message(state, state.plan, RunRequest(cfg, repeat, resume_at), str(exc))
    if missing:
        pytest.fail(missing, pytrace=False)
    assert got is not None  # obtain_run waits for the run's lock, so it always obtains
    return got.trajectory


# --- the plan: trained before the claims (--flannel-schedule=plan), in shards, or named by the gate job ----------


@pytest.hookimpl(wrapper=True)
def pytest_runtestloop(session: pytest.Session) -> Generator[None, object, object]:
    """--flannel-schedule=plan: in each process that runs tests, before the first one, train the planned runs no
    other process is training (plugin.schedule.train_plan); the claims then read them from the store."""
    state = session.config.stash[SESSION_KEY]
    items = getattr(session, "items", [])
    wanted = state.schedule == "plan" and not (state.train_only or state.no_train)
    if wanted and items and not session.config.option.collectonly:
        from flannel_repro.plugin.schedule import plan_of, train_plan

        train_plan(session.config, plan_of(session.config, items))
    return (yield)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Under --collect-only, make the session's plan and announce it (`pytest_flannel_planned`): how
    `flannel-repro train` learns the runs a suite's claims need."""
    config = session.config
    items = getattr(session, "items", [])
    if config.option.collectonly and any("trajectory" in getattr(i, "fixturenames", ()) for i in items):
        from flannel_repro.plugin.schedule import plan_of

        config.hook.pytest_flannel_planned(
            config=config, plan=plan_of(config, items), flannel_session=_state_of(config)
        )


def _state_of(config: pytest.Config) -> FlannelSession:
    return config.stash[SESSION_KEY]


# after -k / -m deselection and the marker checks above: the plan is of the items that would run
@pytest.hookimpl(trylast=True, specname="pytest_collection_modifyitems")
def pytest_collection_modifyitems_plan(
    session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
) -> None:
    """--flannel-train-only / --flannel-shard=K/N: the claims are replaced by one item per run to train;
    --flannel-no-train: the plan is computed, so that a missing run's failure names its shard job."""
    state = config.stash[SESSION_KEY]
    if not (state.train_only or state.no_train):
        return
    from flannel_repro.plugin.schedule import plan_of, run_items

    plan = plan_of(config, items)
    if state.train_only:
        claims = list(items)
        items[:] = run_items(session, plan, state)
        config.hook.pytest_deselected(items=claims)  # the summary says the claims did not run
