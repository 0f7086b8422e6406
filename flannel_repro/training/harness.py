"""Train one run of the experiment and stream its trajectory to disk.

Two engines share the data, the model builder and the recorder:

- `hf`: the transformers Trainer, configured as the notebook configures it; W is recorded by a
  `TrainerCallback` after each optimizer step (no private Trainer method is overridden).
- `torch`: a lean loop you can read top to bottom, doing the Trainer's arithmetic in the Trainer's
  order: autocast forward, loss = sum / n_targets, backward, clip, AdamW, linear schedule.

On CPU both produce bitwise identical W and losses (tests/test_engines.py); that equality is what lets
the fast engine stand in for the notebook's.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, cast

import torch

from flannel_repro.training.allocator import tune_malloc
from flannel_repro.data.corpus import DataOrder, TokenDataset, load_data, make_batch
from flannel_repro.training.determinism import deterministic_mode, environment_fingerprint, torch_threads
from flannel_repro.devices import device_present, parse_device
from flannel_repro.errors import ConfigError, DeterminismError, ResumeError
from flannel_repro.training.head import model_loss, verify_fused_head
from flannel_repro.training.model import build_model, embedding, shared_init_W
from flannel_repro.training.numerics import apply as apply_numerics, arithmetic, numerics_info
from flannel_repro.training.run_recorder import RunRecorder

if TYPE_CHECKING:
    from transformers import GPT2LMHeadModel

    from flannel_repro.config import RunConfig
    from flannel_repro.data.corpus import CorpusData

Progress = Callable[[int, int, float], None]  # (step, steps, loss)

IGNORE_INDEX = -100


@dataclass(frozen=True)
class RunResult:
    path: Path
    config: "RunConfig"
    wall_time_s: float
    steps_per_s: float
    final_loss: float
    threads: int


def train(
    config: "RunConfig",
    out_path: str | Path,
    *,
    data: "CorpusData | None" = None,
    W_initial: torch.Tensor | None = None,
    metadata: dict[str, Any] | None = None,
    progress: Progress | None = None,
    checkpoint_every: int = 0,
    stop_at: int | None = None,
    run_key: str | None = None,
) -> RunResult:
    """Train one run per `config` and write its trajectory artifact to `out_path` (atomically).

    With `checkpoint_every` = N > 0 (torch engine), the full training state is checkpointed every N steps
    and a run killed or stopped before the end resumes from its last checkpoint when it is trained again
    (same `out_path` and `run_key`): the artifact is bitwise the uninterrupted run's (training.resume).
    `stop_at` = k checkpoints at step k and raises `TrainingStopped` (tests of resume, `resume_at`)."""
    from flannel_repro.training.resume import Checkpointer, discard, find_resumable

    check_device(config.device)
    run_key = run_key if run_key is not None else str((metadata or {}).get("run_key", ""))
    policy = Checkpointer(Path(out_path), run_key, checkpoint_every, stop_at)
    if policy.enabled and config.engine != "torch":
        raise ConfigError(
            f"checkpoints and resume are implemented for engine = 'torch' and registered engines (got "
            f"engine={config.engine!r}); the Trainer's own checkpoints hold pickles."
        )
    if stop_at is not None and not 1 <= stop_at <= config.steps:
        raise ConfigError(f"'stop_at' must be a step in [1, {config.steps}] (got {stop_at}).")
    if config.engine == "hf" and config.compile != "none":
        raise ConfigError(
            "'compile' is only available with engine = 'torch' (the Trainer compiles through "
            f"TrainingArguments.torch_compile, which this harness does not drive); got compile={config.compile!r}."
        )
    if config.head == "fused" and (config.engine != "torch" or config.compile != "none"):
        raise ConfigError(
            "head = 'fused' needs engine = 'torch' and compile = 'none' (the Trainer and torch.compile run "
            f"the model's own head); got engine={config.engine!r}, compile={config.compile!r}."
        )
    apply_numerics(config.numerics, config.device)  # arranges a pinned mode, or refuses when it is too late
    tune_malloc()
    data = data if data is not None else load_data(config)
    W0 = W_initial if W_initial is not None else shared_init_W(config)
    # a checkpoint of this run left by a killed or stopped process is resumed, whatever the interval now;
    # one that fails verification, before or while resuming, is discarded and the run trains from the start
    resume, discarded = find_resumable(out_path, run_key) if config.engine == "torch" and run_key else (None, "")
    while True:
        try:
            return _train_once(config, out_path, data, W0, metadata, progress, policy, resume, discarded)
        except ResumeError as exc:
            if resume is None:
                raise
            resume, discarded = None, discard(out_path, str(exc))


def _train_once(
    config: "RunConfig",
    out_path: str | Path,
    data: "CorpusData",
    W0: torch.Tensor,
    metadata: dict[str, Any] | None,
    progress: Progress | None,
    policy: Any,
    resume: Any,
    discarded: str,
) -> RunResult:
    from flannel_repro.training.resume import resumable_path

    with contextlib.ExitStack() as stack:
        threads = stack.enter_context(torch_threads(config.threads))
        stack.enter_context(deterministic_mode(config.deterministic))
        env = environment_fingerprint(
            config.device,
            numerics=numerics_info(
                config.device, threads=threads, deterministic=config.deterministic, mode=config.numerics
            ),
        )
        meta = {"env": env, "engine": config.engine, **(metadata or {})}
        resumable = policy.enabled or resume is not None
        recorder = stack.enter_context(
            RunRecorder(
                config, out_path, data, meta, resume=resume, temp_path=resumable_path(out_path) if resumable else None
            )
        )
        stack.enter_context(arithmetic(config.numerics, config.device))  # portable: explicit bf16 products
        start = time.perf_counter()
        if config.engine == "torch":
            engine_meta = _torch_engine(config, data, W0, recorder, progress, policy, resume)
        else:
            engine_meta = _hf_engine(config, data, W0, recorder, progress)
        wall = time.perf_counter() - start
        final_loss = recorder.last_loss
        if resume is not None:
            engine_meta["resumed_from"] = str(resume.step)  # wall time is then this process's share
        if discarded:
            engine_meta["resume_discarded"] = discarded[:2000]
        path = recorder.finish(
            {
                "wall_time_s": f"{wall:.3f}",
                "steps_per_s": f"{config.steps / wall:.4f}",
                "final_loss": repr(final_loss),
                "threads": str(threads),
                **engine_meta,
            }
        )
        policy.done()
    return RunResult(
        path=path,
        config=config,
        wall_time_s=wall,
        steps_per_s=config.steps / wall,
        final_loss=final_loss,
        threads=threads,
    )


def check_device(device: str) -> None:
    """ConfigError when the device is malformed or absent here, with the reason."""
    present, why = device_present(device)
    if not present:
        raise ConfigError(f"device {device!r} was asked for but is not available: {why}.")


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """The Trainer's two groups: decay for weights, none for biases and LayerNorm parameters."""
    no_decay_types = (torch.nn.LayerNorm,)
    no_decay = set()
    for mod_name, module in model.named_modules():
        for p_name, _ in module.named_parameters(recurse=False):
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            if isinstance(module, no_decay_types) or "bias" in p_name.lower():
                no_decay.add(full)
    named = list(model.named_parameters())
    return [
        {"params": [p for n, p in named if n not in no_decay and p.requires_grad], "weight_decay": weight_decay},
        {"params": [p for n, p in named if n in no_decay and p.requires_grad], "weight_decay": 0.0},
    ]


def lr_lambda(config: "RunConfig") -> Callable[[int], float]:
    """The Trainer's schedules as a LambdaLR multiplier (transformers' linear / constant with warm-up)."""
    warmup, total = config.warmup_steps, config.steps

    def linear(step: int) -> float:
        if step < warmup:
            return float(step) / float(max(1, warmup))
        return max(0.0, float(total - step) / float(max(1, total - warmup)))

    def constant(step: int) -> float:
        if step < warmup:
            return float(step) / float(max(1.0, warmup))
        return 1.0

    return linear if config.lr_schedule == "linear" else constant


def trainer_counts_shifted_labels(model: torch.nn.Module) -> bool:
    """Whether the installed Trainer counts num_items_in_batch over labels[..., 1:] for this model.

    transformers 5.x counts the shifted labels only when the model's `loss_type` maps to
    ForCausalLMLoss. GPT2LMHeadModel's class name matches no loss type, so its loss_type is None (the
    "loss_type=None ... unrecognized" notice the notebook printed), and the Trainer counts all B*T
    labels while the model averages over the B*(T-1) it uses: the loss it trains on is the mean
    cross-entropy times (T-1)/T. We mirror the installed rule, so the lean loop stays bitwise equal.
    """
    import inspect

    from transformers import Trainer

    source = inspect.getsource(Trainer._get_num_items_in_batch) if hasattr(Trainer, "_get_num_items_in_batch") else ""
    if "_loss_shifts_labels" not in source:
        return False  # older Trainers count every label that is not -100
    from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss

    loss_type = getattr(model, "loss_type", None)
    return (
        loss_type is not None
        and LOSS_MAPPING.get(loss_type) is ForCausalLMLoss
        and not getattr(model.config, "is_encoder_decoder", False)
    )


def trainer_passes_num_items(model: torch.nn.Module) -> bool:
    """Whether the installed Trainer hands `num_items_in_batch` to this model's forward (its
    `model_accepts_loss_kwargs`). transformers 5.x does when the forward takes **kwargs (GPT-2's does)
    or the model says `accepts_loss_kwargs`; 4.46 only when the forward has a `**loss_kwargs`, which its
    GPT-2 lacks, so that Trainer trains on the model's own mean loss. We read the installed rule."""
    import inspect

    from transformers import Trainer

    source = inspect.getsource(Trainer.__init__)
    if "accepts_loss_kwargs" in source.replace("model_accepts_loss_kwargs", "") and hasattr(
        model, "accepts_loss_kwargs"
    ):
        return bool(model.accepts_loss_kwargs)
    params = inspect.signature(model.forward).parameters
    if '"loss_kwargs" in forward_params' in source:  # transformers 4.46 .. 4.5x
        return "loss_kwargs" in params and params["loss_kwargs"].kind is inspect.Parameter.VAR_KEYWORD
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def trainer_num_items(labels: torch.Tensor, shifts_labels: bool) -> torch.Tensor:
    counted = labels[..., 1:] if shifts_labels else labels
    return counted.ne(IGNORE_INDEX).sum() / 1  # the Trainer divides by tp*cp*sp sizes (1): a float32 tensor


def _use_fused_head(config: "RunConfig", device: torch.device) -> bool:
    """Whether to try the fused head (it is verified before use): 'auto' takes it on CPU only, where
    it was shown bitwise equal and halves peak memory; GPU BLAS may pick other kernels per shape."""
    if config.head == "reference" or config.compile != "none":
        return False
    return config.head == "fused" or device.type == "cpu"


Phase = Callable[[str], contextlib.AbstractContextManager[Any]]


def _no_phase(_name: str) -> contextlib.AbstractContextManager[Any]:
    return contextlib.nullcontext()


class TorchLoop:
    """The torch engine: its model, optimizer, schedule and data order, and one optimizer step.

    `_torch_engine` drives it with the recorder; `flannel_repro.runs.replay` drives it to replay a
    run to a step and record every operation of that step. `step(t, phase=...)` wraps each part of the
    step (head-check, forward, backward, clip, optimizer) in `phase(name)`.
    """

    def __init__(self, config: "RunConfig", data: "CorpusData", W0: torch.Tensor) -> None:
        self.config = config
        self.device = device = torch.device(config.device)
        self.order = DataOrder(data.n_examples(config.seq_len), config.batch_size, config.data_seed)
        self.model = model = build_model(config, W0, device)
        model.train()  # dropout is 0, but train mode is what the Trainer runs
        self.optimizer = torch.optim.AdamW(
            _param_groups(model, config.weight_decay),
            lr=config.lr,
            betas=(config.adam_beta1, config.adam_beta2),
            eps=config.adam_eps,
            weight_decay=config.weight_decay,
            **({"fused": True} if config.optim == "adamw_torch_fused" else {}),
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(config))
        # torch.compile of a module returns an OptimizedModule, which calls it and forwards its attributes
        self.forward = cast("GPT2LMHeadModel", torch.compile(model)) if config.compile == "default" else model
        self.use_amp = config.amp == "bfloat16"
        self.ids = data.ids
        self.shifts_labels = trainer_counts_shifted_labels(model)
        self.passes_num_items = trainer_passes_num_items(model)
        fused = _use_fused_head(config, device)
        if not self.passes_num_items and fused:
            # transformers 4.x trains GPT-2 on the model's own mean loss. The fused head's gradients equal the
            # model's, but its mean can differ by an ulp in the recorded loss (measured under 4.46.3): use the
            # model's head, which is the Trainer's arithmetic by construction.
            if config.head == "fused":
                raise ConfigError(
                    "head = 'fused' computes the loss as sum / num_items_in_batch, which the installed "
                    "Trainer (transformers 4.x) does not use for this model; use head = 'auto' or 'reference'."
                )
            fused = False
        self.fused = fused
        self.checked: dict[tuple[int, ...], str | None] = {}  # batch shape -> None (bitwise equal) or the difference

    def step(
        self, step: int, *, phase: Phase = _no_phase, before_optimizer: Callable[[], None] | None = None
    ) -> tuple[float, torch.Tensor]:
        """Optimizer step `step` (1-based): (its loss, the batch's start indices)."""
        config, device, model = self.config, self.device, self.model
        starts = self.order.batch(step)  # (B,)
        inputs, labels = make_batch(self.ids, starts, config.seq_len, config.label_mode)  # (B, T), (B, T)
        inputs, labels = inputs.to(device), labels.to(device)
        # transformers 5.x: the Trainer has the model divide the summed cross-entropy by its own count of
        # labels (num_items_in_batch): sum / n, not mean. See trainer_num_items for which labels it
        # counts. transformers 4.x passes nothing for GPT-2, which then returns its mean (None here).
        n_targets = trainer_num_items(labels, self.shifts_labels) if self.passes_num_items else None
        if (
            self.fused and tuple(inputs.shape) not in self.checked
        ):  # once per batch shape (an epoch's last batch may be short)
            with phase("head-check"):
                problem = verify_fused_head(
                    model, inputs, labels, n_targets, amp_dtype=torch.bfloat16 if self.use_amp else None
                )
            self.checked[tuple(inputs.shape)] = problem
            if problem is not None:
                if config.head == "fused":
                    raise DeterminismError(
                        f"head = 'fused' is not bitwise equal to the model's loss on {device} for a "
                        f"batch of shape {tuple(inputs.shape)}: {problem}. Use head = 'auto' or 'reference'."
                    )
                self.fused = False
        with phase("forward"), torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.use_amp):
            loss = model_loss(self.forward, inputs, labels, n_targets, self.fused)  # float32
        with phase("backward"):
            loss.backward()
        if config.max_grad_norm > 0:
            with phase("clip"):
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        if before_optimizer is not None:
            before_optimizer()
        with phase("optimizer"):
            self.optimizer.step()
            self.scheduler.step()
            model.zero_grad()
        return loss.item(), starts

    def _training_state(self) -> Any:
        from flannel_repro.training.resume import TrainingState

        return TrainingState({"model": self.model, "optimizer": self.optimizer, "scheduler": self.scheduler})

    def state(self) -> dict[str, Any]:
        """The loop's full state after a step (a checkpoint, training.resume): model, optimizer, schedule,
        RNGs, and the fused head's per-shape verdicts (so a resumed run takes the same head)."""
        return {
            **self._training_state().capture(),
            "loop": {"fused": self.fused, "checked": [[list(k), v] for k, v in self.checked.items()]},
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self._training_state().restore(state)
        self.fused = bool(state["loop"]["fused"])
        self.checked = {tuple(k): v for k, v in state["loop"]["checked"]}

    def engine_metadata(self) -> dict[str, str]:
        failed = {str(list(k)): v for k, v in self.checked.items() if v is not None}
        return {
            "head": json.dumps(
                {
                    "requested": self.config.head,
                    "used": "fused" if self.fused else "reference",
                    "checked_shapes": [list(k) for k in self.checked],
                    "check_failures": failed,
                },
                sort_keys=True,
            )
        }


def _torch_engine(
    config: "RunConfig",
    data: "CorpusData",
    W0: torch.Tensor,
    recorder: RunRecorder,
    progress: Progress | None,
    policy: Any = None,
    resume: Any = None,
) -> dict[str, str]:
    from flannel_repro.training.resume import check_restored

    loop = TorchLoop(config, data, W0)
    first = 1
    if resume is not None:
        loop.load_state(resume.state)
        check_restored(resume, embedding(loop.model))
        recorder.resumed(loop.model, loop.optimizer)
        first = resume.step + 1
    else:
        recorder.record(0, loop.model)
    for step in range(first, config.steps + 1):
        loss_value, starts = loop.step(
            step, before_optimizer=lambda: recorder.capture_grads(loop.model, loop.optimizer)
        )
        recorder.record(step, loop.model, loss=loss_value, batch_starts=starts, optimizer=loop.optimizer)
        if progress is not None:
            progress(step, config.steps, loss_value)
        if policy is not None and policy.due(step, config.steps):
            policy.save(step, recorder.writer, embedding(loop.model), loop.state(), last_loss=loss_value)
    return loop.engine_metadata()


def _hf_engine(
    config: "RunConfig", data: "CorpusData", W0: torch.Tensor, recorder: RunRecorder, progress: Progress | None
) -> dict[str, str]:
    from transformers import Trainer, TrainerCallback, TrainingArguments
    from transformers.utils import logging as hf_logging

    kind = parse_device(config.device).kind
    if config.device not in ("cpu", "cuda", "cuda:0", "mps"):
        raise ConfigError(
            f"engine 'hf' runs on 'cpu', 'cuda' (device 0) or 'mps' (got device={config.device!r}); "
            "use engine = 'torch' for other devices."
        )
    order = DataOrder(data.n_examples(config.seq_len), config.batch_size, config.data_seed)
    model = build_model(config, W0, "cpu")  # the notebook builds on CPU then moves; the Trainer moves it
    if kind != "cpu":
        # transformers' PreTrainedModel.to is functools.wraps'd: typeshed types it as taking the model as argument 1
        model = model.to(config.device)  # type: ignore[arg-type]
    dataset = TokenDataset(data.ids, config.seq_len, config.label_mode)

    class RecordingCallback(TrainerCallback):
        """Records after each optimizer step and checks the Trainer used DataOrder's batch."""

        def __init__(self) -> None:
            self.loss: torch.Tensor | None = None
            self.consumed = 0

        def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):  # noqa: ANN001, ANN003, ANN202 (the Trainer's callback signature)
            recorder.capture_grads(model, optimizer)

        def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):  # noqa: ANN001, ANN003, ANN202 (the Trainer's callback signature)
            step = state.global_step
            starts = order.batch(step)
            fetched = dataset.fetched[self.consumed : self.consumed + len(starts)]
            if fetched != starts.tolist():
                raise DeterminismError(
                    f"step {step}: the Trainer's sampler fed examples {fetched[:4]}..., DataOrder expected "
                    f"{starts[:4].tolist()}...; the installed transformers/accelerate shuffles differently."
                )
            self.consumed += len(starts)
            if self.consumed > 1_000_000:  # keep the log short
                del dataset.fetched[: self.consumed]
                self.consumed = 0
            loss_value = self.loss.item() if self.loss is not None else float("nan")
            recorder.record(step, model, loss=loss_value, batch_starts=starts, optimizer=optimizer)
            if progress is not None:
                progress(step, config.steps, loss_value)

    callback = RecordingCallback()

    def keep_loss(_module: Any, _args: Any, output: Any) -> None:  # forward hook: the loss the Trainer backpropagates
        callback.loss = output.loss.detach() if getattr(output, "loss", None) is not None else None

    hook = model.register_forward_hook(keep_loss)
    output_dir = Path(tempfile.mkdtemp(prefix="flannel-hf-"))
    try:
        args = TrainingArguments(
            output_dir=str(output_dir),
            max_steps=config.steps,
            per_device_train_batch_size=config.batch_size,
            learning_rate=config.lr,
            weight_decay=config.weight_decay,
            adam_beta1=config.adam_beta1,
            adam_beta2=config.adam_beta2,
            adam_epsilon=config.adam_eps,
            max_grad_norm=config.max_grad_norm,
            # transformers' "constant" ignores warmup_steps; "constant_with_warmup" is the same
            # schedule with the warm-up our config asks for.
            lr_scheduler_type=(
                "constant_with_warmup"
                if config.lr_schedule == "constant" and config.warmup_steps
                else config.lr_schedule
            ),
            warmup_steps=config.warmup_steps,
            optim=config.optim,
            # The notebook's save_steps = steps + 1 still writes checkpoint-<steps> at the end under
            # transformers 5.x; "no" writes nothing. Logging is off: it changes no numbers.
            save_strategy="no",
            logging_strategy="no",
            dataloader_num_workers=0,
            dataloader_pin_memory=False,
            bf16=config.amp == "bfloat16",
            seed=config.data_seed,  # drives the sampler; the model was built from model_seed above
            report_to="none",
            disable_tqdm=True,
            use_cpu=kind == "cpu",
        )
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            trainer = Trainer(model=model, args=args, train_dataset=dataset, callbacks=[callback])
            recorder.record(0, model)
            trainer.train()
        finally:
            hf_logging.set_verbosity(verbosity)
        leftovers = sorted(p.name for p in output_dir.iterdir())
        if leftovers:
            raise RuntimeError(f"the Trainer wrote {leftovers} into {output_dir}; the hf engine must not checkpoint.")
    finally:
        hook.remove()
        shutil.rmtree(output_dir, ignore_errors=True)
    return {"head": json.dumps({"requested": config.head, "used": "trainer"}, sort_keys=True)}
