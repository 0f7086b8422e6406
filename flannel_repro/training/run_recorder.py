"""What is captured at every step, streamed straight into a pre-sized safetensors artifact.

One `RunRecorder` serves both engines: the lean loop calls it directly, the HF engine through a
`TrainerCallback`. Memory does not grow with the number of steps: each step's tensors go to disk
as soon as they exist (see `storage.writer.ArtifactWriter`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from flannel_repro.storage import layout
from flannel_repro.storage.format import DIGEST_ALGO, TensorSpec, digest_as_tensor, digest_tensor
from flannel_repro.storage.writer import ArtifactWriter
from flannel_repro.bits import bits_view
from flannel_repro.data.corpus import make_batch
from flannel_repro.training.model import embedding, torch_dtype

if TYPE_CHECKING:
    from transformers import GPT2LMHeadModel

    from flannel_repro.config import RunConfig
    from flannel_repro.data.corpus import CorpusData


def probe_starts(n_examples: int, n_probe: int) -> torch.Tensor:
    """A fixed probe batch: `n_probe` examples spread evenly over the corpus (independent of seeds)."""
    return torch.linspace(0, n_examples - 1, n_probe).round().to(torch.long)


def artifact_specs(config: "RunConfig") -> list[TensorSpec]:
    """The tensors of one run's artifact for this config (layout defined in `artifacts`)."""
    return layout.run_artifact_specs(
        steps=config.steps,
        vocab_size=config.vocab_size,
        hidden_dim=config.hidden_dim,
        batch_size=config.batch_size,
        dtype=torch_dtype(config.dtype),
        record_W=config.record_W,
        grads=config.record_grads,
        exp_avg=config.record_momentum,
        exp_avg_sq=config.record_variance,
        probe_logits_shape=(config.probe_examples, config.seq_len, config.vocab_size) if config.record_logits else None,
    )


def _inner(optimizer: Any) -> Any:
    """The torch optimizer behind a wrapper (accelerate's AcceleratedOptimizer keeps it as .optimizer)."""
    return getattr(optimizer, "optimizer", optimizer) if optimizer is not None else None


class UpdateTracker:
    """Per step, what happened to W's proposed updates (the bf16 stall diagnostic, layout.KEY_UPDATES).

    * changed: the share of W's entries whose bits changed in the step;
    * lost: of the entries Adam(W) proposed a nonzero update for, the share whose stored weight did not
      move. The proposed update is recomputed in float32 from the optimizer's state after the step
      (exp_avg, exp_avg_sq, step) and the step's lr, weight decay, betas and eps:
      u = -lr*wd*w - lr/(1-b1^t) * m / (sqrt(v/(1-b2^t)) + eps). An update smaller than half a bf16 ulp
      of the weight rounds away: that is the loss this measures, whatever kernel applied it;
    * second_moment_moved: the share of exp_avg_sq's entries whose bits changed (in bf16,
      `exp_avg_sq.mul_(0.999)` rounds to itself: 0.999 is 1.0 in bf16).

    NaN where it cannot be known: step 0, an optimizer that is not Adam-like or was not handed over.
    Costs a few elementwise passes over W per step and two copies of W's size.
    """

    def __init__(self) -> None:
        self._prev_w: torch.Tensor | None = None
        self._prev_v: torch.Tensor | None = None
        self._group: dict[str, Any] | None = None

    def before_step(self, param: torch.Tensor, optimizer: Any) -> None:
        opt = _inner(optimizer)
        self._group = None
        if opt is None:
            return
        for group in opt.param_groups:
            if any(p is param for p in group["params"]):
                if "betas" in group and "eps" in group and not group.get("amsgrad", False):
                    self._group = {
                        k: float(group[k]) if k != "betas" else tuple(map(float, group[k]))
                        for k in ("lr", "weight_decay", "betas", "eps")
                    }
                return

    def restore(self, param: torch.Tensor, optimizer: Any) -> None:
        """The state `after_step` leaves, rebuilt from a restored model and optimizer (resume)."""
        self._prev_w = param.detach().clone()
        opt = _inner(optimizer)
        v = opt.state.get(param, {}).get("exp_avg_sq") if opt is not None else None
        self._prev_v = v.detach().clone() if v is not None else None
        self._group = None

    def after_step(self, param: torch.Tensor, optimizer: Any) -> torch.Tensor:
        nan = float("nan")
        w = param.detach()
        changed = layout.changed_share(self._prev_w, w)
        lost = moved = nan
        opt = _inner(optimizer)
        state = opt.state.get(param, {}) if opt is not None else {}
        m, v, t = state.get("exp_avg"), state.get("exp_avg_sq"), state.get("step")
        if m is not None and v is not None and t is not None:
            moved = layout.changed_share(self._prev_v if self._prev_v is not None else torch.zeros_like(v), v)
            if self._group is not None and self._prev_w is not None:
                g = self._group
                t = float(t)
                b1, b2 = g["betas"]
                with torch.no_grad():
                    # new tensors only: .float() of a float32 state would be the optimizer's own tensor
                    denom = v.to(torch.float32, copy=True).div_(1 - b2**t).sqrt_().add_(g["eps"])
                    u = m.to(torch.float32, copy=True).div_(denom).mul_(-g["lr"] / (1 - b1**t))
                    u.sub_(self._prev_w.float(), alpha=g["lr"] * g["weight_decay"])
                    proposed = u != 0
                    n_proposed = int(torch.count_nonzero(proposed))
                    kept = bits_view(self._prev_w) == bits_view(w)
                    lost = int(torch.count_nonzero(proposed & kept)) / n_proposed if n_proposed else nan
            self._prev_v = v.detach().clone()
        self._prev_w = w.clone()
        self._group = None
        return torch.tensor([changed, lost, moved], dtype=torch.float32)


class RunRecorder:
    """Streams one run's trajectory into `path` (atomically: the file appears only when complete)."""

    def __init__(
        self,
        config: "RunConfig",
        path: str | Path,
        data: "CorpusData",
        metadata: dict[str, Any],
        *,
        temp_path: str | Path | None = None,
        resume: Any = None,
    ) -> None:
        """`temp_path`: a fixed name for the file being written (a resumable run, see training.resume);
        `resume`: a `storage.checkpoint.Checkpoint` of this run: the writer adopts that file, whose rows up
        to the checkpoint's step are written, with the metadata it was started with."""
        self.config = config
        self.data = data
        self._steps_written = 0
        self._pending_grad: torch.Tensor | None = None
        self._last_loss = math.nan
        self._resume = resume
        self._prior: dict[int, bytes] = {}  # after a resume: step -> digest the stopped run recorded there
        if resume is not None:
            meta = dict(resume.info["artifact_metadata"])  # byte-equal header: the adopted file is checked against it
            self._last_loss = float(resume.info.get("last_loss", math.nan))
        else:
            meta = layout.run_metadata(
                config.to_dict(),
                data.describe(),
                digest_algo=DIGEST_ALGO,
                **{k: v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in metadata.items()},
            )
        # W is covered row by row by its digests; every other tensor gets a checksum at finish
        self.writer = ArtifactWriter(
            Path(path), artifact_specs(config), meta, checksum_exclude=(layout.KEY_W,), temp_path=temp_path
        )
        self._updates = UpdateTracker()
        self._probe = None
        if config.record_logits:
            starts = probe_starts(data.n_examples(config.seq_len), config.probe_examples)
            self._probe = make_batch(data.ids, starts, config.seq_len, config.label_mode)[0]  # (P, T)

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> "RunRecorder":
        if self._resume is not None:
            from flannel_repro.training.resume import prior_digests

            k = self._resume.step
            self.writer.reopen(layout.written_through(self.writer.specs, k), self._resume.info["partial_digests"])
            self._prior = prior_digests(self.writer, layout.KEY_DIGESTS, k + 1, self.config.steps + 1)
            self._steps_written = k + 1
            return self
        self.writer.__enter__()
        self.writer.write(layout.KEY_LIVE_MASK, self.data.mask.live_mask.contiguous())
        return self

    @property
    def steps_written(self) -> int:
        return self._steps_written

    def resumed(self, model: "GPT2LMHeadModel", optimizer: Any) -> None:
        """After a resume, once the model and optimizer hold the checkpoint's state: the update statistics
        continue from it exactly as if the run had never stopped."""
        self._updates.restore(embedding(model), optimizer)

    def __exit__(self, *exc: Any) -> None:
        self.writer.__exit__(*exc)

    def finish(self, extra_metadata: dict[str, Any] | None = None) -> Path:
        if self._steps_written != self.config.steps + 1:
            raise RuntimeError(f"recorded {self._steps_written} of {self.config.steps + 1} steps; refusing to finish.")
        extra = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (extra_metadata or {}).items()}
        return self.writer.finish(extra)

    # -- per step ----------------------------------------------------------------------------

    def capture_grads(self, model: "GPT2LMHeadModel", optimizer: torch.optim.Optimizer | None = None) -> None:
        """Call after clipping, before optimizer.step(): keeps the gradient of W the optimizer will use,
        and (with the optimizer) the hyperparameters of the step about to be taken."""
        self._updates.before_step(embedding(model), optimizer)
        if self.config.record_grads:
            grad = embedding(model).grad
            self._pending_grad = None if grad is None else grad.detach().to("cpu", copy=True)

    def record(
        self,
        step: int,
        model: "GPT2LMHeadModel",
        *,
        loss: float | torch.Tensor | None = None,
        batch_starts: torch.Tensor | None = None,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> None:
        """Record the state after optimizer step `step` (0 = the initial state, before any step)."""
        if step != self._steps_written:
            raise RuntimeError(f"steps must be recorded in order: expected step {self._steps_written}, got {step}.")
        cfg = self.config
        W = embedding(model).detach()
        W_cpu = W.to("cpu")  # (V, H); a view on CPU, one device->host copy on GPUs
        digest = digest_tensor(W_cpu)
        if self._prior:  # resumed: the stopped run's steps after its checkpoint must come out again
            from flannel_repro.training.resume import check_resumed_digest

            check_resumed_digest(self._resume, self._prior, step, digest, self.writer.temp_path)
        self.writer.write_row(layout.KEY_DIGESTS, step, digest_as_tensor(digest))
        if cfg.record_W:
            self.writer.write_row(layout.KEY_W, step, W_cpu)
        loss_value = math.nan if loss is None else float(loss)
        self.writer.write_row(layout.KEY_LOSSES, step, torch.tensor(loss_value, dtype=torch.float32))
        self.writer.write_row(layout.KEY_UPDATES, step, self._updates.after_step(embedding(model), optimizer))
        if step > 0:
            if batch_starts is None:
                raise RuntimeError(f"step {step}: batch start indices are required after step 0.")
            self.writer.write_row(layout.KEY_BATCH_STARTS, step - 1, batch_starts.to(torch.int64))
        if cfg.record_grads:
            grad = self._pending_grad if step > 0 else None
            self.writer.write_row(layout.KEY_GRADS, step, grad if grad is not None else torch.zeros_like(W_cpu))
            self._pending_grad = None
        if cfg.record_momentum or cfg.record_variance:
            state = optimizer.state.get(embedding(model), {}) if optimizer is not None else {}
            for flag, key, name in (
                (cfg.record_momentum, layout.KEY_EXP_AVG, "exp_avg"),
                (cfg.record_variance, layout.KEY_EXP_AVG_SQ, "exp_avg_sq"),
            ):
                if flag:
                    value = state.get(name)
                    self.writer.write_row(
                        key, step, value.detach().to("cpu") if value is not None else torch.zeros_like(W_cpu)
                    )
        if self._probe is not None:
            self.writer.write_row(layout.KEY_PROBE_LOGITS, step, self._probe_logits(model))
        self._last_loss = loss_value
        self._steps_written += 1

    @property
    def last_loss(self) -> float:
        return self._last_loss

    def _probe_logits(self, model: "GPT2LMHeadModel") -> torch.Tensor:
        device = embedding(model).device
        assert self._probe is not None  # record() calls this only with a probe batch
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.config.amp == "bfloat16"):
            logits = model(input_ids=self._probe.to(device)).logits  # (P, T, V)
        return logits.detach().to("cpu", torch_dtype(self.config.dtype))  # stored in the run's dtype
