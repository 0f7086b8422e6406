"""Registered engines: your training function, trained by the `trajectory` fixture like the Flannel 6 runs.

```python
from flannel_repro import register_engine

@register_engine("digits-mlp", steps=200, params={"lr": 0.05, "hidden": 32})
def train_digits(run):
    torch.manual_seed(run.model_seed)
    model = ...; opt = ...
    with run.recorder({"fc1": model[0].weight}, optimizer=opt, state={"model": model, "optimizer": opt}) as rec:
        for step in range(rec.start + 1, run.steps + 1):
            ...
            rec.step(loss=loss.item(), batch=indices)
```

Then `trajectory(42, engine="digits-mlp")` in a test trains it once per run key (shared between xdist
workers through the same store and file locks), and claims, snapshots, divergence and the report read
it. The run key covers the run's config (seeds, steps, params, device, numerics mode), the engine's
source file and `data` hashes, flannel-repro's code and the packages, the device and the numerics
class: editing the engine's file trains its runs again.

An engine function must be importable by module and name (defined at a module's top level) so a fresh
process can run it: `resume_at` trains the run stopped in one process and resumed in another.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from flannel_repro.config import EngineRunConfig
from flannel_repro.errors import ConfigError


@dataclass(frozen=True)
class Engine:
    name: str
    fn: Callable[["EngineRun"], None]
    steps: int
    params: Mapping[str, Any] = field(default_factory=dict)
    data: Callable[[], Mapping[str, str]] | None = None  # content hashes of the data it trains on
    module: str = ""
    source_sha256: str = ""

    def config(self, **changes: Any) -> EngineRunConfig:
        base = EngineRunConfig(engine=self.name, steps=self.steps, params=dict(self.params))
        return base.replace(**changes) if changes else base

    def key_data(self) -> dict[str, str]:
        """What of the engine enters the run key: its source file's hash and its data's hashes."""
        out = {"engine_source": self.source_sha256}
        if self.data is not None:
            out.update({str(k): str(v) for k, v in dict(self.data()).items()})
        return out


_ENGINES: dict[str, Engine] = {}
BUILTIN = ("torch", "hf")


def register_engine(
    name: str,
    *,
    steps: int,
    params: Mapping[str, Any] | None = None,
    data: Callable[[], Mapping[str, str]] | None = None,
) -> Callable[[Callable], Callable]:
    """Decorator: register `fn(run)` as the engine `name` (default `steps` and `params` of its runs; `data`
    returns the content hashes of the data it trains on, which enter the run key)."""
    if not isinstance(name, str) or not name.strip() or name in BUILTIN:
        raise ConfigError(
            f"register_engine: expected a new engine name, got {name!r} (not empty, not one of {BUILTIN})."
        )
    EngineRunConfig(engine=name, steps=steps, params=dict(params or {}))  # validates steps and params now

    def wrap(fn: Callable[["EngineRun"], None]) -> Callable[["EngineRun"], None]:
        module = getattr(fn, "__module__", "")
        if "<locals>" in getattr(fn, "__qualname__", "<locals>"):
            raise ConfigError(
                f"register_engine({name!r}): {fn.__qualname__} must be defined at a module's top level, "
                "so a fresh process can import it (resume_at runs it in two)."
            )
        try:
            source = Path(inspect.getsourcefile(fn) or "").read_bytes()
        except (OSError, TypeError):
            source = inspect.getsource(fn).encode()
        previous = _ENGINES.get(name)
        if previous is not None and (previous.module, previous.fn.__qualname__) != (module, fn.__qualname__):
            raise ConfigError(
                f"register_engine: {name!r} is already registered by {previous.module}.{previous.fn.__qualname__}."
            )
        _ENGINES[name] = Engine(
            name=name,
            fn=fn,
            steps=steps,
            params=dict(params or {}),
            data=data,
            module=module,
            source_sha256=hashlib.sha256(source).hexdigest(),
        )
        return fn

    return wrap


def get_engine(name: str) -> Engine:
    try:
        return _ENGINES[name]
    except KeyError:
        known = ", ".join(sorted(_ENGINES)) or "none registered"
        raise ConfigError(
            f"engine {name!r} is not registered (registered: {known}); register it with "
            "@flannel_repro.register_engine(...) in a module your conftest.py imports."
        ) from None


def is_registered(name: str) -> bool:
    return name in _ENGINES


@dataclass
class EngineRun:
    """What an engine function is given: the run's config and the recorder to record it with."""

    config: EngineRunConfig
    path: Path
    metadata: dict[str, Any]
    run_key: str
    checkpoint_every: int = 0
    stop_at: int | None = None
    recorders: list[Any] = field(default_factory=list)

    @property
    def model_seed(self) -> int:
        return self.config.model_seed

    @property
    def data_seed(self) -> int:
        return self.config.data_seed

    @property
    def steps(self) -> int:
        return self.config.steps

    @property
    def device(self) -> str:
        return self.config.device

    @property
    def params(self) -> Mapping[str, Any]:
        return self.config.params

    def recorder(self, tensors: Mapping[str, Any], **kwargs: Any) -> Any:
        """A TrajectoryRecorder for this run (its path, config, run key and checkpoint policy set)."""
        from flannel_repro.training.own_training import TrajectoryRecorder

        if self.recorders:
            raise ConfigError(f"engine {self.config.engine!r}: one recorder per run (recorder() was called twice).")
        stateful = bool(kwargs.get("state"))
        if self.stop_at is not None and not stateful:
            raise ConfigError(
                f"engine {self.config.engine!r}: resume_at needs the training state to checkpoint: pass "
                "state={'model': ..., 'optimizer': ...} to run.recorder(...)."
            )
        # without its state a run cannot checkpoint: it trains from the start when interrupted, as before
        rec = TrajectoryRecorder(
            self.path,
            tensors,
            steps=self.steps,
            config=self.config,
            metadata=self.metadata,
            checkpoint_every=self.checkpoint_every if stateful else 0,
            stop_at=self.stop_at,
            run_key=self.run_key,
            **kwargs,
        )
        self.recorders.append(rec)
        return rec


def train_engine(
    config: EngineRunConfig,
    path: str | Path,
    *,
    metadata: Mapping[str, Any] | None = None,
    checkpoint_every: int = 0,
    stop_at: int | None = None,
    run_key: str | None = None,
) -> float:
    """Train `config` with its registered engine into the artifact `path`; the wall time in seconds.

    The engine runs with the config's thread count, deterministic mode and numerics mode in force."""
    from flannel_repro.training.determinism import deterministic_mode, torch_threads
    from flannel_repro.training.harness import check_device
    from flannel_repro.training.numerics import apply as apply_numerics, arithmetic

    engine = get_engine(config.engine)
    if stop_at is not None and not 1 <= stop_at <= config.steps:
        raise ConfigError(f"'stop_at' must be a step in [1, {config.steps}] (got {stop_at}).")
    check_device(config.device)
    apply_numerics(config.numerics, config.device)
    meta = dict(metadata or {})
    run = EngineRun(
        config=config,
        path=Path(path),
        metadata=meta,
        run_key=run_key if run_key is not None else str(meta.get("run_key", "")),
        checkpoint_every=checkpoint_every,
        stop_at=stop_at,
    )
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch_threads(config.threads))
        stack.enter_context(deterministic_mode(config.deterministic))
        stack.enter_context(arithmetic(config.numerics, config.device))
        engine.fn(run)
    if not run.recorders or not Path(path).exists():
        raise ConfigError(
            f"engine {config.engine!r} returned without recording its run: call run.recorder(...) and "
            f"step() once per optimizer step inside its `with` block ({path} was not written)."
        )
    return time.perf_counter() - start


def import_paths(config: EngineRunConfig) -> list[str]:
    """The modules a fresh process imports to have this config's engine registered."""
    module = get_engine(config.engine).module
    return [module] if module and module != "__main__" and module in sys.modules else []
