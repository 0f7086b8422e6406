"""Export to the original notebook's single-file layout (`1.20f_flannel_6.safetensors`), streaming."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch

from flannel_repro.bits import same_bits
from flannel_repro.errors import ArtifactError
from flannel_repro.storage.layout import KEY_LOSSES, KEY_W, META_FORMAT, run_config, run_data
from flannel_repro.storage.format import TensorSpec
from flannel_repro.storage.reader import ArtifactReader
from flannel_repro.storage.writer import ArtifactWriter

NOTEBOOK_FORMAT = "flannel-repro/notebook/1"
# The original notebook's export: key -> dtype. Shapes: W (R, S+1, V, H), losses (R, S+1),
# W_initial (V, H), everything else a scalar of shape ().
NOTEBOOK_KEYS: dict[str, torch.dtype] = {
    "W": torch.bfloat16,
    "losses": torch.bfloat16,
    "W_initial": torch.bfloat16,
    "n_runs": torch.int64,
    "init_seed": torch.int64,
    "base_train_seed": torch.int64,
    "n_steps": torch.int64,
    "n_live": torch.int64,
    "n_dead": torch.int64,
    "vocab_size": torch.int64,
    "hidden_dim": torch.int64,
    "init_scale": torch.float32,
    "learning_rate": torch.float32,
    "weight_decay": torch.float32,
    "adam_beta1": torch.float32,
    "adam_beta2": torch.float32,
    "recorded_W": torch.bool,
    "recorded_losses": torch.bool,
}

# --- notebook export ----------------------------------------------------------------------------

# config key -> notebook scalar key, for the values every run must share.
_SHARED_INT = {"init_seed": "init_seed", "steps": "n_steps", "vocab_size": "vocab_size", "hidden_dim": "hidden_dim"}
_SHARED_FLOAT = {
    "init_scale": "init_scale",
    "lr": "learning_rate",
    "weight_decay": "weight_decay",
    "adam_beta1": "adam_beta1",
    "adam_beta2": "adam_beta2",
}


def export_notebook(run_paths: Sequence[str | os.PathLike[str]], out_path: str | os.PathLike[str]) -> Path:
    """Write the original notebook's single safetensors file from per-run artifacts, streaming.

    Holds at most one step of one run in memory; publishes atomically. All runs must agree on
    shapes, seeds of W_initial, steps, hyperparameters and live/dead counts, and start from a
    bitwise-identical W[0]. W and losses are rounded to bfloat16 (round-to-nearest-even).
    """
    paths = [Path(p) for p in run_paths]
    if not paths:
        raise ArtifactError(f"{out_path}: expected at least one run artifact to export, got none.")
    readers: list[ArtifactReader] = []
    try:
        for p in paths:
            readers.append(ArtifactReader(p))
        configs = [run_config(r) for r in readers]
        datas = [run_data(r) for r in readers]
        first, cfg0, data0 = readers[0], configs[0], datas[0]

        def field(cfg: dict[str, Any], r: ArtifactReader, key: str) -> Any:
            if key not in cfg:
                raise ArtifactError(f"{r.path}: config: expected a {key!r} entry, got none.")
            return cfg[key]

        # Every run must share what the notebook stores once.
        for key in (*_SHARED_INT, *_SHARED_FLOAT):
            v0 = field(cfg0, first, key)
            for r, cfg in zip(readers[1:], configs[1:]):
                if field(cfg, r, key) != v0:
                    raise ArtifactError(
                        f"{r.path}: config {key!r} must match {first.path}: expected {v0!r}, got {cfg[key]!r}."
                    )
        for key in ("n_live", "n_dead"):
            if key not in data0:
                raise ArtifactError(f"{first.path}: data metadata: expected a {key!r} entry, got none.")
            for r, d in zip(readers[1:], datas[1:]):
                if d.get(key) != data0[key]:
                    raise ArtifactError(
                        f"{r.path}: data {key!r} must match {first.path}: expected {data0[key]!r}, got {d.get(key)!r}."
                    )
        steps, vocab, hidden = int(cfg0["steps"]), int(cfg0["vocab_size"]), int(cfg0["hidden_dim"])
        w_shape = (steps + 1, vocab, hidden)
        for r in readers:
            for key, shape in ((KEY_W, w_shape), (KEY_LOSSES, (steps + 1,))):
                got = r.spec(key).shape
                if got != shape:
                    raise ArtifactError(
                        f"{r.path}: tensor {key!r}: expected shape {shape} (from the config), got {got}."
                    )
            if not r.spec(KEY_W).dtype.is_floating_point:
                raise ArtifactError(f"{r.path}: tensor 'W': expected a floating dtype, got {r.spec(KEY_W).dtype}.")
        w0 = first.row(KEY_W, 0)
        for r in readers[1:]:
            if not same_bits(w0, r.row(KEY_W, 0)):
                raise ArtifactError(
                    f"{r.path}: W[0] (W_initial) must be bitwise identical to {first.path}'s, got different values."
                )

        n_runs = len(readers)
        specs = [
            TensorSpec("W", torch.bfloat16, (n_runs, *w_shape)),
            TensorSpec("losses", torch.bfloat16, (n_runs, steps + 1)),
            TensorSpec("W_initial", torch.bfloat16, (vocab, hidden)),
        ] + [TensorSpec(k, dt, ()) for k, dt in NOTEBOOK_KEYS.items() if k not in ("W", "losses", "W_initial")]
        metadata = {
            META_FORMAT: NOTEBOOK_FORMAT,
            "runs": json.dumps([p.name for p in paths]),
            "run_configs": json.dumps(configs, sort_keys=True),
        }
        scalars: dict[str, Any] = {
            "n_runs": n_runs,
            "init_seed": int(cfg0["init_seed"]),
            "base_train_seed": int(field(cfg0, first, "model_seed")),
            "n_steps": steps,
            "n_live": int(data0["n_live"]),
            "n_dead": int(data0["n_dead"]),
            "vocab_size": vocab,
            "hidden_dim": hidden,
            "init_scale": float(cfg0["init_scale"]),
            "learning_rate": float(cfg0["lr"]),
            "weight_decay": float(cfg0["weight_decay"]),
            "adam_beta1": float(cfg0["adam_beta1"]),
            "adam_beta2": float(cfg0["adam_beta2"]),
            "recorded_W": True,
            "recorded_losses": True,
        }
        with ArtifactWriter(out_path, specs, metadata, reserve_metadata_bytes=4096, checksum_exclude=("W",)) as w:
            w.write("W_initial", w0.to(torch.bfloat16))
            for name, value in scalars.items():
                w.write(name, torch.tensor(value, dtype=NOTEBOOK_KEYS[name]))
            for i, r in enumerate(readers):
                # float32 -> bf16 rounds to nearest even; NaN at step 0 stays NaN.
                w.write_row("losses", i, r[KEY_LOSSES].to(torch.bfloat16))
                for t in range(steps + 1):
                    w.write_row("W", (i, t), r.row(KEY_W, t).to(torch.bfloat16))
            return w.finish()
    finally:
        for r in readers:
            r.close()
