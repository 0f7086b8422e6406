"""The run layout: what one run's artifact holds (tensor names, shapes, metadata keys), written by the
training harness and read by the analysis.

One run is one safetensors file (`flannel_repro.storage.format`): W after every step, the losses,
W's per-step digests, the batches' example offsets and the live-token mask, plus optional
recordings, and metadata with the config, the data description and the environment.
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch

from flannel_repro.bits import bits_view
from flannel_repro.errors import ArtifactError
from flannel_repro.storage.format import DIGEST_SIZE, TensorSpec, digest_as_tensor, digest_tensor
from flannel_repro.storage.reader import ArtifactReader
from flannel_repro.storage.writer import ArtifactWriter

# --- per-run artifact layout (written by the harness, read by divergence and export) -----------

RUN_FORMAT = "flannel-repro/trajectory/1"

META_FORMAT = "format"  # RUN_FORMAT
META_CONFIG = "config"  # JSON of the RunConfig dict
META_DATA = "data"  # JSON with n_live, n_dead (and data hashes)
META_ENV = "env"  # JSON of the environment fingerprint (training.determinism.environment_fingerprint)

KEY_W = "W"  # (S+1, V, H), the run's parameter dtype; W[0] is W_initial
KEY_LOSSES = "losses"  # (S+1,) float32, NaN at step 0 (no loss before the first step)
KEY_DIGESTS = "digests"  # (S+1, 32) uint8, digest_tensor(W[t]) in the run's dtype
KEY_BATCH_STARTS = "batch_starts"  # (S, B) int64, example start offsets of each step's batch
KEY_LIVE_MASK = "live_mask"  # (V,) bool, True for tokens that occur in the corpus
KEY_GRADS = "grads"  # optional (S+1, V, H)
KEY_EXP_AVG = "exp_avg"  # optional (S+1, V, H)
KEY_EXP_AVG_SQ = "exp_avg_sq"  # optional (S+1, V, H)
KEY_PROBE_LOGITS = "probe_logits"  # optional, (S+1, ...) logits on a fixed probe batch
# (S+1, 3) float32, per step t (NaN at t = 0 and where unknown): the share of W's entries whose bits
# changed from t-1 to t; of the entries the optimizer proposed a nonzero update for, the share whose
# stored weight did not move (the update was lost to rounding); the share of Adam's second-moment
# entries whose bits changed. Columns named by UPDATE_FIELDS.
KEY_UPDATES = "updates"
UPDATE_FIELDS = ("changed", "lost", "second_moment_moved")


# --- per-run artifact helpers -------------------------------------------------------------------


def run_artifact_specs(
    *,
    steps: int,
    vocab_size: int,
    hidden_dim: int,
    batch_size: int,
    dtype: torch.dtype = torch.bfloat16,
    grads: bool = False,
    exp_avg: bool = False,
    exp_avg_sq: bool = False,
    probe_logits_shape: tuple[int, ...] | None = None,
    record_W: bool = True,
    updates: bool = True,
) -> list[TensorSpec]:
    """The specs of one run's artifact (see the KEY_* constants for meanings)."""
    rows = (steps + 1, vocab_size, hidden_dim)
    specs = [
        TensorSpec(KEY_LOSSES, torch.float32, (steps + 1,)),
        TensorSpec(KEY_DIGESTS, torch.uint8, (steps + 1, DIGEST_SIZE)),
        TensorSpec(KEY_BATCH_STARTS, torch.int64, (steps, batch_size)),
        TensorSpec(KEY_LIVE_MASK, torch.bool, (vocab_size,)),
    ]
    if record_W:
        specs.insert(0, TensorSpec(KEY_W, dtype, rows))
    if updates:
        specs.append(TensorSpec(KEY_UPDATES, torch.float32, (steps + 1, len(UPDATE_FIELDS))))
    for key, wanted in ((KEY_GRADS, grads), (KEY_EXP_AVG, exp_avg), (KEY_EXP_AVG_SQ, exp_avg_sq)):
        if wanted:
            specs.append(TensorSpec(key, dtype, rows))
    if probe_logits_shape is not None:
        specs.append(TensorSpec(KEY_PROBE_LOGITS, dtype, (steps + 1, *probe_logits_shape)))
    return specs


def written_through(names: Iterable[str], step: int) -> dict[str, int | None]:
    """What of a run artifact is written once step `step` is recorded, for `ArtifactWriter.reopen`: the
    live mask whole (None), `step` rows of batch starts (one per optimizer step), `step + 1` of the rest."""
    return {name: None if name == KEY_LIVE_MASK else step if name == KEY_BATCH_STARTS else step + 1 for name in names}


def changed_share(before: torch.Tensor | None, after: torch.Tensor) -> float:
    """The share of entries whose bits differ between two tensors of one dtype (NaN without `before`)."""
    if before is None or not after.numel():
        return float("nan")
    return float(torch.count_nonzero(bits_view(before) != bits_view(after))) / after.numel()


def run_metadata(config: Mapping[str, Any], data: Mapping[str, Any], **extra: str) -> dict[str, str]:
    """Metadata of a run artifact: format tag, config JSON, data JSON (+ extra str entries)."""
    return {
        META_FORMAT: RUN_FORMAT,
        META_CONFIG: json.dumps(dict(config), sort_keys=True),
        META_DATA: json.dumps(dict(data), sort_keys=True),
        **extra,
    }


def write_run(
    path: str | os.PathLike[str],
    W_steps: Iterable[torch.Tensor],
    *,
    steps: int,
    live_mask: torch.Tensor,
    config: Mapping[str, Any],
    data: Mapping[str, Any] | None = None,
    losses: torch.Tensor | None = None,
    batch_starts: torch.Tensor | None = None,
    batch_size: int = 4,
    digests_of: Sequence[torch.Tensor] | None = None,
) -> Path:
    """A per-run artifact in the harness's layout from W after each step 0..steps, streamed one step
    at a time: for trajectories made outside the harness (imports, synthetic runs in tests and
    benchmarks). `data` defaults to the live/dead counts of `live_mask`; `losses` to NaN and
    `batch_starts` to zeros; `digests_of[t]` replaces W_t as the tensor hashed for step t (to
    record a wrong digest on purpose)."""
    rows = iter(W_steps)
    first = next(rows, None)
    if first is None:
        raise ArtifactError(f"{path}: expected W for steps 0..{steps}, got no step.")
    vocab, hidden = first.shape
    n_live = int(live_mask.sum())
    specs = run_artifact_specs(
        steps=steps, vocab_size=vocab, hidden_dim=hidden, batch_size=batch_size, dtype=first.dtype
    )
    meta = run_metadata(config, data if data is not None else {"n_live": n_live, "n_dead": vocab - n_live})
    with ArtifactWriter(Path(path), specs, meta, checksum_exclude=(KEY_W,)) as w:
        w.write(KEY_LIVE_MASK, live_mask)
        w.write(KEY_LOSSES, losses if losses is not None else torch.full((steps + 1,), float("nan")))
        w.write(
            KEY_BATCH_STARTS,
            batch_starts if batch_starts is not None else torch.zeros(steps, batch_size, dtype=torch.int64),
        )
        prev = None
        for t, W in enumerate(itertools.chain([first], rows)):
            if t > steps:
                raise ArtifactError(f"{path}: expected W for steps 0..{steps}, got more.")
            w.write_row(KEY_W, t, W)
            # no optimizer here: only the share of entries that changed is known
            w.write_row(KEY_UPDATES, t, torch.tensor([changed_share(prev, W), float("nan"), float("nan")]))
            prev = W
            w.write_row(KEY_DIGESTS, t, digest_as_tensor(digest_tensor(W if digests_of is None else digests_of[t])))
        return w.finish()


def _json_meta(reader: ArtifactReader, key: str) -> dict[str, Any]:
    fmt = reader.metadata.get(META_FORMAT)
    if fmt != RUN_FORMAT:
        raise ArtifactError(f"{reader.path}: expected metadata format={RUN_FORMAT!r}, got {fmt!r}.")
    text = reader.metadata.get(key)
    if text is None:
        raise ArtifactError(f"{reader.path}: expected a {key!r} entry in the metadata, got none.")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{reader.path}: metadata {key!r}: expected JSON, got unparsable text ({e}).") from None
    if not isinstance(value, dict):
        raise ArtifactError(f"{reader.path}: metadata {key!r}: expected a JSON object, got {type(value).__name__}.")
    return value


def run_config(reader: ArtifactReader) -> dict[str, Any]:
    """The run's config dict from the metadata (ArtifactError if missing or not a run artifact)."""
    return _json_meta(reader, META_CONFIG)


def run_data(reader: ArtifactReader) -> dict[str, Any]:
    """The run's data dict (n_live, n_dead, hashes) from the metadata."""
    return _json_meta(reader, META_DATA)


def run_env(reader: ArtifactReader) -> dict[str, Any]:
    """The run's environment fingerprint from the metadata ({} when it was written without one)."""
    if META_ENV not in reader.metadata:
        return {}
    return _json_meta(reader, META_ENV)


def header_metadata(path: str | os.PathLike[str]) -> dict[str, str] | str:
    """A safetensors file's header metadata, read without trusting the rest of the file (a truncated run
    still names itself); else why not, as a string. Never blocks: a FIFO or device is not read."""
    import stat

    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        return exc.strerror or str(exc)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return "expected a regular file, got another kind"
        head = os.pread(fd, 8, 0)
        n = int.from_bytes(head, "little") if len(head) == 8 else 0
        if not 0 < n <= 100_000_000:
            return f"expected a safetensors header length, got {head.hex() or 'an empty file'}"
        header = json.loads(os.pread(fd, n, 8))
    except OSError as exc:
        return exc.strerror or str(exc)
    except ValueError:
        return "expected a JSON header, got other bytes"
    finally:
        os.close(fd)
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return meta if isinstance(meta, dict) else "expected header metadata, got none"
