"""Configuration: every number-changing knob of one training run, explicit and validated.

No torch import here: the pytest plugin reads configs at option-parsing time and must stay light.

`RunConfig` describes one run completely (model shape, optimiser, seeds, numerics, engine, device,
what to record). `ExperimentConfig` describes the Flannel 6 experiment: a template run trained for
several training seeds on several devices. Both are frozen; derive variants with
`dataclasses.replace` (or `RunConfig.replace`, which validates the keys first).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Self

from flannel_repro.devices import parse_device
from flannel_repro.errors import ConfigError

# Choices for the enumerated fields; the messages of ConfigError list them.
ENGINES = ("torch", "hf")
DTYPES = ("bfloat16", "float32")
AMP_DTYPES = ("bfloat16", "none")
LABEL_MODES = ("next_token", "notebook")
LR_SCHEDULES = ("linear", "constant")
OPTIMIZERS = ("adamw_torch", "adamw_torch_fused")
COMPILE_MODES = ("none", "default")
HEADS = ("auto", "fused", "reference")
DATASETS = ("default", "tiny")
MAX_THREADS = 256  # torch.set_num_threads(100000) crashes the process (inside randperm): refuse it up front
MAX_SEED = 2**63 - 1  # torch generators take int64 seeds
MAX_SEEDS = 100_000  # training seeds in one experiment (a typo like '42-4200000000' is refused, not expanded)
NUMERICS = ("native", "portable", "avx512bf16")  # CPU numerics modes (training.numerics)


def _doc(text: str, **extra: Any) -> dict[str, Any]:
    return {"doc": text, **extra}


@dataclass(frozen=True, kw_only=True, slots=True)
class BaseRunConfig:
    """What every run's config offers, whoever trains it: `RunConfig` (the notebook's model) and `EngineRunConfig`
    (your own training) both have model_seed, data_seed, steps, engine, device, threads, numerics, deterministic
    and dtype, and these members.

    It holds no fields on purpose: a dataclass puts a base's fields first, which would move those fields in each
    config's `to_dict()` (and in the artifacts that store it). The fingerprints sort their keys, so field order
    never reaches a run key either way."""

    @property
    def train_seed(self) -> int | None:
        """The notebook's single training seed, when model_seed == data_seed; None otherwise."""
        return self.model_seed if self.model_seed == self.data_seed else None  # type: ignore[attr-defined]

    def with_train_seed(self, seed: int) -> Self:
        """This config with the notebook's train_seed: model_seed = data_seed = seed."""
        return self.replace(model_seed=seed, data_seed=seed)

    def replace(self, **changes: Any) -> Self:
        """`dataclasses.replace` with unknown keys reported as ConfigError (not TypeError)."""
        _check_keys(type(self), changes, type(self).__name__)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """Stable hex digest of every field that can change the run's numbers: the fields of `to_dict()`, less
        those whose metadata says `fingerprint=False` (such as file paths: the same file moved is the same
        data; the run key used for caching adds the data files' content hashes instead)."""
        counted = {f.name for f in dataclasses.fields(self) if f.metadata.get("fingerprint", True)}
        return _digest({k: v for k, v in self.to_dict().items() if k in counted})


@dataclass(frozen=True, kw_only=True, slots=True)
class RunConfig(BaseRunConfig):
    """One training run of the notebook's experiment. Defaults are the notebook's values, except
    `label_mode` (the notebook's labels are off by one; see docs/index.md) and `steps`-independent knobs the
    notebook left implicit, which take the transformers Trainer's defaults."""

    # --- model (GPT2LMHeadModel) ---
    vocab_size: int = field(default=10_000, metadata=_doc("Vocabulary size; must equal the tokenizer's."))
    hidden_dim: int = field(default=64, metadata=_doc("Embedding width n_embd; W is (vocab_size, hidden_dim)."))
    n_layer: int = field(default=2, metadata=_doc("Number of transformer blocks."))
    n_head: int = field(default=2, metadata=_doc("Attention heads; must divide hidden_dim."))
    seq_len: int = field(default=128, metadata=_doc("Tokens per example (n_positions)."))

    # --- the shared initial embedding matrix W ---
    init_seed: int = field(
        default=42, metadata=_doc("Seed of W_initial = randn(V, H) * init_scale, shared by all runs.")
    )
    init_scale: float = field(default=0.02, metadata=_doc("Standard deviation of W_initial."))

    # --- the two seeds the notebook's single train_seed drove ---
    model_seed: int = field(
        default=42, metadata=_doc("torch.manual_seed before building the model: every parameter but W.")
    )
    data_seed: int = field(default=42, metadata=_doc("Seed of the example order (randperm over all examples)."))

    # --- optimisation (HF Trainer defaults where the notebook was silent) ---
    batch_size: int = field(default=32, metadata=_doc("Examples per optimizer step."))
    steps: int = field(default=1000, metadata=_doc("Optimizer steps; the trajectory has steps + 1 entries."))
    lr: float = field(default=1e-3, metadata=_doc("Peak learning rate."))
    weight_decay: float = field(
        default=0.0, metadata=_doc("AdamW weight decay (not applied to biases and LayerNorm, as the Trainer does).")
    )
    adam_beta1: float = field(default=0.9, metadata=_doc("AdamW beta1."))
    adam_beta2: float = field(default=0.999, metadata=_doc("AdamW beta2."))
    adam_eps: float = field(default=1e-8, metadata=_doc("AdamW epsilon."))
    max_grad_norm: float = field(
        default=1.0, metadata=_doc("Global gradient-norm clip (Trainer default 1.0); 0 disables.")
    )
    lr_schedule: str = field(
        default="linear", metadata=_doc("'linear' decay to 0 (Trainer default) or 'constant'.", choices=LR_SCHEDULES)
    )
    warmup_steps: int = field(default=0, metadata=_doc("Linear warm-up steps before the schedule."))
    optim: str = field(
        default="adamw_torch",
        metadata=_doc("'adamw_torch' (per-tensor loop, the notebook's) or 'adamw_torch_fused'.", choices=OPTIMIZERS),
    )

    # --- numerics ---
    dtype: str = field(
        default="bfloat16", metadata=_doc("Parameter dtype (the notebook casts the model to bfloat16).", choices=DTYPES)
    )
    amp: str = field(
        default="bfloat16",
        metadata=_doc("Autocast dtype, as TrainingArguments(bf16=True); 'none' disables.", choices=AMP_DTYPES),
    )
    label_mode: str = field(
        default="next_token",
        metadata=_doc(
            "'next_token' (correct) or 'notebook' (labels=chunk[1:], trains on the token two ahead).",
            choices=LABEL_MODES,
        ),
    )

    # --- execution ---
    engine: str = field(
        default="torch",
        metadata=_doc("'torch' (lean loop) or 'hf' (transformers Trainer); bitwise equal on CPU.", choices=ENGINES),
    )
    device: str = field(default="cpu", metadata=_doc("torch device string: 'cpu', 'cuda', 'cuda:1', 'mps'."))
    threads: int = field(
        default=0,
        metadata=_doc("torch intra-op threads; 0 keeps the process default. Recorded: results may depend on it."),
    )
    deterministic: bool = field(
        default=False, metadata=_doc("torch.use_deterministic_algorithms and friends for the run.")
    )
    compile: str = field(
        default="none",
        metadata=_doc(
            "'none' (eager, bitwise equal to the Trainer) or 'default' (torch.compile; faster, not bitwise).",
            choices=COMPILE_MODES,
        ),
    )
    numerics: str = field(
        default="native",
        metadata=_doc(
            "CPU arithmetic: 'native' (the fastest kernels this CPU has), 'portable' (ATen, oneDNN and MKL pinned to AVX2 "
            "and bf16 products as float32 GEMMs rounded explicitly: one class on every x86-64 CPU with AVX2) or "
            "'avx512bf16' (a faster class for CPUs with AVX-512 BF16). Not in the fingerprint: the numerics class it "
            "yields is measured, recorded and part of the run key.",
            choices=NUMERICS,
            fingerprint=False,
        ),
    )
    head: str = field(
        default="auto",
        metadata=_doc(
            "LM head + loss of the torch engine: 'fused' (row chunks, half the memory; bitwise checked against the model's "
            "own loss before use), 'reference' (the model's forward), 'auto' (fused on CPU where the check passes). "
            "Not in the fingerprint: it never changes a bit of the trajectory.",
            choices=HEADS,
            fingerprint=False,
        ),
    )

    # --- data ---
    dataset: str = field(
        default="default",
        metadata=_doc("Embedded data set used where no path is given: 'default' or 'tiny'.", choices=DATASETS),
    )
    tokenizer_path: str | None = field(
        default=None, metadata=_doc("tokenizers JSON file; None uses the embedded data.", fingerprint=False)
    )
    corpus_path: str | None = field(
        default=None, metadata=_doc("UTF-8 corpus; None uses the embedded data.", fingerprint=False)
    )
    token_mask_path: str | None = field(
        default=None, metadata=_doc("live/dead mask safetensors; None computes it from the corpus.", fingerprint=False)
    )
    allow_unknown_tokens: bool = field(
        default=False,
        metadata=_doc(
            "Train corpus text the tokenizer has no token for as its unknown token (with a warning) instead of refusing "
            "the corpus. Not in the fingerprint: it decides whether a corpus is accepted, never what an accepted one "
            "trains on (the data files' hashes are in the run key).",
            fingerprint=False,
        ),
    )

    # --- recording (the notebook's RECORD_CONFIG) ---
    record_W: bool = field(default=True, metadata=_doc("Record W after every step (steps + 1, V, H)."))
    record_grads: bool = field(default=False, metadata=_doc("Record the gradient of W at every step."))
    record_momentum: bool = field(default=False, metadata=_doc("Record Adam's exp_avg of W at every step."))
    record_variance: bool = field(default=False, metadata=_doc("Record Adam's exp_avg_sq of W at every step."))
    record_logits: bool = field(default=False, metadata=_doc("Record logits on a fixed probe batch at every step."))
    probe_examples: int = field(default=2, metadata=_doc("Examples in the fixed probe batch for record_logits."))

    def __post_init__(self) -> None:
        _check_types(self)
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices is not None and getattr(self, f.name) not in choices:
                raise ConfigError(
                    f"{f.name!r} must be one of {', '.join(map(repr, choices))} (got {getattr(self, f.name)!r})."
                )
        for name in (
            "vocab_size",
            "hidden_dim",
            "n_layer",
            "n_head",
            "seq_len",
            "batch_size",
            "steps",
            "probe_examples",
        ):
            _require(name, getattr(self, name) >= 1, "an integer >= 1", getattr(self, name))
        _require("warmup_steps", self.warmup_steps >= 0, "an integer >= 0", self.warmup_steps)
        _require("threads", 0 <= self.threads <= MAX_THREADS, f"an integer in 0..{MAX_THREADS}", self.threads)
        for name in ("lr", "init_scale", "adam_eps"):
            value = getattr(self, name)
            _require(name, math.isfinite(value) and value > 0, "a finite number > 0", value)
        for name in ("weight_decay", "max_grad_norm"):
            value = getattr(self, name)
            _require(name, math.isfinite(value) and value >= 0, "a finite number >= 0", value)
        for name in ("adam_beta1", "adam_beta2"):
            value = getattr(self, name)
            _require(name, 0 <= value < 1, "a number in [0, 1)", value)
        for name in ("init_seed", "model_seed", "data_seed"):
            value = getattr(self, name)
            _require(name, 0 <= value < 2**63, "an integer in [0, 2**63)", value)
        if self.hidden_dim % self.n_head:
            raise ConfigError(
                f"'hidden_dim' must be divisible by 'n_head' (got hidden_dim={self.hidden_dim}, n_head={self.n_head})."
            )
        if self.warmup_steps > self.steps:
            raise ConfigError(
                f"'warmup_steps' must be <= 'steps' (got warmup_steps={self.warmup_steps}, steps={self.steps})."
            )
        if (self.tokenizer_path is None) != (self.corpus_path is None):
            raise ConfigError(
                "'tokenizer_path' and 'corpus_path' go together: give both to use your own data, or neither for the "
                f"embedded data (got tokenizer_path={self.tokenizer_path!r}, corpus_path={self.corpus_path!r})."
            )
        if self.token_mask_path is not None and self.corpus_path is None:
            raise ConfigError(
                "'token_mask_path' needs 'tokenizer_path' and 'corpus_path' (the embedded data computes its own mask); "
                f"got token_mask_path={self.token_mask_path!r} alone."
            )
        parse_device(self.device)  # ConfigError naming the expected forms

    # train_seed, with_train_seed, replace, to_dict, fingerprint: BaseRunConfig's

    @classmethod
    def from_dict(
        cls, data: Mapping[str, Any], *, base: "RunConfig | None" = None, source: str = "config"
    ) -> "RunConfig":
        """Build from a mapping; unknown keys and wrong types raise ConfigError naming the key."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source}: expected a table of RunConfig fields (got {type(data).__name__}).")
        _check_keys(cls, data, source)
        start = base if base is not None else cls()
        return dataclasses.replace(start, **dict(data))


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
            if hi_i < lo_i or hi_i - lo_i >= MAX_SEEDS:
                raise ValueError(part)
            seeds.extend(range(lo_i, hi_i + 1))
        else:
            seeds.append(int(part))
        if len(seeds) > MAX_SEEDS:
            raise ValueError(raw)
    if not seeds or any(not 0 <= s <= MAX_SEED for s in seeds) or len(set(seeds)) != len(seeds):
        raise ValueError(raw)
    return tuple(seeds)


def notebook_config(train_seed: int = 42) -> RunConfig:
    """The notebook, parameter for parameter: its label defect, the transformers Trainer, 1000 steps."""
    return RunConfig(label_mode="notebook", engine="hf").with_train_seed(train_seed)


@dataclass(frozen=True, kw_only=True, slots=True)
class ExperimentConfig:
    """The Flannel 6 experiment: `n_runs` trainings of `run` with training seeds
    base_train_seed, base_train_seed + 1, ... on each of `devices`."""

    run: RunConfig = field(default_factory=RunConfig, metadata=_doc("Template run; its seeds are replaced per run."))
    n_runs: int = field(default=10, metadata=_doc("Number of training seeds."))
    base_train_seed: int = field(default=42, metadata=_doc("First training seed; the others follow consecutively."))
    devices: tuple[str, ...] | None = field(
        default=None,
        metadata=_doc(
            "Devices the claims run on ('cpu', 'cuda', 'cuda:N', 'mps'); a requested device that is absent is a skip "
            "with the reason. None: cpu, plus cuda and mps where present."
        ),
    )

    def __post_init__(self) -> None:
        _check_types(self)
        _require("n_runs", self.n_runs >= 1, "an integer >= 1", self.n_runs)
        _require(
            "base_train_seed",
            0 <= self.base_train_seed <= MAX_SEED - self.n_runs + 1,
            f"an integer in 0..{MAX_SEED - self.n_runs + 1} (the last of {self.n_runs} seeds must fit in int64)",
            self.base_train_seed,
        )
        if self.devices is not None:
            _require("devices", len(self.devices) >= 1, "at least one device", list(self.devices))
            names = [str(parse_device(d)) for d in self.devices]  # the one device parser's message
            if len(set(names)) != len(names):
                raise ConfigError(f"'devices' must not repeat a device (got {list(self.devices)}).")

    @property
    def train_seeds(self) -> tuple[int, ...]:
        return tuple(range(self.base_train_seed, self.base_train_seed + self.n_runs))

    def replace(self, **changes: Any) -> "ExperimentConfig":
        _check_keys(type(self), changes, "ExperimentConfig")
        return dataclasses.replace(self, **changes)

    def fingerprint(self) -> str:
        return _digest(
            {
                "run": self.run.fingerprint(),
                "n_runs": self.n_runs,
                "base_train_seed": self.base_train_seed,
                "devices": None if self.devices is None else list(self.devices),
            }
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "config") -> "ExperimentConfig":
        """Top-level keys are RunConfig fields; an optional `preset` ('notebook', 'ci', 'default')
        is the starting point; the optional `[experiment]` table holds n_runs, base_train_seed, devices.
        A `[run]` table is accepted as an alternative home for the RunConfig fields."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source}: expected a TOML table (got {type(data).__name__}).")
        data = dict(data)
        preset = data.pop("preset", "default")
        if preset not in PRESETS:
            raise ConfigError(f"{source}: 'preset' must be one of {', '.join(map(repr, PRESETS))} (got {preset!r}).")
        base = PRESETS[preset]()
        exp_table = data.pop("experiment", {})
        run_table = data.pop("run", {})
        if not isinstance(exp_table, Mapping):
            raise ConfigError(f"{source}: 'experiment' must be a table (got {type(exp_table).__name__}).")
        if not isinstance(run_table, Mapping):
            raise ConfigError(f"{source}: 'run' must be a table (got {type(run_table).__name__}).")
        both = set(run_table) & set(data)
        if both:
            raise ConfigError(f"{source}: {sorted(both)} given both at top level and in [run]; give each once.")
        run = RunConfig.from_dict({**data, **run_table}, base=base.run, source=source)
        exp = dict(exp_table)
        _check_keys(cls, exp, f"{source} [experiment]", exclude=("run",))
        if "devices" in exp:
            devices = exp["devices"]
            if isinstance(devices, str):
                devices = [d.strip() for d in devices.split(",") if d.strip()]
            if not isinstance(devices, (list, tuple)) or not all(isinstance(d, str) for d in devices):
                raise ConfigError(f"{source} [experiment]: 'devices' must be a list of device names (got {devices!r}).")
            exp["devices"] = tuple(devices)
        return dataclasses.replace(base, run=run, **exp)

    @classmethod
    def from_toml(cls, path: str | os.PathLike[str]) -> "ExperimentConfig":
        from flannel_repro.safeio import read_regular

        p = Path(path)
        try:  # a regular file only: a FIFO or a device there never blocks or fills memory
            raw = read_regular(p, "a config file (TOML)", ConfigError, max_bytes=16 << 20)
        except FileNotFoundError:
            raise ConfigError(f"config file {str(p)!r} does not exist.") from None
        try:
            data = tomllib.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"config file {str(p)!r} is not valid TOML: {exc}.") from None
        try:
            cfg = cls.from_dict(data, source=str(p))
        except ConfigError as exc:
            if str(p) in str(exc):
                raise
            raise ConfigError(f"{p}: {exc}") from None  # every error from a file names the file
        return cfg.replace(run=_resolve_paths(cfg.run, p.parent))


def _resolve_paths(run: RunConfig, root: Path) -> RunConfig:
    """Relative data paths in a TOML file are relative to that file, not to the working directory."""
    changes = {}
    for name in ("tokenizer_path", "corpus_path", "token_mask_path"):
        value = getattr(run, name)
        if value is not None and not os.path.isabs(value):
            changes[name] = str((root / value).resolve())
    return run.replace(**changes) if changes else run


def _ci_experiment() -> ExperimentConfig:
    """The default scale of the test suite: the notebook's experiment, shortened to fit CI."""
    return ExperimentConfig(run=RunConfig(steps=20), n_runs=4)


def _notebook_experiment() -> ExperimentConfig:
    return ExperimentConfig(run=notebook_config(42), n_runs=10, base_train_seed=42)


def _full_experiment() -> ExperimentConfig:
    """The notebook's scale (10 runs x 1000 steps) with correct labels and the lean engine."""
    return ExperimentConfig(run=RunConfig(), n_runs=10, base_train_seed=42)


PRESETS: dict[str, typing.Callable[[], ExperimentConfig]] = {
    "default": _ci_experiment,
    "ci": _ci_experiment,
    "full": _full_experiment,
    "notebook": _notebook_experiment,
}


ENGINE_RUN_KIND = "engine"  # `kind` in an EngineRunConfig's dict: how an artifact's config is told from a RunConfig


@dataclass(frozen=True, kw_only=True, slots=True)
class EngineRunConfig(BaseRunConfig):
    """One run of *your* training: a registered engine (`flannel_repro.register_engine`) or a loop recorded
    with `flannel_repro.TrajectoryRecorder`. What the suite needs to know of a run, and your own
    hyperparameters in `params` (JSON values: they enter the fingerprint and the run key)."""

    engine: str = field(metadata=_doc("The registered engine's name ('custom' for a loop recorded by hand)."))
    steps: int = field(metadata=_doc("Optimizer steps; the artifact holds steps + 1 rows (row 0: the initial state)."))
    model_seed: int = field(default=0, metadata=_doc("Seed of the model's initialisation."))
    data_seed: int = field(default=0, metadata=_doc("Seed of the data order."))
    device: str = field(default="cpu", metadata=_doc("Where it trains: cpu, cuda, cuda:N, mps."))
    threads: int = field(default=0, metadata=_doc("torch intra-op threads (0: leave as is)."))
    numerics: str = field(
        default="native", metadata=_doc("CPU numerics mode (see RunConfig.numerics).", choices=NUMERICS)
    )
    deterministic: bool = field(default=True, metadata=_doc("torch.use_deterministic_algorithms and friends."))
    dtype: str = field(default="float32", metadata=_doc("dtype of the recorded tensor (informational)."))
    params: Mapping[str, Any] = field(default_factory=dict, metadata=_doc("The engine's own hyperparameters."))

    def __post_init__(self) -> None:
        _require("engine", isinstance(self.engine, str) and bool(self.engine.strip()), "a non-empty name", self.engine)
        for name in ("steps", "model_seed", "data_seed", "threads"):
            value = getattr(self, name)
            _require(
                name,
                isinstance(value, int) and not isinstance(value, bool) and value >= (1 if name == "steps" else 0),
                "an integer >= 1" if name == "steps" else "an integer >= 0",
                value,
            )
        _require("numerics", self.numerics in NUMERICS, " or ".join(map(repr, NUMERICS)), self.numerics)
        if not isinstance(self.params, Mapping):
            raise ConfigError(
                f"'params' must be a table of the engine's hyperparameters (got {type(self.params).__name__})."
            )
        try:
            frozen = json.loads(json.dumps(dict(self.params), sort_keys=True, allow_nan=False))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"'params' must hold JSON values (numbers, strings, lists, tables): {exc}.") from None
        object.__setattr__(self, "params", types.MappingProxyType(frozen))  # hashable content, immutable

    @property
    def kind(self) -> str:
        return ENGINE_RUN_KIND

    # train_seed, with_train_seed and fingerprint (every field; `kind` is not one): BaseRunConfig's

    def replace(self, **changes: Any) -> "EngineRunConfig":
        """Fields by name; any other keyword is one of the engine's params."""
        names = {f.name for f in dataclasses.fields(self)}
        params = {k: v for k, v in changes.items() if k not in names}
        fields_ = {k: v for k, v in changes.items() if k in names}
        if params:
            fields_["params"] = {**dict(fields_.get("params", self.params)), **params}
        return dataclasses.replace(self, **fields_)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["params"] = dict(self.params)
        return {"kind": ENGINE_RUN_KIND, **out}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "config") -> "EngineRunConfig":
        if not isinstance(data, Mapping) or data.get("kind") != ENGINE_RUN_KIND:
            raise ConfigError(f"{source}: expected an engine run's config (kind = {ENGINE_RUN_KIND!r}).")
        body = {k: v for k, v in data.items() if k != "kind"}
        _check_keys(cls, body, source)
        return cls(**body)


def run_config_from_dict(data: Mapping[str, Any], *, source: str = "config") -> "RunConfig | EngineRunConfig":
    """An artifact's config: an EngineRunConfig when its dict says so, else the notebook's RunConfig."""
    if isinstance(data, Mapping) and data.get("kind") == ENGINE_RUN_KIND:
        return EngineRunConfig.from_dict(data, source=source)
    return RunConfig.from_dict(data, source=source)


# --- validation helpers ---------------------------------------------------------------------------


def _require(name: str, ok: bool, expected: str, got: Any) -> None:
    if not ok:
        raise ConfigError(f"{name!r} must be {expected} (got {got!r}).")


def _check_keys(cls: type, data: Mapping[str, Any], source: str, exclude: tuple[str, ...] = ()) -> None:
    known = {f.name for f in dataclasses.fields(cls)} - set(exclude)
    unknown = sorted(set(data) - known)
    if unknown:
        import difflib

        hints = []
        for key in unknown:
            close = difflib.get_close_matches(str(key), sorted(known), n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ConfigError(f"{source}: unknown key(s) {', '.join(hints)}; known keys: {', '.join(sorted(known))}.")


def _type_ok(value: Any, annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if origin is tuple:
        return isinstance(value, tuple) and all(_type_ok(v, typing.get_args(annotation)[0]) for v in value)
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True


_HINTS: dict[type, dict[str, Any]] = {}


def _check_types(obj: Any) -> None:
    cls = type(obj)
    hints = _HINTS.get(cls)
    if hints is None:
        hints = _HINTS[cls] = typing.get_type_hints(cls)
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        annotation = hints[f.name]
        if not _type_ok(value, annotation):
            expected = getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")
            raise ConfigError(f"{f.name!r} must be of type {expected} (got {value!r} of type {type(value).__name__}).")
        if annotation is float and isinstance(value, int):
            object.__setattr__(obj, f.name, float(value))  # TOML writes 1 for 1.0; keep the field a float


def _digest(payload: Any) -> str:
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
