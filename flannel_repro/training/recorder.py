"""What is captured at every step, streamed straight into a pre-sized safetensors artifact.

One `Recorder` serves both engines: the lean loop calls it directly, the HF engine through a
`TrainerCallback`. Memory does not grow with the number of steps: each step's tensors go to disk
as soon as they exist (see `stream.TrajectoryWriter`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from flannel_repro.storage import layout, stream
from flannel_repro.storage.stream import TensorSpec, TrajectoryWriter, digest_tensor
from flannel_repro.data.corpus import make_batch
from flannel_repro.training.model import embedding, torch_dtype

if TYPE_CHECKING:
    from flannel_repro.config import RunConfig
    from flannel_repro.data.corpus import CorpusData

def probe_starts(n_examples: int, n_probe: int) -> torch.Tensor:
    """A fixed probe batch: `n_probe` examples spread evenly over the corpus (independent of seeds)."""
    return torch.linspace(0, n_examples - 1, n_probe).round().to(torch.long)


def artifact_specs(config: "RunConfig") -> list[TensorSpec]:
    """The tensors of one run's artifact for this config (layout defined in `artifacts`)."""
    return layout.run_artifact_specs(
        steps=config.steps, vocab_size=config.vocab_size, hidden_dim=config.hidden_dim,
        batch_size=config.batch_size, dtype=torch_dtype(config.dtype), record_W=config.record_W,
        grads=config.record_grads, exp_avg=config.record_momentum, exp_avg_sq=config.record_variance,
        probe_logits_shape=(config.probe_examples, config.seq_len, config.vocab_size) if config.record_logits else None,
    )


class Recorder:
    """Streams one run's trajectory into `path` (atomically: the file appears only when complete)."""

    def __init__(self, config: "RunConfig", path: str | Path, data: "CorpusData", metadata: dict[str, Any]) -> None:
        self.config = config
        self.data = data
        self._steps_written = 0
        self._pending_grad: torch.Tensor | None = None
        self._last_loss = math.nan
        meta = layout.run_metadata(
            config.to_dict(), data.describe(), digest_algo=stream.DIGEST_ALGO,
            **{k: v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in metadata.items()})
        # W is covered row by row by its digests; every other tensor gets a checksum at finish
        self.writer = TrajectoryWriter(Path(path), artifact_specs(config), meta, checksum_exclude=(layout.KEY_W,))
        self._probe = None
        if config.record_logits:
            starts = probe_starts(data.n_examples(config.seq_len), config.probe_examples)
            self._probe = make_batch(data.ids, starts, config.seq_len, config.label_mode)[0]  # (P, T)

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> "Recorder":
        self.writer.__enter__()
        self.writer.write(layout.KEY_LIVE_MASK, self.data.mask.live_mask.contiguous())
        return self

    def __exit__(self, *exc: Any) -> None:
        self.writer.__exit__(*exc)

    def finish(self, extra_metadata: dict[str, Any] | None = None) -> Path:
        if self._steps_written != self.config.steps + 1:
            raise RuntimeError(f"recorded {self._steps_written} of {self.config.steps + 1} steps; refusing to finish.")
        extra = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (extra_metadata or {}).items()}
        return self.writer.finish(extra)

    # -- per step ----------------------------------------------------------------------------

    def capture_grads(self, model: torch.nn.Module) -> None:
        """Call after clipping, before optimizer.step(): keeps the gradient of W the optimizer will use."""
        if self.config.record_grads:
            grad = embedding(model).grad
            self._pending_grad = None if grad is None else grad.detach().to("cpu", copy=True)

    def record(self, step: int, model: torch.nn.Module, *, loss: float | torch.Tensor | None = None,
               batch_starts: torch.Tensor | None = None, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Record the state after optimizer step `step` (0 = the initial state, before any step)."""
        if step != self._steps_written:
            raise RuntimeError(f"steps must be recorded in order: expected step {self._steps_written}, got {step}.")
        cfg = self.config
        W = embedding(model).detach()
        W_cpu = W.to("cpu")  # (V, H); a view on CPU, one device->host copy on GPUs
        self.writer.write_row(layout.KEY_DIGESTS, step, stream.digest_as_tensor(digest_tensor(W_cpu)))
        if cfg.record_W:
            self.writer.write_row(layout.KEY_W, step, W_cpu)
        loss_value = math.nan if loss is None else float(loss)
        self.writer.write_row(layout.KEY_LOSSES, step, torch.tensor(loss_value, dtype=torch.float32))
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
            for flag, key, name in ((cfg.record_momentum, layout.KEY_EXP_AVG, "exp_avg"),
                                    (cfg.record_variance, layout.KEY_EXP_AVG_SQ, "exp_avg_sq")):
                if flag:
                    value = state.get(name)
                    self.writer.write_row(key, step, value.detach().to("cpu") if value is not None
                                          else torch.zeros_like(W_cpu))
        if self._probe is not None:
            self.writer.write_row(layout.KEY_PROBE_LOGITS, step, self._probe_logits(model))
        self._last_loss = loss_value
        self._steps_written += 1

    @property
    def last_loss(self) -> float:
        return self._last_loss

    def _probe_logits(self, model: torch.nn.Module) -> torch.Tensor:
        device = embedding(model).device
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.config.amp == "bfloat16"):
            logits = model(input_ids=self._probe.to(device)).logits  # (P, T, V)
        return logits.detach().to("cpu", torch_dtype(self.config.dtype))  # stored in the run's dtype
