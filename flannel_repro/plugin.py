"""pytest plugin: options, fixtures, train-once run sharing across xdist workers, terminal summary.

Registered through the `pytest11` entry point, so it is active after `pip install`. Importing this
module imports neither torch nor transformers: `pytest --help` stays fast. Session state lives in
`config.stash`, never in module globals.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import pytest

from flannel_repro.config import ENGINES, LABEL_MODES, NUMERICS, PRESETS, ExperimentConfig, RunConfig
from flannel_repro.errors import ConfigError

pytest.register_assert_rewrite("flannel_repro.assertions")

if TYPE_CHECKING:
    from flannel_repro.store import RunStore
    from flannel_repro.trajectory import Trajectory

GROUP = "flannel"
MARKER = "flannel"
DEVICE_KINDS = ("cpu", "cuda", "mps")
TOLERANCE_KEYS = ("rtol", "atol")  # @pytest.mark.flannel kwargs for flannel_snapshot, not RunConfig fields
MISSING_CLASS_POLICIES = ("skip", "fail", "tolerant")  # --flannel-missing-class
SNAPSHOT_SUFFIX = "flannel"  # file suffix of flannel_snapshot files (flannel_repro.snapshot)

# option name (after --flannel-) -> (ini key, help, parser of the raw string)
_OPTIONS: dict[str, tuple[str, str]] = {
    "config": ("flannel_config", "TOML experiment config (core config keys; [experiment] table for runs/seeds/devices)."),
    "preset": ("flannel_preset", f"starting point: {', '.join(PRESETS)} (default: ci = the CI scale)."),
    "steps": ("flannel_steps", "optimizer steps per run (overrides the config)."),
    "runs": ("flannel_runs", "number of training seeds (overrides the config)."),
    "seeds": ("flannel_seeds", "training seeds: '42-51' or '42,43,47' (overrides runs and base seed)."),
    "devices": ("flannel_devices", "comma-separated devices to run claims on: cpu, cuda, mps (default: cpu plus any present)."),
    "engine": ("flannel_engine", f"training engine: {' or '.join(ENGINES)} (torch: the lean loop; hf: the transformers "
               "Trainer; bitwise equal on CPU)."),
    "label-mode": ("flannel_label_mode", f"labels: {' or '.join(LABEL_MODES)} (next_token: correct; notebook: the "
                   "notebook's two-ahead labels)."),
    "artifacts": ("flannel_artifacts", "directory of run artifacts shared by workers and sessions (default: .flannel/artifacts)."),
    "threads": ("flannel_threads", "torch threads per process; default: the machine's cores divided among xdist workers."),
    "tokenizer": ("flannel_tokenizer", "your tokenizers JSON file (with --flannel-corpus)."),
    "corpus": ("flannel_corpus", "your UTF-8 corpus (with --flannel-tokenizer)."),
    "token-mask": ("flannel_token_mask", "your live/dead token mask safetensors (default: computed from the corpus)."),
    "progress": ("flannel_progress", "seconds between training progress lines (0 = off; default 10)."),
    "numerics": ("flannel_numerics", f"CPU arithmetic: {' or '.join(NUMERICS)} (native: this CPU's fastest kernels, the "
                 "default; portable: oneDNN pinned to AVX-512 BF16, MKL to strict AVX2, one class on Intel AMX and AMD "
                 "Zen 4 machines)."),
    "missing-class": ("flannel_missing_class", f"when a snapshot exists only for other numerics classes: "
                      f"{', '.join(MISSING_CLASS_POLICIES)} (skip: the default; tolerant: compare with the nearest class "
                      "within its measured noise band)."),
    "noise-bands": ("flannel_noise_bands", "JSON file of noise bands for tolerant comparisons across numerics classes "
                    "(default: flannel_noise_bands.json beside the test file)."),
    "rtol": ("flannel_rtol", "relative tolerance of flannel_snapshot float comparisons (default 0: exact)."),
    "atol": ("flannel_atol", "absolute tolerance of flannel_snapshot float comparisons (default 0: exact)."),
}
_FLAGS: dict[str, tuple[str, str]] = {
    "fresh": ("flannel_fresh", "ignore artifacts from earlier sessions (runs are still shared between this session's workers)."),
}


@dataclass
class RunRecord:
    """One row of the terminal summary."""

    name: str
    seed: str
    device: str
    engine: str
    steps: int
    final_loss: float
    wall_time_s: float
    steps_per_s: float
    threads: int
    path: str
    trained_here: bool
    numerics_class: str = ""

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class FlannelSession:
    """Per-process state, kept in `config.stash`."""

    experiment: ExperimentConfig
    devices: tuple[str, ...]
    devices_explicit: bool
    artifacts_dir: Path
    session_id: str
    reuse_earlier: bool
    threads: int | None
    progress_interval: float
    tolerance: dict[str, float] = field(default_factory=dict)  # rtol / atol from options or ini
    missing_class: str = "skip"  # what flannel_snapshot does when only other numerics classes have a snapshot
    noise_bands: Path | None = None  # --flannel-noise-bands (None: flannel_noise_bands.json beside the test file)
    runs: dict[str, RunRecord] = field(default_factory=dict)
    _store: "RunStore | None" = None
    _threads_set: bool = False

    def selected_devices(self) -> list[str]:
        """Devices to parametrize over: the requested ones (absent ones skip with the reason), or by
        default cpu plus whichever of cuda / mps is present."""
        if self.devices_explicit:
            return list(self.devices)
        return [d for d in self.devices if d == "cpu" or _device_present(d)[0]]

    @property
    def run_template(self) -> RunConfig:
        return self.experiment.run

    def store(self) -> "RunStore":
        if self._store is None:
            from flannel_repro.store import RunStore

            self._store = RunStore(self.artifacts_dir, session=self.session_id, reuse_earlier=self.reuse_earlier)
        return self._store

    def planned_threads(self) -> int:
        """This process's share of the cores: --flannel-threads, else the cores divided among xdist workers."""
        if self.threads is not None:
            return self.threads
        workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
        return max(1, (os.cpu_count() or 1) // max(1, workers))

    def numerics_classes(self) -> frozenset[str]:
        """The numerics classes this process's runs get on the selected, present devices (probes the CPU
        libraries once; they are fixed for the process from their first call)."""
        from flannel_repro.numerics import numerics_info

        threads = self.planned_threads()
        run = self.run_template
        return frozenset(numerics_info(d, threads=run.threads or threads, deterministic=run.deterministic,
                                       mode=run.numerics)["class"]
                         for d in self.selected_devices() if _device_present(d)[0])

    def apply_threads(self) -> int:
        """Give this process its share of the cores (once): torch's default of all cores per xdist
        worker oversubscribes the machine."""
        import torch

        if not self._threads_set:
            wanted = self.planned_threads()
            workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
            torch.set_num_threads(wanted)
            pin_worker(os.environ.get("PYTEST_XDIST_WORKER"), workers, wanted)
            self._threads_set = True
        return torch.get_num_threads()


def pin_worker(worker: str | None, workers: int, threads: int) -> list[int] | None:
    """Pin xdist worker gwN to its own `threads` CPUs, so the workers' threads never share a core
    or migrate between cores. Only where the allowed CPUs suffice for every worker; placement
    changes no arithmetic. FLANNEL_REPRO_PIN=0 turns it off. Returns the CPUs pinned to, or None."""
    if os.environ.get("FLANNEL_REPRO_PIN", "1") == "0" or not worker or not hasattr(os, "sched_setaffinity"):
        return None
    try:
        index = int(worker.removeprefix("gw"))
        allowed = sorted(os.sched_getaffinity(0))
    except (ValueError, OSError):
        return None
    if workers * threads > len(allowed) or index >= workers:
        return None
    cpus = allowed[index * threads:(index + 1) * threads]
    try:
        os.sched_setaffinity(0, cpus)
    except OSError:
        return None
    return cpus


SESSION_KEY = pytest.StashKey[FlannelSession]()


# --- options -----------------------------------------------------------------------------------------

def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup(GROUP, "flannel-repro: training-determinism claims")
    for name, (ini, help_text) in _OPTIONS.items():
        group.addoption(f"--flannel-{name}", dest=ini, default=None, metavar=name.split("-")[0].upper(), help=help_text)
        parser.addini(ini, help_text, type="string", default=None)
    for name, (ini, help_text) in _FLAGS.items():
        group.addoption(f"--flannel-{name}", dest=ini, action="store_true", default=None, help=help_text)
        parser.addini(ini, help_text, type="bool", default=False)


def _get(config: pytest.Config, ini: str) -> Any:
    value = config.getoption(ini)
    if value is None:
        value = config.getini(ini)
    return value if value not in ("", None) else None


def _usage(option: str, accepts: str, got: Any) -> pytest.UsageError:
    return pytest.UsageError(f"--flannel-{option} (ini: flannel_{option.replace('-', '_')}) accepts {accepts}; got {got!r}.")


def _int_option(config: pytest.Config, option: str, minimum: int) -> int | None:
    raw = _get(config, _OPTIONS[option][0])
    if raw is None:
        return None
    try:
        value = int(str(raw).strip())
    except ValueError:
        raise _usage(option, f"an integer >= {minimum}", raw) from None
    if value < minimum:
        raise _usage(option, f"an integer >= {minimum}", raw)
    return value


def parse_seeds(raw: str) -> tuple[int, ...]:
    """'42-51' -> 42..51; '42,43,47' -> those; both forms may be mixed: '42-44,50'."""
    seeds: list[int] = []
    for part in str(raw).split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part.lstrip("-"):
            lo, hi = part.split("-", 1)
            lo_i, hi_i = int(lo), int(hi)
            if hi_i < lo_i:
                raise ValueError(part)
            seeds.extend(range(lo_i, hi_i + 1))
        else:
            seeds.append(int(part))
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ValueError(raw)
    return tuple(seeds)


def build_session(config: pytest.Config) -> FlannelSession:
    """Read options, ini keys and the config file into one validated experiment (CLI > ini > file > preset)."""
    preset = _get(config, "flannel_preset")
    if preset is not None and preset not in PRESETS:
        raise _usage("preset", " or ".join(PRESETS), preset)
    cfg_path = _get(config, "flannel_config")
    try:
        if cfg_path is not None:
            path = Path(cfg_path)
            if not path.is_absolute():
                path = Path(config.rootpath if config.getoption("flannel_config") is None else config.invocation_params.dir) / path
            exp = ExperimentConfig.from_toml(path)
            if preset is not None:
                raise _usage("preset", "no value when --flannel-config is given (put 'preset = ...' in the file)", preset)
        else:
            exp = PRESETS[preset or "ci"]()
    except ConfigError as exc:
        raise pytest.UsageError(f"--flannel-config: {exc}") from None

    run_changes: dict[str, Any] = {}
    steps = _int_option(config, "steps", 1)
    if steps is not None:
        run_changes["steps"] = steps
    for option, key, choices in (("engine", "engine", ENGINES), ("label-mode", "label_mode", LABEL_MODES),
                                 ("numerics", "numerics", NUMERICS)):
        raw = _get(config, _OPTIONS[option][0])
        if raw is not None:
            if raw not in choices:
                raise _usage(option, " or ".join(choices), raw)
            run_changes[key] = raw
    tok, corpus, mask = (_get(config, _OPTIONS[o][0]) for o in ("tokenizer", "corpus", "token-mask"))
    for option, value in (("tokenizer", tok), ("corpus", corpus), ("token-mask", mask)):
        if value is not None and not Path(value).is_file():
            raise _usage(option, "the path of an existing file", value)
    if (tok is None) != (corpus is None):
        raise pytest.UsageError("--flannel-tokenizer and --flannel-corpus go together: give both to use your own data "
                                f"(got tokenizer={tok!r}, corpus={corpus!r}).")
    if tok is not None:
        run_changes.update(tokenizer_path=str(Path(tok).resolve()), corpus_path=str(Path(corpus).resolve()),
                           token_mask_path=str(Path(mask).resolve()) if mask else None)
    elif mask is not None:
        raise pytest.UsageError("--flannel-token-mask needs --flannel-tokenizer and --flannel-corpus.")
    exp_changes: dict[str, Any] = {}
    runs = _int_option(config, "runs", 1)
    seeds_raw = _get(config, "flannel_seeds")
    if seeds_raw is not None:
        try:
            seeds = parse_seeds(seeds_raw)
        except ValueError:
            raise _usage("seeds", "a range '42-51' or a list '42,43,47' of distinct seeds >= 0", seeds_raw) from None
        if seeds != tuple(range(seeds[0], seeds[0] + len(seeds))):
            raise _usage("seeds", "consecutive seeds (the experiment trains base, base+1, ...)", seeds_raw)
        if runs is not None and runs != len(seeds):
            raise pytest.UsageError(f"--flannel-runs={runs} disagrees with --flannel-seeds={seeds_raw!r} ({len(seeds)} seeds).")
        exp_changes.update(base_train_seed=seeds[0], n_runs=len(seeds))
    elif runs is not None:
        exp_changes["n_runs"] = runs
    try:
        exp = exp.replace(run=exp.run.replace(**run_changes), **exp_changes)
    except ConfigError as exc:
        raise pytest.UsageError(f"flannel options: {exc}") from None

    devices_raw = _get(config, "flannel_devices")
    if devices_raw is not None:
        devices = tuple(d.strip() for d in str(devices_raw).split(",") if d.strip())
        for d in devices:
            if d.split(":")[0] not in DEVICE_KINDS:
                raise _usage("devices", "a comma-separated list of cpu, cuda, cuda:N, mps", devices_raw)
        if not devices:
            raise _usage("devices", "a comma-separated list of cpu, cuda, cuda:N, mps", devices_raw)
        explicit = True
    elif cfg_path is not None and exp.devices != ("cpu",):
        devices, explicit = exp.devices, True
    else:
        devices, explicit = ("cpu", "cuda", "mps"), False  # cpu always; the others only where present

    threads = _int_option(config, "threads", 1)
    interval_raw = _get(config, "flannel_progress")
    try:
        interval = 10.0 if interval_raw is None else float(interval_raw)
        if interval < 0:
            raise ValueError
    except ValueError:
        raise _usage("progress", "a number of seconds >= 0", interval_raw) from None
    tolerance: dict[str, float] = {}
    for key in TOLERANCE_KEYS:
        raw = _get(config, f"flannel_{key}")
        if raw is not None:
            value = _tolerance_value(raw)
            if value is None:
                raise _usage(key, "a finite number >= 0", raw)
            tolerance[key] = value
    missing_class = _get(config, "flannel_missing_class") or "skip"
    if missing_class not in MISSING_CLASS_POLICIES:
        raise _usage("missing-class", " or ".join(MISSING_CLASS_POLICIES), missing_class)
    bands_raw = _get(config, "flannel_noise_bands")
    noise_bands = None
    if bands_raw is not None:
        base = config.invocation_params.dir if config.getoption("flannel_noise_bands") else config.rootpath
        noise_bands = Path(bands_raw) if Path(bands_raw).is_absolute() else Path(base) / bands_raw
        if not noise_bands.is_file():
            raise _usage("noise-bands", "the path of an existing noise-bands JSON file (flannel-repro noise -o FILE)",
                         str(noise_bands))
    artifacts_raw = _get(config, "flannel_artifacts")
    artifacts_dir = Path(artifacts_raw) if artifacts_raw else Path(".flannel") / "artifacts"
    if not artifacts_dir.is_absolute():
        base = config.invocation_params.dir if config.getoption("flannel_artifacts") else config.rootpath
        artifacts_dir = Path(base) / artifacts_dir
    if artifacts_dir.exists() and not artifacts_dir.is_dir():
        raise _usage("artifacts", "a directory (it is created if missing)", str(artifacts_dir))
    fresh = bool(config.getoption("flannel_fresh") or config.getini("flannel_fresh"))
    workerinput = getattr(config, "workerinput", None)
    session_id = workerinput.get("flannel_session") if workerinput else None
    return FlannelSession(
        experiment=exp, devices=devices, devices_explicit=explicit, artifacts_dir=artifacts_dir,
        session_id=session_id or uuid.uuid4().hex, reuse_earlier=not fresh, threads=threads,
        progress_interval=interval, tolerance=tolerance, missing_class=missing_class, noise_bands=noise_bands,
    )


def _tolerance_value(raw: Any) -> float | None:
    """A tolerance as a float, or None when it is not a finite number >= 0."""
    if isinstance(raw, bool):
        return None
    try:
        value = float(str(raw).strip()) if isinstance(raw, str) else float(raw)
    except (TypeError, ValueError):
        return None
    return value if value >= 0 and value != float("inf") else None


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
    from flannel_repro.numerics import NumericsError, arrange

    try:
        arrange(session.run_template.numerics)
    except NumericsError as exc:
        raise pytest.UsageError(f"--flannel-numerics: {exc}") from None
    if config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(_XdistHooks(), "flannel-xdist")
    if not hasattr(config, "workerinput"):
        config.pluginmanager.register(_ControllerReporter(config), "flannel-reporter")
    _hide_summary_snapshots_from_other_extensions(config)


def _hide_summary_snapshots_from_other_extensions(config: pytest.Config) -> None:
    """Add the `.flannel` suffix to syrupy's --snapshot-ignore-file-extensions.

    syrupy's default (amber) discovery walks `__snapshots__` recursively and counts every file no
    test used as unused; summaries of a device class this session does not run (a cuda snapshot on
    a CPU-only machine) would be reported, and deleted by --snapshot-update. Our extension discovers
    its own files, filtered by device class (flannel_repro.snapshot)."""
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
            if known is None or (rec.trained_here and not known.trained_here):
                session.runs[rec.name] = rec


def pytest_sessionfinish(session: pytest.Session) -> None:
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        state = session.config.stash[SESSION_KEY]
        workeroutput["flannel_runs"] = json.dumps([r.to_json() for r in state.runs.values()])


# --- marker validation ---------------------------------------------------------------------------------

def _marker_kwargs(item: pytest.Item) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    for mark in reversed(list(item.iter_markers(MARKER))):  # closest marker wins
        if mark.args:
            raise pytest.UsageError(f"{item.nodeid}: @pytest.mark.{MARKER} takes keyword arguments only "
                                    f"(RunConfig fields, rtol=, atol=), got positional {mark.args!r}.")
        kwargs.update(mark.kwargs)
    return kwargs


def _marker_overrides(item: pytest.Item) -> dict[str, Any]:
    """The marker's RunConfig overrides (its rtol= / atol= are for flannel_snapshot, see _marker_tolerance)."""
    return {k: v for k, v in _marker_kwargs(item).items() if k not in TOLERANCE_KEYS}


def _marker_tolerance(item: pytest.Item) -> dict[str, float]:
    """rtol= / atol= of the test's @pytest.mark.flannel, validated (pytest.UsageError naming the test)."""
    out: dict[str, float] = {}
    for key, raw in _marker_kwargs(item).items():
        if key in TOLERANCE_KEYS:
            value = _tolerance_value(raw) if isinstance(raw, (int, float)) else None
            if value is None:
                raise pytest.UsageError(f"{item.nodeid}: @pytest.mark.{MARKER}({key}=...) must be a finite number >= 0 "
                                        f"(got {raw!r}).")
            out[key] = value
    return out


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
        _marker_tolerance(item)
        overrides = _marker_overrides(item)
        if overrides:
            try:
                state.run_template.replace(**overrides)
            except ConfigError as exc:
                raise pytest.UsageError(f"{item.nodeid}: @pytest.mark.{MARKER}: {exc}") from None


# --- parametrization over devices and seeds ---------------------------------------------------------------

def _device_present(device: str) -> tuple[bool, str]:
    kind = device.split(":")[0]
    if kind == "cpu":
        return True, ""
    import torch

    if kind == "cuda":
        if not torch.cuda.is_available():
            return False, "CUDA is not available (torch.cuda.is_available() is False)"
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            return False, f"{device} asked for but only {torch.cuda.device_count()} CUDA device(s) present"
        return True, ""
    if kind == "mps":
        if not torch.backends.mps.is_available():
            return False, "MPS is not available (torch.backends.mps.is_available() is False)"
        return True, ""
    return False, f"unknown device kind {kind!r}"


def _resolves_to_ours(metafunc: pytest.Metafunc, name: str) -> bool:
    """Whether fixture `name` is, for this test, the one this plugin defines. A suite's own `device` or
    `train_seed` (any conftest or module fixture wins over a plugin's) is never parametrized by us."""
    if name not in metafunc.fixturenames:
        return False
    defs = getattr(metafunc, "_arg2fixturedefs", None)  # pytest's own resolution (stable since pytest 3)
    if not isinstance(defs, dict):
        return "trajectory" in metafunc.fixturenames  # unknown internals: only tests that train runs
    chain = defs.get(name) or ()
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
    from flannel_repro.data import load_data

    return load_data(_state(request).run_template)


@pytest.fixture(scope="session")
def tokenizer(request: pytest.FixtureRequest):  # noqa: ANN201
    """The `tokenizers.Tokenizer` of the session's data (embedded default, or --flannel-tokenizer)."""
    from flannel_repro.data import data_files, load_tokenizer

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
def shared_init_W(request: pytest.FixtureRequest):  # noqa: N802, ANN201
    """W_initial (V, H) from `init_seed`, on CPU in the run dtype: identical on every worker and device."""
    from flannel_repro.model import shared_init_W as make

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
    present, why = _device_present(name)
    if not present:
        if state.devices_explicit:
            pytest.skip(f"device {name!r} requested but absent: {why}")
        pytest.skip(f"{name} not present on this machine: {why}")
    return name


@pytest.fixture
def trajectory(request: pytest.FixtureRequest):  # noqa: ANN201
    """Factory: `trajectory(train_seed=None, *, device=None, repeat=0, **overrides) -> Trajectory`.

    Trains the run (or reads it from the artifacts directory when an identical run was already made
    by this or another xdist worker) and returns a lazy, memory-mapped Trajectory. `train_seed` sets
    model_seed and data_seed together (the notebook's seed); pass model_seed= / data_seed= to set
    them apart. `repeat` > 0 trains the same run again, separately: use it to test repeatability.
    `device` defaults to the test's `device` parameter, else the first selected device. Other
    keyword arguments override RunConfig fields, after any @pytest.mark.flannel(...) overrides.
    """
    state = _state(request)
    marker = _marker_overrides(request.node)
    callspec = getattr(request.node, "callspec", None)
    default_device = callspec.params.get("device") if callspec is not None and "device" in callspec.params else None

    def make(train_seed: int | None = None, *, device: str | None = None, repeat: int = 0,
             **overrides: Any) -> "Trajectory":
        __tracebackhide__ = True
        dev = device or default_device or state.devices[0]
        present, why = _device_present(dev)
        if not present:
            pytest.skip(f"device {dev!r} requested but absent: {why}")
        cfg = state.run_template
        changes = {**marker, **overrides, "device": dev}
        if train_seed is not None:
            if "model_seed" in overrides or "data_seed" in overrides:
                raise TypeError("give train_seed or model_seed/data_seed, not both.")
            changes.update(model_seed=train_seed, data_seed=train_seed)
        try:
            cfg = cfg.replace(**changes)
        except ConfigError as exc:
            raise pytest.UsageError(f"{request.node.nodeid}: trajectory(...): {exc}") from None
        return obtain(request.config, cfg, repeat=repeat)

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
    from flannel_repro.snapshot import snapshot_assertion
    from flannel_repro.summary import Tolerance

    tolerance = {**_state(request).tolerance, **_marker_tolerance(request.node)}
    return snapshot_assertion(request, Tolerance(**tolerance))


def obtain(config: pytest.Config, cfg: RunConfig, *, repeat: int = 0) -> "Trajectory":
    """Get a run through the session's store, showing progress while it trains."""
    state = config.stash[SESSION_KEY]
    threads = state.apply_threads()
    reporter = _ProgressWriter(config, state.progress_interval)
    got = state.store().obtain(cfg, repeat=repeat, progress=reporter.step, on_train_start=reporter.start)
    traj = got.trajectory
    c = traj.config
    name = traj.path.stem
    seed = str(c.train_seed) if c.train_seed is not None else f"m{c.model_seed}/d{c.data_seed}"
    if got.trained or name not in state.runs:
        state.runs[name] = RunRecord(
            name=name, seed=seed + (f" r{repeat}" if repeat else ""), device=c.device, engine=c.engine, steps=c.steps,
            final_loss=traj.final_loss, wall_time_s=traj.wall_time_s, steps_per_s=traj.steps_per_s,
            threads=int(traj.metadata.get("threads", threads)), path=str(traj.path), trained_here=got.trained,
            numerics_class=str((traj.env.get("numerics") or {}).get("class", "")))
    return traj


class _ProgressWriter:
    """Progress of a training run: a line on the terminal every `interval` seconds (no xdist), and a
    small JSON file beside the artifact that the xdist controller polls."""

    def __init__(self, config: pytest.Config, interval: float) -> None:
        self.config = config
        self.interval = interval
        self.path: Path | None = None
        self.t0 = time.perf_counter()
        self.last = 0.0
        self.is_worker = hasattr(config, "workerinput")

    def start(self, path: Path) -> None:
        self.path = path
        self.t0 = self.last = time.perf_counter()
        self._line(f"flannel: training {path.stem} ...")

    def step(self, step: int, steps: int, loss: float) -> None:
        now = time.perf_counter()
        if self.interval <= 0 or (now - self.last < self.interval and step != steps):
            return
        self.last = now
        rate = step / max(now - self.t0, 1e-9)
        line = f"flannel: {self.path.stem if self.path else 'run'}: step {step}/{steps}, loss {loss:.4f}, {rate:.2f} steps/s"
        if self.is_worker and self.path is not None:
            progress_file = Path(str(self.path) + ".progress")
            tmp = progress_file.with_suffix(".progress.tmp")
            tmp.write_text(json.dumps({"line": line, "time": time.time(), "step": step, "steps": steps}))
            os.replace(tmp, progress_file)
            if step == steps:
                progress_file.unlink(missing_ok=True)
        else:
            self._line(line)

    def _line(self, line: str) -> None:
        if self.is_worker or self.interval <= 0:
            return
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        capman = self.config.pluginmanager.get_plugin("capturemanager")
        if reporter is None:
            return
        ctx = capman.global_and_fixture_disabled() if capman is not None else contextlib.nullcontext()
        with ctx:
            reporter.write_line(line)


# --- claims and the terminal summary (controller only) ------------------------------------------------------

@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    """Collect what the assertion helpers measured, as user_properties (they travel through xdist)."""
    if "trajectory" not in getattr(item, "fixturenames", ()):
        return (yield)
    from flannel_repro import assertions

    def observe(claim: str, a: Any, b: Any, stats: dict[str, Any]) -> None:
        keep = {k: v for k, v in stats.items() if isinstance(v, (int, float, str, bool, type(None)))}
        item.user_properties.append(("flannel_claim", json.dumps(
            {"claim": claim, "pair_class": assertions.pair_class(a, b), "a": a.label, "b": b.label, **keep})))

    assertions._observers.append(observe)
    try:
        return (yield)
    finally:
        assertions._observers.remove(observe)


class _ControllerReporter:
    """Lives on the controller (or the single process): polls worker progress, prints the summary."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.results: list[tuple[str, str, list[dict[str, Any]]]] = []
        self.metrics: dict[str, list[float]] = {}
        self.cross_class: list[dict[str, Any]] = []  # snapshots compared against another numerics class
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._seen: dict[str, float] = {}

    @pytest.hookimpl
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when in ("call", "setup"):
            self.cross_class.extend(json.loads(v) for k, v in report.user_properties if k == "flannel_cross_class")
        claims = [json.loads(v) for k, v in report.user_properties if k == "flannel_claim"]
        uses = any(k == "flannel_uses_trajectory" for k, _ in report.user_properties)
        if (report.when == "call" and (claims or uses)) or (report.when == "setup" and report.skipped and uses):
            self.results.append((report.nodeid, report.outcome, claims))
        if uses and report.when == "call":
            for key, value in report.user_properties:
                if not key.startswith("flannel_") and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.metrics.setdefault(key, []).append(float(value))

    @pytest.hookimpl
    def pytest_sessionstart(self, session: pytest.Session) -> None:
        state = self.config.stash[SESSION_KEY]
        if self.config.pluginmanager.hasplugin("dsession") and state.progress_interval > 0:
            self._thread = threading.Thread(target=self._poll, name="flannel-progress", daemon=True)
            self._thread.start()

    def _poll(self) -> None:
        state = self.config.stash[SESSION_KEY]
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        while not self._stop.wait(state.progress_interval):
            try:
                files = list(state.artifacts_dir.glob("*.progress"))
            except OSError:
                continue
            for f in files:
                try:
                    info = json.loads(f.read_text())
                except (OSError, ValueError):
                    continue
                if info.get("time", 0) > self._seen.get(f.name, 0) and reporter is not None:
                    self._seen[f.name] = info["time"]
                    reporter.write_line(info["line"])

    @pytest.hookimpl
    def pytest_unconfigure(self, config: pytest.Config) -> None:
        self._stop.set()

    @pytest.hookimpl
    def pytest_terminal_summary(self, terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
        self._stop.set()
        state = config.stash[SESSION_KEY]
        if not state.runs and not self.results and not self.cross_class:
            return
        tr = terminalreporter
        tr.write_sep("=", "flannel-repro")
        exp = state.experiment
        tr.write_line(f"config {exp.run.fingerprint()}: {exp.n_runs} runs x {exp.run.steps} steps, seeds "
                      f"{exp.train_seeds[0]}-{exp.train_seeds[-1]}, engine {exp.run.engine}, labels {exp.run.label_mode}, "
                      f"artifacts {state.artifacts_dir}")
        if state.runs:
            tr.write_line("")
            head = f"{'seed':<12} {'device':<7} {'engine':<6} {'steps':>6} {'final loss':>11} {'wall s':>8} {'steps/s':>8} {'thr':>3}  artifact"
            tr.write_line(head)
            for r in sorted(state.runs.values(), key=lambda r: (r.device, r.seed)):
                note = "" if r.trained_here else " (reused)"
                tr.write_line(f"{r.seed:<12} {r.device:<7} {r.engine:<6} {r.steps:>6} {r.final_loss:>11.5f} "
                              f"{r.wall_time_s:>8.1f} {r.steps_per_s:>8.2f} {r.threads:>3}  {Path(r.path).name}{note}")
            classes = sorted({r.numerics_class for r in state.runs.values() if r.numerics_class})
            if classes:
                tr.write_line(f"numerics class{'es' if len(classes) > 1 else ''}: {', '.join(classes)} "
                              f"(requested numerics: {exp.run.numerics})")
        if self.cross_class:
            tr.write_line("")
            tr.write_line(f"snapshots stored only for other numerics classes (--flannel-missing-class={state.missing_class}):")
            for c in self.cross_class:
                tr.write_line(f"  {c['outcome'].upper():<7} {c['snapshot']}: this run {c['class']}, nearest stored {c['stored']}")
        if self.results:
            tr.write_line("")
            tr.write_line("claims:")
            skipped = [r for r in self.results if r[1] == "skipped"]
            for nodeid, outcome, _ in self.results:
                if outcome != "skipped":
                    tr.write_line(f"  {outcome.upper():<7} {nodeid}")
            if skipped:
                tr.write_line(f"  SKIPPED {len(skipped)} claim(s) (see -rs for the reasons)")
            by_class: dict[str, list[dict[str, Any]]] = {}
            for _, _, claims in self.results:
                for c in claims:
                    by_class.setdefault(c["pair_class"], []).append(c)
            if by_class:
                tr.write_line("")
                tr.write_line("divergence by pair class:")
                for cls, claims in sorted(by_class.items()):
                    tr.write_line("  " + _class_line(cls, claims))
            if self.metrics:
                tr.write_line("")
                tr.write_line("measured by the claims (record_property):")
                for name, values in sorted(self.metrics.items()):
                    tr.write_line(f"  {name}: n={len(values)}, min {min(values):.4g}, max {max(values):.4g}")


def _class_line(cls: str, claims: list[dict[str, Any]]) -> str:
    firsts = sorted({c["first_step"] for c in claims if c.get("first_step") is not None})
    frobs = [c["frobenius"] for c in claims if isinstance(c.get("frobenius"), float)]
    identical = sum(1 for c in claims if c.get("identical") is True)
    parts = [f"{cls}: {len(claims)} check(s)"]
    if identical:
        parts.append(f"{identical} bitwise identical")
    if firsts:
        parts.append("first divergent step " + (str(firsts[0]) if len(firsts) == 1 else f"{firsts[0]}..{firsts[-1]}"))
    elif any("first_step" in c for c in claims):
        parts.append("never diverged")
    if frobs:
        parts.append(f"final ‖ΔW‖_F min {min(frobs):.4g} / max {max(frobs):.4g}")
    return ", ".join(parts)
