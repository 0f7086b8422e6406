"""A lazy, read-only view of one recorded run's artifact: W per step, losses, digests and metadata.

`flannel_repro.analysis.trajectory.Trajectory` adds what analysis offers on top (its summary); this
view is what storage alone can say.

Nothing large is read until asked for. `traj.W_at(t)` copies one step out of the file with a
positional read, so nothing stays resident in this process after the copy is dropped: use it
(or `flannel_repro.divergence`, which reads the same way) to walk over steps. `traj.W` is a view
of a memory map of the file, for array-like access; every page it touches stays in this
process's RSS while the trajectory is open (`release_pages()` drops them).
"""

from __future__ import annotations

import json
import math
import os
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from flannel_repro.storage import layout
from flannel_repro.storage.format import digest_tensor
from flannel_repro.storage.reader import ArtifactReader
from flannel_repro.config import EngineRunConfig, RunConfig, run_config_from_dict
from flannel_repro.errors import ArtifactError, ConfigError


class RunFile:
    """One run's artifact, read lazily. The harness and the `trajectory` fixture return its analysis
    subclass, `flannel_repro.Trajectory`."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.reader = ArtifactReader(Path(path))
        fmt = self.reader.metadata.get(layout.META_FORMAT)
        if fmt != layout.RUN_FORMAT:
            raise ArtifactError(
                f"{self.reader.path}: format {fmt!r} is not {layout.RUN_FORMAT!r}; "
                "it was not written by this version of flannel-repro."
            )

    # -- identity --------------------------------------------------------------------------

    @property
    def path(self) -> Path:
        return self.reader.path

    @property
    def metadata(self) -> dict[str, str]:
        return self.reader.metadata

    @cached_property
    def config(self) -> "RunConfig | EngineRunConfig":
        """The run's config (ArtifactError when the artifact has none or it is not a config: never a default):
        a RunConfig for the notebook's model, an EngineRunConfig for your own training."""
        return run_config_from_dict(layout.run_config(self.reader), source=f"{self.path}: metadata 'config'")

    @cached_property
    def env(self) -> dict[str, Any]:
        """The environment fingerprint the run was trained in ({} for artifacts written without one)."""
        return layout.run_env(self.reader)

    @cached_property
    def data_info(self) -> dict[str, Any]:
        return layout.run_data(self.reader)

    @cached_property
    def key_material(self) -> dict[str, Any] | None:
        """What the run key was made of (config fingerprint, data hashes, code and package versions, numerics
        class, ...): None when the artifact has none, {} when it cannot be read as a JSON object."""
        raw = self.metadata.get("run_key_material")
        if raw is None:
            return None
        try:
            value = json.loads(raw)
        except ValueError:
            return {}
        return value if isinstance(value, dict) else {}

    @property
    def repeat(self) -> int:
        return int(self.metadata.get("repeat", "0"))

    @property
    def run_key(self) -> str:
        return self.metadata.get("run_key", "")

    @property
    def steps(self) -> int:
        return self.config.steps

    @property
    def label(self) -> str:
        c = self.config
        seeds = (
            f"seed={c.train_seed}" if c.train_seed is not None else f"model_seed={c.model_seed},data_seed={c.data_seed}"
        )
        return f"{seeds} {c.device} {c.engine} repeat={self.repeat}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.label}, steps={self.steps}, path={str(self.path)!r})"

    # -- recorded tensors (lazy) -------------------------------------------------------------

    @property
    def has_W(self) -> bool:
        return layout.KEY_W in self.reader

    @property
    def W(self) -> torch.Tensor:
        """(steps + 1, V, H), memory-mapped; index it, do not copy it whole. Pages touched stay
        resident until `release_pages()` or `close()`; `W_at(t)` reads a step without that."""
        self._require_W()
        return self.reader[layout.KEY_W]

    def W_at(self, step: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """W after `step` as a (V, H) tensor of its own, read from the file (into `out` if given,
        e.g. one buffer reused while scanning); no page of the file stays mapped."""
        if not 0 <= step <= self.steps:
            raise IndexError(f"step {step} outside 0..{self.steps} of {self.label}.")
        self._require_W()
        return self.reader.row(layout.KEY_W, step, out)

    @property
    def W_initial(self) -> torch.Tensor:
        """W[0] as a tensor of its own (read from the file)."""
        self._require_W()
        return self.reader.row(layout.KEY_W, 0)

    def _require_W(self) -> None:
        if not self.has_W:
            raise ArtifactError(f"{self.path}: W was not recorded (record_W = false); only digests are available.")

    @cached_property
    def losses(self) -> torch.Tensor:
        """(steps + 1,) float32; NaN at step 0 (no loss before the first step)."""
        return self.reader.read(layout.KEY_LOSSES)

    @property
    def final_loss(self) -> float:
        return float(self.losses[-1]) if self.steps else math.nan

    @cached_property
    def digests(self) -> torch.Tensor:
        """(steps + 1, 32) uint8: blake2b-256 of W's bytes after each step."""
        return self.reader.read(layout.KEY_DIGESTS)

    def digest_hex(self, step: int) -> str:
        return bytes(self.digests[step].tolist()).hex()

    @property
    def batch_starts(self) -> torch.Tensor:
        """(steps, B) int64: start index of every example of every batch (row t-1 is step t)."""
        return self.reader[layout.KEY_BATCH_STARTS]

    @cached_property
    def updates(self) -> dict[str, torch.Tensor]:
        """Per step (steps + 1,) float32 each, NaN where unknown (layout.KEY_UPDATES): `changed` (the
        share of W's entries that changed), `lost` (of the proposed updates, the share lost to
        rounding), `second_moment_moved` (the share of Adam's exp_avg_sq entries that changed)."""
        if layout.KEY_UPDATES not in self.reader:
            raise ArtifactError(
                f"{self.path}: no {layout.KEY_UPDATES!r} tensor (written by an older flannel-repro); "
                "retrain the run to get the update statistics."
            )
        table = self.reader.read(layout.KEY_UPDATES)
        return {name: table[:, i].clone() for i, name in enumerate(layout.UPDATE_FIELDS)}

    @cached_property
    def live_mask(self) -> torch.Tensor:
        return self.reader.read(layout.KEY_LIVE_MASK)

    def optional(self, key: str) -> torch.Tensor:
        if key not in self.reader:
            raise ArtifactError(
                f"{self.path}: {key!r} was not recorded; enable it in the config "
                f"(record_grads / record_momentum / record_variance / record_logits)."
            )
        return self.reader[key]

    @property
    def wall_time_s(self) -> float:
        return float(self.metadata.get("wall_time_s", "nan"))

    @property
    def steps_per_s(self) -> float:
        return float(self.metadata.get("steps_per_s", "nan"))

    # -- integrity ---------------------------------------------------------------------------

    def verify(self) -> list[str]:
        """What is wrong with this artifact's contents (empty when nothing is). Checked:

        - the config and the data description are readable, and the config is the one the run key
          was made from (an edited `lr` in the metadata no longer passes as the trained run);
        - every recorded tensor has the dtype and shape the config implies (W, losses, digests,
          batch_starts, live_mask), and the live mask agrees with the recorded live count;
        - every step's W hashes to its stored digest (recomputed, never trusted);
        - every other tensor hashes to the checksum recorded when the file was finished.

        A full-scale run (1001 steps of a 10,000 x 64 bf16 W) rehashes 1.28 GB: a few seconds.
        """
        try:
            config = self.config
            data = self.data_info
            self.env  # noqa: B018 -- read for its check: summaries and snapshots name the run's numerics class from it
        except (ArtifactError, ConfigError) as exc:
            return [str(exc)]
        problems: list[str] = []
        material = self.key_material
        if material is not None:
            keyed = material.get("config")
            if keyed != config.fingerprint():
                problems.append(
                    f"the metadata's config (fingerprint {config.fingerprint()}) is not the one its run key "
                    f"was made from ({keyed}): the config was edited after training"
                )
        if isinstance(config, EngineRunConfig):
            try:
                specs = self._recorded_specs(config)
            except (ArtifactError, KeyError, TypeError, ValueError, AttributeError) as exc:
                return [f"the metadata's 'recorded' description is damaged ({exc})"]
        else:
            specs = layout.run_artifact_specs(
                steps=config.steps,
                vocab_size=config.vocab_size,
                hidden_dim=config.hidden_dim,
                batch_size=config.batch_size,
                dtype=getattr(torch, config.dtype),
                record_W=config.record_W,
            )
        # the update statistics came later (a run without them is whole, stall_profile recomputes what it can)
        optional = {layout.KEY_UPDATES}
        for want in specs:
            if want.name not in self.reader and want.name in optional:
                continue
            if want.name not in self.reader:
                problems.append(f"{want.name}: expected a tensor, got none")
                continue
            got = self.reader.spec(want.name)
            if (got.dtype, got.shape) != (want.dtype, want.shape):
                problems.append(
                    f"{want.name}: expected {str(want.dtype).removeprefix('torch.')} of shape "
                    f"{list(want.shape)} (from the config), got {str(got.dtype).removeprefix('torch.')} "
                    f"of shape {list(got.shape)}"
                )
        if problems:
            return problems  # the reads below assume the layout
        problems.extend(self.reader.checksum_problems())  # losses, batch starts, live mask, digests, optional tensors
        n_live = int(self.live_mask.sum())
        if "n_live" in data and data["n_live"] != n_live:
            problems.append(f"live_mask marks {n_live} live tokens, the data description says {data['n_live']}")
        if self.has_W:
            buf = None
            for t in range(config.steps + 1):
                buf = self.reader.row(layout.KEY_W, t, buf)
                if digest_tensor(buf) != bytes(self.digests[t].tolist()):
                    problems.append(
                        f"W at step {t} does not hash to its stored digest (the file changed after it was written)"
                    )
                    break
        return problems

    def require_verified(self) -> "RunFile":
        """This run, after `verify()` found nothing wrong; otherwise an ArtifactError listing what it found."""
        problems = self.verify()
        if problems:
            raise ArtifactError(f"{self.path}: failed verification: {'; '.join(problems)}")
        return self

    def _recorded_specs(self, config: EngineRunConfig) -> list:
        """The layout a recorded run of your own training implies (training.own_training): its metadata names the
        tensors, their dtypes and shapes, the primary one stored as W in 2-D."""
        from flannel_repro.storage.format import TensorSpec

        recorded = json.loads(self.metadata["recorded"])
        tensors = recorded["tensors"]
        dtype_of = {name: getattr(torch, t["dtype"]) for name, t in tensors.items()}
        shape = [int(d) for d in tensors[recorded["primary"]]["shape"]]
        rows, cols = (shape[0], math.prod(shape[1:])) if len(shape) >= 2 else (1, math.prod(shape))
        batch = self.reader.spec(layout.KEY_BATCH_STARTS).shape[1] if layout.KEY_BATCH_STARTS in self.reader else 0
        specs = layout.run_artifact_specs(
            steps=config.steps, vocab_size=rows, hidden_dim=cols, batch_size=batch, dtype=dtype_of[recorded["primary"]]
        )
        for name, t in tensors.items():
            if name != recorded["primary"]:
                specs.append(TensorSpec(f"tensor.{name}", dtype_of[name], (config.steps + 1, *map(int, t["shape"]))))
        return specs

    def release_pages(self) -> None:
        """Drop the resident pages of the memory map behind `W`, `batch_starts` and `optional()`
        views (see `ArtifactReader.release_pages`); the views stay usable."""
        self.reader.release_pages()

    def close(self) -> None:
        self.reader.close()
