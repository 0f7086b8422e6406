"""The plugin's session: options, ini keys and the config file resolved into one `FlannelSession`
(kept in `config.stash`, never in module globals), which the hooks and fixtures hand off to.

Importing this module imports neither torch nor transformers: `pytest --help` stays fast.
"""

from __future__ import annotations

import math
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from flannel_repro.config import (
    ENGINES,
    LABEL_MODES,
    MAX_THREADS,
    NUMERICS,
    PRESETS,
    ExperimentConfig,
    RunConfig,
    parse_seeds,
)
from flannel_repro.devices import DEVICE_KINDS, device_present, parse_device
from flannel_repro.errors import ConfigError

if TYPE_CHECKING:
    from flannel_repro.runs.plan import RunRequest
    from flannel_repro.runs.store import RunStore

GROUP = "flannel"
MARKER = "flannel"
TOLERANCE_KEYS = ("rtol", "atol")  # @pytest.mark.flannel kwargs for flannel_snapshot, not RunConfig fields
MISSING_CLASS_POLICIES = ("skip", "fail", "tolerant")  # --flannel-missing-class
DEFAULT_THREADS = 1  # --flannel-threads when not given: a run's bits must not depend on -n
SNAPSHOT_SUFFIX = "flannel"  # file suffix of flannel_snapshot files (flannel_repro.plugin.snapshot)
SCHEDULES = ("plan", "claims")  # --flannel-schedule
DEFAULT_SCHEDULE = "plan"  # chosen by measurement: benchmarks/bench_schedule.py, README "Scheduling"

# option name (after --flannel-) -> (ini key, help, parser of the raw string)
_OPTIONS: dict[str, tuple[str, str]] = {
    "config": (
        "flannel_config",
        "TOML experiment config (core config keys; [experiment] table for runs/seeds/devices).",
    ),
    "preset": ("flannel_preset", f"starting point: {', '.join(PRESETS)} (default: ci = the CI scale)."),
    "steps": ("flannel_steps", "optimizer steps per run (overrides the config)."),
    "runs": ("flannel_runs", "number of training seeds (overrides the config)."),
    "seeds": ("flannel_seeds", "training seeds: '42-51' or '42,43,47' (overrides runs and base seed)."),
    "devices": (
        "flannel_devices",
        "comma-separated devices to run claims on: cpu, cuda, mps (default: cpu plus any present).",
    ),
    "engine": (
        "flannel_engine",
        f"training engine: {' or '.join(ENGINES)} (torch: the lean loop; hf: the transformers "
        "Trainer; bitwise equal on CPU).",
    ),
    "label-mode": (
        "flannel_label_mode",
        f"labels: {' or '.join(LABEL_MODES)} (next_token: correct; notebook: the notebook's two-ahead labels).",
    ),
    "artifacts": (
        "flannel_artifacts",
        "the run store shared by workers and sessions: a directory (default: .flannel/artifacts), or a URL "
        "of an fsspec file system shared by machines (s3://bucket/runs, gs://bucket/runs, file:///shared/runs; "
        "credentials from the file system's usual places).",
    ),
    "cache": (
        "flannel_cache",
        "with a URL store: this machine's read-through cache of its runs (default: .flannel/cache/<store>).",
    ),
    "threads": (
        "flannel_threads",
        "torch threads per run (they decide the bits, so the class): default 1, the same under "
        "pytest and pytest -n auto; more is an explicit choice.",
    ),
    "tokenizer": ("flannel_tokenizer", "your tokenizers JSON file (with --flannel-corpus)."),
    "corpus": ("flannel_corpus", "your UTF-8 corpus (with --flannel-tokenizer)."),
    "token-mask": ("flannel_token_mask", "your live/dead token mask safetensors (default: computed from the corpus)."),
    "checkpoint-every": (
        "flannel_checkpoint_every",
        "checkpoint the training state every N steps (torch and registered "
        "engines), so a killed run resumes from its last checkpoint when trained again (0 = off; "
        "default 100).",
    ),
    "progress": ("flannel_progress", "seconds between training progress lines (0 = off; default 10)."),
    "numerics": (
        "flannel_numerics",
        f"CPU arithmetic: {' or '.join(NUMERICS)} (native: this CPU's fastest kernels, the "
        "default; portable: ATen, oneDNN and MKL pinned to AVX2 and bf16 products as float32 GEMMs rounded "
        "explicitly, one class on every x86-64 CPU with AVX2; avx512bf16: a faster class for CPUs with "
        "AVX-512 BF16).",
    ),
    "missing-class": (
        "flannel_missing_class",
        f"when a snapshot exists only for other numerics classes: "
        f"{', '.join(MISSING_CLASS_POLICIES)} (tolerant, the default: compare with the nearest class "
        "within the noise band measured for the scale, and fail when none is measured; fail: fail; "
        "skip: opt in to skipping, which compares nothing).",
    ),
    "noise-bands": (
        "flannel_noise_bands",
        "JSON file of noise bands for tolerant comparisons across numerics classes "
        "(default: flannel_noise_bands.json beside the test file).",
    ),
    "derive-bounds": (
        "flannel_derive_bounds",
        "where no divergence bound was derived for this config and data, the "
        "session derives one from held-out seeds (2 runs per seed) and caches it beside the runs: by "
        "default the 16 seeds after the claim seeds; or these seeds, e.g. '46-61'; 'none' skips the "
        "bound claims instead.",
    ),
    "report": (
        "flannel_report",
        "write the report into this folder at the end of the session: plots, a page (HTML and "
        "Markdown), JSON and CSV (needs matplotlib: the 'report' extra); on GitHub Actions the tables go to the "
        "step summary too.",
    ),
    "schedule": (
        "flannel_schedule",
        f"when runs train: {' or '.join(SCHEDULES)} (plan: before the claims, every process trains the "
        "planned runs no other process is training, then the claims read them; claims: a run trains when a "
        f"claim first asks for it). Default {DEFAULT_SCHEDULE} (README, 'Scheduling').",
    ),
    "shard": (
        "flannel_shard",
        "K/N: train only shard K of N of the session's plan (a CI job per shard) and run no claims; "
        "each run is a test item.",
    ),
    "rtol": ("flannel_rtol", "relative tolerance of flannel_snapshot float comparisons (default 0: exact)."),
    "atol": ("flannel_atol", "absolute tolerance of flannel_snapshot float comparisons (default 0: exact)."),
}
_FLAGS: dict[str, tuple[str, str]] = {
    "fresh": (
        "flannel_fresh",
        "ignore artifacts from earlier sessions (runs are still shared between this session's workers).",
    ),
    "train-only": (
        "flannel_train_only",
        "train the session's whole plan and run no claims (each run is a test item).",
    ),
    "no-train": (
        "flannel_no_train",
        "train nothing: the claims judge runs from the store, and a run missing there fails the claim "
        "that asked for it (the gate job after --flannel-shard jobs).",
    ),
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
    replaced: str = ""  # why a stored artifact of this run was set aside (failed verification) and retrained
    fetched: bool = False  # downloaded from the URL store (--flannel-artifacts=URL) into the local cache

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class FlannelSession:
    """Per-process state, kept in `config.stash`."""

    experiment: ExperimentConfig
    artifacts_dir: Path
    session_id: str
    reuse_earlier: bool
    threads: int | None
    progress_interval: float
    tolerance: dict[str, float] = field(default_factory=dict)  # rtol / atol from options or ini
    missing_class: str = "tolerant"  # what flannel_snapshot does when only other numerics classes have a snapshot
    noise_bands: Path | None = None  # --flannel-noise-bands (None: flannel_noise_bands.json beside the test file)
    derive_bounds: tuple[int, ...] | None = None  # --flannel-derive-bounds: held-out seeds for an in-session bound
    # (None: the default seeds after the claim seeds; (): 'none', skip the bound claims where no bound is stored)
    report_dir: Path | None = None  # --flannel-report: where the controller writes the report at the end
    checkpoint_every: int = 100  # --flannel-checkpoint-every: steps between resumable checkpoints (0 = none)
    runs_started: int = 0  # runs this process started training (numbers its progress lines)
    runs: dict[str, RunRecord] = field(default_factory=dict)
    leftovers_removed: list[str] = field(
        default_factory=list
    )  # partial/progress files of killed runs, cleaned at start
    store_url: str | None = None  # --flannel-artifacts given as a URL: artifacts_dir is then its local cache
    schedule: str = DEFAULT_SCHEDULE  # --flannel-schedule: "plan" trains the plan before the claims run
    shard: tuple[int, int] | None = None  # --flannel-shard=K/N: train shard K of N of the plan, no claims
    train_only: bool = False  # --flannel-train-only (or a shard): train the plan, run no claims
    no_train: bool = False  # --flannel-no-train: the store's runs only; a missing one fails its claim
    plan: "list[RunRequest] | None" = None  # the session's plan, once computed (plugin.plan.session_plan)
    _store: "RunStore | None" = None
    _threads_set: bool = False

    @property
    def devices_explicit(self) -> bool:
        """Whether devices were asked for (--flannel-devices, ini, or the config file's [experiment] devices)."""
        return self.experiment.devices is not None

    @property
    def devices(self) -> tuple[str, ...]:
        """The requested devices, or cpu, cuda and mps when none were requested."""
        return self.experiment.devices if self.experiment.devices is not None else DEVICE_KINDS

    def selected_devices(self) -> list[str]:
        """Devices to parametrize over: the requested ones (absent ones skip with the reason), or by
        default cpu plus whichever of cuda / mps is present."""
        if self.devices_explicit:
            return list(self.devices)
        return [d for d in self.devices if d == "cpu" or device_present(d)[0]]

    @property
    def run_template(self) -> RunConfig:
        return self.experiment.run

    def store(self) -> "RunStore":
        if self._store is None:
            from flannel_repro.runs.store import RunStore

            from flannel_repro.runs.remote import RemoteStore

            self._store = RunStore(
                self.artifacts_dir,
                remote=RemoteStore(self.store_url) if self.store_url else None,
                session=self.session_id,
                reuse_earlier=self.reuse_earlier,
                checkpoint_every=self.checkpoint_every,
                train=not self.no_train,
            )
        return self._store

    def planned_runs(self) -> int:
        """The runs the session is known to need: one per training seed and selected device. Claims may ask
        for more (repeats, variants), so progress lines say "run k of >= n". Once this process has made the
        session's plan (plugin.plan.session_plan) and it names runs, its length."""
        if self.plan:
            return len(self.plan)
        return self.experiment.n_runs * max(1, len(self.selected_devices()))

    def planned_threads(self) -> int:
        """The thread count of this session's runs: --flannel-threads, else DEFAULT_THREADS, the same under
        `pytest` and `pytest -n auto` (threads decide the bits, so they must not follow the worker count)."""
        return self.threads if self.threads is not None else DEFAULT_THREADS

    def numerics_classes(self) -> frozenset[str]:
        """The numerics classes this process's runs get on the selected, present devices (probes the CPU
        libraries once; they are fixed for the process from their first call)."""
        from flannel_repro.training.numerics import numerics_info

        threads = self.planned_threads()
        run = self.run_template
        return frozenset(
            numerics_info(d, threads=run.threads or threads, deterministic=run.deterministic, mode=run.numerics)[
                "class"
            ]
            for d in self.selected_devices()
            if device_present(d)[0]
        )

    def apply_threads(self) -> int:
        """Set this process's thread count (once) and pin an xdist worker to that many CPUs: torch's default
        of all cores per xdist worker oversubscribes the machine."""
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
    cpus = allowed[index * threads : (index + 1) * threads]
    from flannel_repro.training.determinism import remember_allowed_cpus

    remember_allowed_cpus()  # a run of more threads than this worker's share gets room (torch_threads)
    try:
        os.sched_setaffinity(0, cpus)
    except OSError:
        return None
    return cpus


SESSION_KEY = pytest.StashKey[FlannelSession]()


def add_options(parser: pytest.Parser) -> None:
    """Register every --flannel-* option and its ini key (pytest_addoption hands off here)."""
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
    return pytest.UsageError(
        f"--flannel-{option} (ini: flannel_{option.replace('-', '_')}) accepts {accepts}; got {got!r}."
    )


def _int_option(config: pytest.Config, option: str, minimum: int, maximum: int | None = None) -> int | None:
    raw = _get(config, _OPTIONS[option][0])
    if raw is None:
        return None
    accepts = f"an integer >= {minimum}" if maximum is None else f"an integer in {minimum}..{maximum}"
    try:
        value = int(str(raw).strip())
    except ValueError:
        raise _usage(option, accepts, raw) from None
    if value < minimum or (maximum is not None and value > maximum):
        raise _usage(option, accepts, raw)
    return value


def _store_url(config: pytest.Config, raw: Any) -> str | None:
    """--flannel-artifacts as a URL store (None for a directory). In the controller, the store is reached
    now: one that cannot be, or that refuses this machine's credentials, is a usage error before anything
    runs, not a traceback in the middle of a run."""
    from flannel_repro.runs.remote import RemoteStore, is_url

    if not raw or not is_url(str(raw)):
        return None
    url = str(raw)
    try:
        remote = RemoteStore(url)
        if getattr(config, "workerinput", None) is None:
            remote.check()
    except ConfigError as exc:
        raise pytest.UsageError(f"--flannel-artifacts (ini: flannel_artifacts): {exc}") from None
    return url


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
                path = (
                    Path(
                        config.rootpath if config.getoption("flannel_config") is None else config.invocation_params.dir
                    )
                    / path
                )
            exp = ExperimentConfig.from_toml(path)
            if preset is not None:
                raise _usage(
                    "preset", "no value when --flannel-config is given (put 'preset = ...' in the file)", preset
                )
        else:
            exp = PRESETS[preset or "ci"]()
    except ConfigError as exc:
        raise pytest.UsageError(f"--flannel-config: {exc}") from None

    run_changes: dict[str, Any] = {}
    steps = _int_option(config, "steps", 1)
    if steps is not None:
        run_changes["steps"] = steps
    for option, key, choices in (
        ("engine", "engine", ENGINES),
        ("label-mode", "label_mode", LABEL_MODES),
        ("numerics", "numerics", NUMERICS),
    ):
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
        raise pytest.UsageError(
            "--flannel-tokenizer and --flannel-corpus go together: give both to use your own data "
            f"(got tokenizer={tok!r}, corpus={corpus!r})."
        )
    if tok is not None:
        run_changes.update(
            tokenizer_path=str(Path(tok).resolve()),
            corpus_path=str(Path(corpus).resolve()),
            token_mask_path=str(Path(mask).resolve()) if mask else None,
        )
    elif mask is not None:
        raise pytest.UsageError("--flannel-token-mask needs --flannel-tokenizer and --flannel-corpus.")
    exp_changes: dict[str, Any] = {}
    runs = _int_option(config, "runs", 1)
    seeds_raw = _get(config, "flannel_seeds")
    if seeds_raw is not None:
        try:
            seeds = parse_seeds(seeds_raw)
        except ValueError:
            raise _usage(
                "seeds", "a range '42-51' or a list '42,43,47' of distinct seeds in 0..2**63-1", seeds_raw
            ) from None
        if seeds != tuple(range(seeds[0], seeds[0] + len(seeds))):
            raise _usage("seeds", "consecutive seeds (the experiment trains base, base+1, ...)", seeds_raw)
        if runs is not None and runs != len(seeds):
            raise pytest.UsageError(
                f"--flannel-runs={runs} disagrees with --flannel-seeds={seeds_raw!r} ({len(seeds)} seeds)."
            )
        exp_changes.update(base_train_seed=seeds[0], n_runs=len(seeds))
    elif runs is not None:
        exp_changes["n_runs"] = runs
    try:
        exp = exp.replace(run=exp.run.replace(**run_changes), **exp_changes)
    except ConfigError as exc:
        raise pytest.UsageError(f"flannel options: {exc}") from None

    devices_raw = _get(config, "flannel_devices")
    if devices_raw is not None:
        accepts = "a comma-separated list of distinct devices: cpu, cuda, cuda:N, mps"
        try:
            devices = tuple(str(parse_device(d.strip())) for d in str(devices_raw).split(",") if d.strip())
        except ConfigError:
            raise _usage("devices", accepts, devices_raw) from None
        if not devices or len(set(devices)) != len(devices):
            raise _usage("devices", accepts, devices_raw)
        exp = exp.replace(devices=devices)  # what flannel_config.devices then says

    threads = _int_option(config, "threads", 1, MAX_THREADS)
    checkpoint_every = _int_option(config, "checkpoint-every", 0)
    interval_raw = _get(config, "flannel_progress")
    try:
        interval = 10.0 if interval_raw is None else float(interval_raw)
        if not (interval >= 0 and math.isfinite(interval)):  # NaN fails here too
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
    missing_class = _get(config, "flannel_missing_class") or "tolerant"
    if missing_class not in MISSING_CLASS_POLICIES:
        raise _usage("missing-class", " or ".join(MISSING_CLASS_POLICIES), missing_class)
    bands_raw = _get(config, "flannel_noise_bands")
    noise_bands = None
    if bands_raw is not None:
        base = config.invocation_params.dir if config.getoption("flannel_noise_bands") else config.rootpath
        noise_bands = Path(bands_raw) if Path(bands_raw).is_absolute() else Path(base) / bands_raw
        if not noise_bands.is_file():
            raise _usage(
                "noise-bands",
                "the path of an existing noise-bands JSON file (flannel-repro noise -o FILE)",
                str(noise_bands),
            )
    derive_raw = _get(config, "flannel_derive_bounds")
    derive_bounds: tuple[int, ...] | None = None
    if derive_raw is not None and str(derive_raw).strip().lower() == "none":
        derive_bounds = ()
    elif derive_raw is not None and str(derive_raw).strip().lower() != "auto":
        try:
            derive_bounds = parse_seeds(derive_raw)
        except ValueError:
            raise _usage(
                "derive-bounds",
                "'none', 'auto', or held-out seeds: a range '46-61' or a list '46,47,50' in 0..2**63-1",
                derive_raw,
            ) from None
    artifacts_raw = _get(config, "flannel_artifacts")
    store_url = _store_url(config, artifacts_raw)
    if store_url is not None:
        cache_raw = _get(config, "flannel_cache")
        base = config.invocation_params.dir if config.getoption("flannel_cache") else config.rootpath
        from flannel_repro.runs.store import default_cache_dir

        artifacts_dir = Path(cache_raw) if cache_raw else default_cache_dir(store_url, ".")
        option = "cache"
    else:
        artifacts_dir = Path(artifacts_raw) if artifacts_raw else Path(".flannel") / "artifacts"
        base = config.invocation_params.dir if config.getoption("flannel_artifacts") else config.rootpath
        option = "artifacts"
    if not artifacts_dir.is_absolute():
        artifacts_dir = Path(base) / artifacts_dir
    blocker = next((p for p in (artifacts_dir, *artifacts_dir.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        what = "is a file" if blocker == artifacts_dir else f"lies under a file ({blocker})"
        raise _usage(option, f"a directory (it is created if missing); this path {what}", str(artifacts_dir))
    workerinput = getattr(config, "workerinput", None)
    given = artifacts_raw is not None
    if workerinput is None and (given or artifacts_dir.exists()):
        # Checked by a real write before any test runs. The default directory is created only by a session
        # that trains, so a suite that does not use the plugin never writes into its project for it.
        from flannel_repro.runs.store import writable_problem

        problem = writable_problem(artifacts_dir)
        if problem is not None:
            raise _usage(option, f"a directory run artifacts can be written to; {problem}", str(artifacts_dir))
    report_raw = _get(config, "flannel_report")
    report_dir = None
    if report_raw:
        base = config.invocation_params.dir if config.getoption("flannel_report") else config.rootpath
        report_dir = Path(report_raw) if Path(report_raw).is_absolute() else Path(base) / report_raw
        blocker = next((p for p in (report_dir, *report_dir.parents) if p.exists()), None)
        if blocker is not None and not blocker.is_dir():
            what = "is a file" if blocker == report_dir else f"lies under a file ({blocker})"
            raise _usage(
                "report", f"a folder to write the report into (created if missing); this path {what}", str(report_dir)
            )
        if workerinput is None:
            try:
                import matplotlib  # noqa: F401 -- the plots need it; say so before anything trains
            except ImportError:
                raise _usage(
                    "report",
                    "a folder for the report, with matplotlib installed for its plots (pip install "
                    "'flannel-repro[report]')",
                    str(report_dir),
                ) from None
    fresh = bool(config.getoption("flannel_fresh") or config.getini("flannel_fresh"))
    session_id = workerinput.get("flannel_session") if workerinput else None
    return FlannelSession(
        experiment=exp,
        artifacts_dir=artifacts_dir,
        store_url=store_url,
        session_id=session_id or uuid.uuid4().hex,
        reuse_earlier=not fresh,
        threads=threads,
        progress_interval=interval,
        tolerance=tolerance,
        missing_class=missing_class,
        noise_bands=noise_bands,
        derive_bounds=derive_bounds,
        report_dir=report_dir,
        checkpoint_every=100 if checkpoint_every is None else checkpoint_every,
        **_schedule_options(config),
    )


def parse_shard(raw: Any) -> tuple[int, int]:
    """'K/N' as (K, N), 1 <= K <= N; a usage error naming --flannel-shard, what it accepts and what it got."""
    accepts = "K/N: shard K of N, integers with 1 <= K <= N (e.g. 1/2)"
    k, sep, n = str(raw).strip().partition("/")
    try:
        shard = int(k), int(n)
    except ValueError:
        raise _usage("shard", accepts, raw) from None
    if not sep or not 1 <= shard[0] <= shard[1]:
        raise _usage("shard", accepts, raw)
    return shard


def _schedule_options(config: pytest.Config) -> dict[str, Any]:
    """--flannel-schedule, --flannel-shard, --flannel-train-only and --flannel-no-train, validated together."""
    schedule = _get(config, "flannel_schedule") or DEFAULT_SCHEDULE
    if schedule not in SCHEDULES:
        raise _usage("schedule", " or ".join(SCHEDULES), schedule)
    raw = _get(config, "flannel_shard")
    shard = parse_shard(raw) if raw is not None else None
    train_only = bool(config.getoption("flannel_train_only") or config.getini("flannel_train_only"))
    no_train = bool(config.getoption("flannel_no_train") or config.getini("flannel_no_train"))
    if no_train and (shard is not None or train_only):
        given = f"--flannel-shard={raw}" if shard is not None else "--flannel-train-only"
        raise pytest.UsageError(
            f"--flannel-no-train (ini: flannel_no_train) runs the claims without training; it cannot go with "
            f"{given}, which trains and runs no claims: give one of them."
        )
    return {"schedule": schedule, "shard": shard, "train_only": train_only or shard is not None, "no_train": no_train}


def _tolerance_value(raw: Any) -> float | None:
    """A tolerance as a float, or None when it is not a finite number >= 0."""
    if isinstance(raw, bool):
        return None
    try:
        value = float(str(raw).strip()) if isinstance(raw, str) else float(raw)
    except (TypeError, ValueError):
        return None
    return value if value >= 0 and value != float("inf") else None


# --- marker validation ---------------------------------------------------------------------------------


def _marker_kwargs(item: pytest.Item) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    for mark in reversed(list(item.iter_markers(MARKER))):  # closest marker wins
        if mark.args:
            raise pytest.UsageError(
                f"{item.nodeid}: @pytest.mark.{MARKER} takes keyword arguments only "
                f"(RunConfig fields, rtol=, atol=), got positional {mark.args!r}."
            )
        kwargs.update(mark.kwargs)
    return kwargs


def marker_overrides(item: pytest.Item) -> dict[str, Any]:
    """The marker's RunConfig overrides (its rtol= / atol= are for flannel_snapshot, see _marker_tolerance)."""
    return {k: v for k, v in _marker_kwargs(item).items() if k not in TOLERANCE_KEYS}


def marker_tolerance(item: pytest.Item) -> dict[str, float]:
    """rtol= / atol= of the test's @pytest.mark.flannel, validated (pytest.UsageError naming the test)."""
    out: dict[str, float] = {}
    for key, raw in _marker_kwargs(item).items():
        if key in TOLERANCE_KEYS:
            value = _tolerance_value(raw) if isinstance(raw, (int, float)) else None
            if value is None:
                raise pytest.UsageError(
                    f"{item.nodeid}: @pytest.mark.{MARKER}({key}=...) must be a finite number >= 0 (got {raw!r})."
                )
            out[key] = value
    return out
