"""Record your own training: named tensors and the loss after every optimizer step, into the same
streaming, atomic safetensors artifacts the Flannel 6 runs use, so every tool here reads them.

Three ways in (docs/your-own-training.md):

* `TrajectoryRecorder`, a context manager for a plain PyTorch loop;
* `FlannelCallback`, a `transformers.TrainerCallback` for the Trainer;
* `flannel_repro.register_engine`, a training function the `trajectory` fixture can train
  (training.engines), which records through the same recorder.

Layout: the first named tensor (or `primary=`) is the run's "W" (2-D: a tensor of shape (d0, ...) is
stored as (d0, rest), a vector as one row), which the digests, divergence functions, snapshots and report
read; every other tensor is stored whole per step under `tensor.<name>`. Row t is the state after
optimizer step t; row 0 is the state before the first step. `batch_starts` holds what the step was
given as `batch=` (the identity of its examples: the data order), or nothing.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from flannel_repro.config import EngineRunConfig
from flannel_repro.errors import ArtifactError, ConfigError, ResumeError
from flannel_repro.storage import layout
from flannel_repro.storage.format import DIGEST_ALGO, TensorSpec, digest_as_tensor, digest_tensor
from flannel_repro.storage.writer import ArtifactWriter
from flannel_repro.training.run_recorder import UpdateTracker

TENSOR_PREFIX = "tensor."  # artifact key of a recorded tensor other than the primary one

TensorSource = torch.Tensor | Callable[[], torch.Tensor]


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """The primary tensor as the 2-D (rows, columns) the run layout's W is."""
    if t.ndim == 2:
        return t
    if t.ndim <= 1:
        return t.reshape(1, -1)
    return t.reshape(t.shape[0], -1)


class TrajectoryRecorder:
    """Records named tensors and the loss after every optimizer step of any training loop.

    ```python
    with TrajectoryRecorder("run.safetensors", {"fc1": model.fc1.weight}, steps=100,
                            config={"lr": 0.1}, optimizer=opt) as rec:
        for step in range(rec.start + 1, 101):
            ...  # forward, backward, opt.step()
            rec.step(loss=loss.item())
    ```

    On entering, the initial state is row 0. `step()` records the state after the next optimizer step.
    Leaving the block after the last step publishes the artifact atomically; leaving it early or with an
    exception publishes nothing.

    * `tensors`: name -> tensor (read at every step: pass the parameter itself) or a function returning
      one. The first is the primary tensor (see the module docstring), unless `primary` names another.
    * `config`: an `EngineRunConfig`, or a table of your hyperparameters (engine 'custom').
    * `optimizer`: an Adam-like optimizer of the primary tensor, for the update statistics (the share of
      proposed updates lost to rounding, as in the bf16 stall diagnostic); without it only the share of
      entries that changed is known.
    * `batch_size`: the length of the `batch=` each step is given (the indices of its examples), recorded
      as the data order; 0 records none.
    * `state` and `checkpoint_every`: the objects that make up the training state (model, optimizer,
      scheduler, torch.Generators) and how often to checkpoint them. A run that was killed or stopped then
      resumes when it is recorded again: `rec.start` is the step it continues after (0 on a fresh start),
      the objects hold that step's state, and the artifact ends bitwise equal to an uninterrupted run's.
    """

    def __init__(
        self,
        path: str | Path,
        tensors: Mapping[str, TensorSource],
        *,
        steps: int,
        config: EngineRunConfig | Mapping[str, Any] | None = None,
        primary: str | None = None,
        optimizer: Any = None,
        batch_size: int = 0,
        live_mask: torch.Tensor | None = None,
        data: Mapping[str, Any] | None = None,
        metadata: Mapping[str, Any] | None = None,
        state: Mapping[str, Any] | None = None,
        checkpoint_every: int = 0,
        stop_at: int | None = None,
        run_key: str = "",
    ) -> None:
        from flannel_repro.training.resume import Checkpointer, TrainingState

        self.path = Path(path)
        if not isinstance(tensors, Mapping) or not tensors:
            raise ConfigError(f"{self.path}: 'tensors' must map names to tensors (got {tensors!r}).")
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ConfigError(f"{self.path}: 'steps' must be an integer >= 1 (got {steps!r}).")
        self.sources = dict(tensors)
        for name, src in self.sources.items():
            if not isinstance(name, str) or not name:
                raise ConfigError(f"{self.path}: tensor names must be non-empty strings (got {name!r}).")
            if not isinstance(src, torch.Tensor) and not callable(src):
                raise ConfigError(
                    f"{self.path}: tensors[{name!r}] must be a tensor or a function returning one "
                    f"(got {type(src).__name__})."
                )
        self.primary = primary if primary is not None else next(iter(self.sources))
        if self.primary not in self.sources:
            raise ConfigError(
                f"{self.path}: primary={self.primary!r} is not one of the tensors {sorted(self.sources)}."
            )
        if config is None or isinstance(config, Mapping):
            config = EngineRunConfig(engine="custom", steps=steps, params=dict(config or {}))
        if not isinstance(config, EngineRunConfig):
            raise ConfigError(
                f"{self.path}: 'config' must be an EngineRunConfig or a table of hyperparameters "
                f"(got {type(config).__name__})."
            )
        if config.steps != steps:
            raise ConfigError(f"{self.path}: steps={steps} but config.steps={config.steps}; they must agree.")
        if not isinstance(batch_size, int) or batch_size < 0:
            raise ConfigError(f"{self.path}: 'batch_size' must be an integer >= 0 (got {batch_size!r}).")
        self.config, self.steps, self.batch_size = config, steps, batch_size
        self.optimizer = optimizer
        self._state = TrainingState(state)
        self._policy = Checkpointer(self.path, run_key, checkpoint_every, stop_at)
        if self._policy.enabled and not self._state.objects:
            raise ConfigError(
                f"{self.path}: checkpoints need the training state: pass state={{'model': ..., 'optimizer': ...}}}}."
            )
        # a run's identity for resuming: the store's run key, else the config (same path, same config)
        self._run_key = run_key or self.config.fingerprint()
        self._policy.run_key = self._run_key
        self._live_mask = live_mask
        self._data = dict(data or {})
        self._extra_meta = dict(metadata or {})
        self.writer: ArtifactWriter | None = None
        self._written = 0
        self._tracker = UpdateTracker()
        self._hook = None
        self.start = 0
        self.last_loss = math.nan
        self.resumed_from: int | None = None
        self.resume_discarded = ""  # why a checkpoint of this run was not resumed ("" when none was discarded)
        self._resume: Any = None
        self._prior: dict[int, bytes] = {}  # after a resume: step -> digest the stopped run recorded there

    # -- reading the tensors -------------------------------------------------------------------

    def _read(self, name: str) -> torch.Tensor:
        src = self.sources[name]
        t = src() if callable(src) and not isinstance(src, torch.Tensor) else src
        if not isinstance(t, torch.Tensor):
            raise ArtifactError(f"{self.path}: tensors[{name!r}] returned {type(t).__name__}, expected a tensor.")
        return t.detach()

    def _specs(self, shapes: Mapping[str, tuple[torch.dtype, tuple[int, ...]]]) -> list[TensorSpec]:
        dtype, shape = shapes[self.primary]
        rows = _as_rows(torch.empty(shape, device="meta")).shape
        specs = layout.run_artifact_specs(
            steps=self.steps, vocab_size=rows[0], hidden_dim=rows[1], batch_size=self.batch_size, dtype=dtype
        )
        for name, (dt, shp) in shapes.items():
            if name != self.primary:
                specs.append(TensorSpec(TENSOR_PREFIX + name, dt, (self.steps + 1, *shp)))
        return specs

    # -- lifecycle --------------------------------------------------------------------------------

    def __enter__(self) -> "TrajectoryRecorder":
        from flannel_repro.training.determinism import environment_fingerprint
        from flannel_repro.training.numerics import numerics_info
        from flannel_repro.training.resume import check_restored, discard, find_resumable, prior_digests, resumable_path

        self._started = time.perf_counter()
        current = {name: self._read(name) for name in self.sources}
        shapes = {name: (t.dtype, tuple(t.shape)) for name, t in current.items()}
        W = _as_rows(current[self.primary])
        live = self._live_mask if self._live_mask is not None else torch.ones(W.shape[0], dtype=torch.bool)
        if live.dtype != torch.bool or tuple(live.shape) != (W.shape[0],):
            raise ConfigError(
                f"{self.path}: live_mask must be a bool tensor of shape ({W.shape[0]},) (one entry per "
                f"row of {self.primary!r}), got {live.dtype} {tuple(live.shape)}."
            )
        n_live = int(live.sum())
        resume, self.resume_discarded = find_resumable(self.path, self._run_key) if self._state.objects else (None, "")
        if self.optimizer is not None and hasattr(self.optimizer, "register_step_pre_hook"):
            param = self.sources[self.primary]
            if isinstance(param, torch.Tensor):
                self._hook = self.optimizer.register_step_pre_hook(
                    lambda opt, args, kwargs: self._tracker.before_step(param, opt)
                )
        if resume is not None:
            k = resume.step
            self.writer = ArtifactWriter(
                self.path,
                self._specs(shapes),
                dict(resume.info["artifact_metadata"]),
                checksum_exclude=(layout.KEY_W,),
                temp_path=resumable_path(self.path),
            )
            try:  # the partial file's rows through k must hash as they did when the checkpoint was taken
                self.writer.reopen(layout.written_through(self.writer.specs, k), resume.info["partial_digests"])
            except ResumeError as exc:
                resume, self.resume_discarded = None, discard(self.path, str(exc))
        if resume is not None:
            assert self.writer is not None  # reopened above for this checkpoint
            self._prior = prior_digests(self.writer, layout.KEY_DIGESTS, k + 1, self.steps + 1)
            self._resume = resume
            self._state.restore(resume.state)
            try:
                check_restored(resume, self._read(self.primary))
            except ResumeError as exc:  # the objects now hold a state that is not the checkpoint's: start again
                self.writer.__exit__(type(exc), exc, None)
                self.writer = None
                discard(self.path, str(exc), warn=False)
                raise ResumeError(f"{exc} The checkpoint was discarded: run the training again, from step 0.") from None
            self._tracker.restore(self._param_for_tracker(), self.optimizer)
            self._written = k + 1
            self.start = self.resumed_from = k
            self.last_loss = float(resume.info.get("last_loss", math.nan))
            return self
        device = str(current[self.primary].device)
        env = environment_fingerprint(
            device,
            numerics=numerics_info(
                device,
                threads=torch.get_num_threads(),
                deterministic=self.config.deterministic,
                mode=self.config.numerics,
            ),
        )
        extra = {
            "env": env,
            "engine": self.config.engine,
            "recorded": {
                "primary": self.primary,
                "tensors": {
                    name: {"dtype": str(dt).removeprefix("torch."), "shape": list(shp)}
                    for name, (dt, shp) in shapes.items()
                },
            },
            **self._extra_meta,
        }
        if self.resume_discarded:
            extra["resume_discarded"] = self.resume_discarded[:2000]
        meta = layout.run_metadata(
            self.config.to_dict(),
            {"n_live": n_live, "n_dead": W.shape[0] - n_live, **self._data},
            digest_algo=DIGEST_ALGO,
            **{k: v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in extra.items()},
        )
        temp = resumable_path(self.path) if self._policy.enabled else None
        self.writer = ArtifactWriter(
            self.path, self._specs(shapes), meta, checksum_exclude=(layout.KEY_W,), temp_path=temp
        )
        self.writer.__enter__()
        self.writer.write(layout.KEY_LIVE_MASK, live.contiguous())
        self._write_row(0, math.nan, None)
        self._written = 1
        return self

    def _param_for_tracker(self) -> torch.Tensor:
        src = self.sources[self.primary]
        return src if isinstance(src, torch.Tensor) else self._read(self.primary)

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self.writer is None:
            return
        if exc_type is None and self._written == self.steps + 1:
            wall = time.perf_counter() - self._started
            done = self.steps - (self.resumed_from or 0)
            extra = {
                "final_loss": repr(self.last_loss),
                "wall_time_s": f"{wall:.3f}",
                "steps_per_s": f"{done / wall if wall > 0 else math.nan:.4f}",
                "threads": str(torch.get_num_threads()),
            }
            if self.resumed_from is not None:
                extra["resumed_from"] = str(self.resumed_from)
            self.writer.finish(extra)
            self._policy.done()
            return
        self.writer.__exit__(exc_type, exc, tb)  # discards the partial file (kept once a checkpoint refers to it)
        if exc_type is None:
            raise ArtifactError(
                f"{self.path}: recorded {self._written - 1} of {self.steps} steps; nothing was "
                "published (call step() once per optimizer step)."
            )

    # -- per step ---------------------------------------------------------------------------------

    def _write_row(self, t: int, loss: float, batch: Any) -> None:
        assert self.writer is not None
        W = _as_rows(self._read(self.primary)).to("cpu")
        digest = digest_tensor(W)
        if self._prior:  # resumed: the stopped run's steps after its checkpoint must come out again
            from flannel_repro.training.resume import check_resumed_digest

            try:
                check_resumed_digest(self._resume, self._prior, t, digest, self.writer.temp_path)
            except ResumeError as exc:  # the objects are past the checkpoint: this process cannot start again
                from flannel_repro.training.resume import discard

                discard(self.path, str(exc), warn=False)
                raise ResumeError(f"{exc} The checkpoint was discarded: run the training again, from step 0.") from None
        self.writer.write_row(layout.KEY_DIGESTS, t, digest_as_tensor(digest))
        self.writer.write_row(layout.KEY_W, t, W.contiguous())
        self.writer.write_row(layout.KEY_LOSSES, t, torch.tensor(loss, dtype=torch.float32))
        self.writer.write_row(
            layout.KEY_UPDATES, t, self._tracker.after_step(self._param_for_tracker(), self.optimizer)
        )
        for name in self.sources:
            if name != self.primary:
                self.writer.write_row(TENSOR_PREFIX + name, t, self._read(name).to("cpu").contiguous())
        if t > 0 and self.batch_size:
            if batch is None:
                raise ArtifactError(
                    f"{self.path}: step {t}: batch_size={self.batch_size} was declared, so step() needs "
                    "batch= (the indices of the step's examples)."
                )
            b = torch.as_tensor(batch, dtype=torch.int64).reshape(-1)
            if b.numel() != self.batch_size:
                raise ArtifactError(
                    f"{self.path}: step {t}: expected batch= of {self.batch_size} example indices, got {b.numel()}."
                )
            self.writer.write_row(layout.KEY_BATCH_STARTS, t - 1, b)

    def step(self, loss: float | torch.Tensor | None = None, *, batch: Any = None) -> int:
        """Record the state after the next optimizer step; returns that step's number."""
        if self.writer is None:
            raise ArtifactError(f"{self.path}: step() outside the recorder's `with` block.")
        t = self._written
        if t > self.steps:
            raise ArtifactError(f"{self.path}: step() called {t} times; the recorder was made for steps={self.steps}.")
        value = math.nan if loss is None else float(loss)
        self._write_row(t, value, batch)
        self._written += 1
        self.last_loss = value
        if self._policy.due(t, self.steps):
            self._policy.save(t, self.writer, self._read(self.primary), self._state.capture(), last_loss=value)
        return t

    @property
    def steps_recorded(self) -> int:
        return self._written - 1


class FlannelCallback:
    """A `transformers.TrainerCallback` that records named parameters and the loss after every optimizer
    step of a Trainer, into one artifact (published when training ends after `max_steps`).

    ```python
    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[FlannelCallback("run.safetensors", ["transformer.wte.weight"], config={...})])
    trainer.train()
    ```

    `tensors`: parameter names of the Trainer's model (the first is the primary one). The loss is the
    one the model returned in the step's last forward pass. A TrainerCallback subclass is made on first
    use, so importing flannel_repro does not import transformers.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        return _callback_class()(*args, **kwargs)


_CALLBACK: type | None = None


def _callback_class() -> type:
    global _CALLBACK
    if _CALLBACK is not None:
        return _CALLBACK
    from transformers import TrainerCallback

    class _FlannelCallback(TrainerCallback):
        def __init__(
            self,
            path: str | Path,
            tensors: Sequence[str],
            *,
            config: EngineRunConfig | Mapping[str, Any] | None = None,
            **recorder_kwargs: Any,
        ) -> None:
            if isinstance(tensors, str) or not tensors:
                raise ConfigError(f"FlannelCallback: 'tensors' must be a list of parameter names (got {tensors!r}).")
            self.path, self.names, self.config, self.kwargs = Path(path), list(tensors), config, recorder_kwargs
            self.recorder: TrajectoryRecorder | None = None
            self._loss: float = math.nan
            self._hook = None

        def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):  # noqa: ANN001, ANN003, ANN202 (the Trainer's callback signature)
            params = dict(model.named_parameters())
            missing = [n for n in self.names if n not in params]
            if missing:
                raise ConfigError(
                    f"FlannelCallback: no parameter {missing} in the model (it has e.g. {list(params)[:4]})."
                )

            def keep_loss(_module, _args, output):  # noqa: ANN001, ANN202
                loss = getattr(output, "loss", None)
                if loss is not None:
                    self._loss = float(loss.detach())

            self._hook = model.register_forward_hook(keep_loss)
            cfg = self.config
            if isinstance(cfg, EngineRunConfig) and cfg.steps != state.max_steps:
                raise ConfigError(
                    f"FlannelCallback: config.steps={cfg.steps} but the Trainer runs max_steps={state.max_steps}."
                )
            self.recorder = TrajectoryRecorder(
                self.path,
                {n: params[n] for n in self.names},
                steps=state.max_steps,
                config=cfg,
                optimizer=getattr(optimizer, "optimizer", optimizer),
                **self.kwargs,
            )
            self.recorder.__enter__()

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN003, ANN202 (the Trainer's callback signature)
            assert self.recorder is not None
            self.recorder.step(loss=self._loss)

        def on_train_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN003, ANN202 (the Trainer's callback signature)
            if self._hook is not None:
                self._hook.remove()
            if self.recorder is not None:
                rec, self.recorder = self.recorder, None
                rec.__exit__(None, None, None)

    _CALLBACK = _FlannelCallback
    return _CALLBACK
