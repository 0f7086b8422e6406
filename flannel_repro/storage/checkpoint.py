"""Checkpoints for resuming a run: the full training state at one step, as safetensors plus JSON.

A checkpoint is one safetensors file. Its tensors are every tensor of the state (model parameters and
buffers, optimizer moments, RNG states); its metadata holds, as JSON, the state's structure with each
tensor replaced by a reference, the step, and what the caller adds (the run key, the digest of the
recorded tensor at that step, ...). Nothing is pickled: a checkpoint can be read by anything that reads
safetensors and JSON, and loading one runs no code.

It is written to a fresh temporary file (`mkstemp`: exclusive, unpredictable), fsynced and renamed, so a
kill at any moment leaves either the previous checkpoint or the new one, never half of one. The digest of
every tensor and of the metadata is written with it and checked by `load`: a checkpoint changed on disk
is refused (`ResumeError`), and the run it belonged to trains from the start.

What "the full state" is for a run:

* the model's `state_dict()`, the optimizer's and the LR scheduler's (a LambdaLR's lambdas are code,
  not state: they are rebuilt by the caller, only their counters are stored);
* the random number generators: torch's CPU generator, every initialised CUDA device's, numpy's global
  one and Python's `random`; and any `torch.Generator` the caller hands over by name;
* the data position: the step. Data orders here are pure functions of (data seed, step)
  (`flannel_repro.data.corpus.DataOrder`); a loader with its own generator hands that generator over.
"""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, cast

import torch

from flannel_repro.errors import ArtifactError

CHECKPOINT_FORMAT = "flannel-repro/checkpoint/2"  # 2: digests of every tensor and of the metadata
_REF = "__tensor__"
_TUPLE = "__tuple__"
_FLOAT = "__float__"  # non-finite floats, which strict JSON cannot hold
_INTKEYS = "__intkeys__"  # dicts with int keys (optimizer state is keyed by parameter index)


def pack(obj: Any, tensors: dict[str, torch.Tensor], prefix: str = "") -> Any:
    """`obj` as JSON with every tensor moved into `tensors` (by a reference), exactly reversible by `unpack`.

    Holds what state dicts hold: dicts (str or int keys), lists, tuples, str, int, float (inf and NaN
    too), bool, None and tensors. Anything else is refused with its path, rather than pickled."""
    if isinstance(obj, torch.Tensor):
        name = prefix or "tensor"
        tensors[name] = obj.detach().to("cpu", copy=True).contiguous()  # own storage: safetensors refuses shared ones
        return {_REF: name}
    if isinstance(obj, bool) or obj is None or isinstance(obj, (str, int)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {_FLOAT: repr(obj)}
    if isinstance(obj, (list, tuple)):
        items = [pack(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]
        return {_TUPLE: items} if isinstance(obj, tuple) else items
    if isinstance(obj, Mapping):
        if all(isinstance(k, str) for k in obj):
            if any(k in (_REF, _TUPLE, _FLOAT, _INTKEYS) for k in obj):
                raise ArtifactError(f"checkpoint state {prefix or '<root>'}: a key is one of the reserved names.")
            return {k: pack(v, tensors, f"{prefix}.{k}" if prefix else k) for k, v in obj.items()}
        if all(isinstance(k, int) and not isinstance(k, bool) for k in obj):
            return {_INTKEYS: [[k, pack(v, tensors, f"{prefix}.{k}")] for k, v in obj.items()]}
    raise ArtifactError(
        f"checkpoint state {prefix or '<root>'}: expected tensors, numbers, strings, lists or dicts with "
        f"str or int keys, got {type(obj).__name__}; it cannot be stored without pickling."
    )


def unpack(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [unpack(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if _REF in obj:
            return tensors[obj[_REF]]
        if _TUPLE in obj:
            return tuple(unpack(v, tensors) for v in obj[_TUPLE])
        if _FLOAT in obj:
            return float(obj[_FLOAT])
        if _INTKEYS in obj:
            return {int(k): unpack(v, tensors) for k, v in obj[_INTKEYS]}
        return {k: unpack(v, tensors) for k, v in obj.items()}
    return obj


def rng_state(generators: Mapping[str, torch.Generator] | None = None) -> dict[str, Any]:
    """Every random number generator a training step may draw from, as packable state."""
    import numpy as np

    # numpy's stubs type get_state() without arguments as the dict form; legacy=True (the default) is the tuple
    kind, keys, pos, has_gauss, cached = cast("tuple[str, np.ndarray, int, int, float]", np.random.get_state())
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
        "generators": {name: g.get_state() for name, g in (generators or {}).items()},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any], generators: Mapping[str, torch.Generator] | None = None) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))
    saved = state.get("generators", {})
    for name, g in (generators or {}).items():
        if name not in saved:
            raise ArtifactError(f"checkpoint: no state for the generator {name!r} (saved: {sorted(saved) or 'none'}).")
        g.set_state(saved[name])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int
    state: dict[str, Any]
    info: dict[str, Any]  # what the writer added (run key, digests, ...)


def _metadata_digest(fields: Mapping[str, str]) -> str:
    """blake2b-256 of the metadata fields a checkpoint is read by (format, step, state, info)."""
    import hashlib

    text = json.dumps([fields.get(k) for k in _CHECKED_FIELDS])
    return hashlib.blake2b(text.encode("utf-8"), digest_size=32).hexdigest()


_CHECKED_FIELDS = ("format", "step", "state", "info")


def require_own_file(path: Path, what: str) -> bool:
    """True when `path` is a regular file, False when nothing is there; ArtifactError when something else is
    (a directory, a link, a FIFO, a device): flannel-repro neither follows nor replaces what it did not write."""
    from flannel_repro.safeio import own_file

    return own_file(path, what) is not None


def save(
    path: str | os.PathLike[str], step: int, state: Mapping[str, Any], info: Mapping[str, Any] | None = None
) -> Path:
    """Write the checkpoint of `step` atomically (a fresh temporary file, fsync, rename, fsync of the folder).

    Every tensor's digest and a digest of the metadata are computed here, from what is being written, and
    checked by `load`: a checkpoint changed on disk afterwards is refused, never resumed."""
    import shutil

    from safetensors.torch import save as to_bytes

    from flannel_repro.safeio import write_bytes_atomic
    from flannel_repro.storage.format import digest_tensor, fsync_dir

    final = Path(path)
    require_own_file(final, "a checkpoint")
    tensors: dict[str, torch.Tensor] = {}
    skeleton = pack(dict(state), tensors)
    metadata = {
        "format": CHECKPOINT_FORMAT,
        "step": str(int(step)),
        "state": json.dumps(skeleton),
        "info": json.dumps(dict(info or {}), sort_keys=True),
    }
    metadata["checksums"] = json.dumps(
        {
            "tensors": {k: digest_tensor(t).hex() for k, t in sorted(tensors.items())},
            "metadata": _metadata_digest(metadata),
        },
        sort_keys=True,
    )
    blob = to_bytes(tensors, metadata=metadata)
    size = f"{len(blob) / 1e6:.1f} MB"
    try:
        free = shutil.disk_usage(final.parent).free
    except OSError as exc:
        raise ArtifactError(f"{final}: could not write the checkpoint ({exc.strerror or exc}).") from None
    if free < len(blob):
        raise ArtifactError(
            f"{final}: the checkpoint needs {size} and the file system of {final.parent} has "
            f"{free / 1e6:.1f} MB free; free some space or checkpoint less often."
        )
    write_bytes_atomic(final, blob, f"the checkpoint of step {step} ({size})")
    fsync_dir(final.parent)
    return final


def load(path: str | os.PathLike[str]) -> Checkpoint:
    """Read a checkpoint and verify it: every tensor and the metadata must hash to the digests written with
    them (ArtifactError naming the file when it is no checkpoint, ResumeError when it was changed on disk)."""
    from safetensors import safe_open

    from flannel_repro.errors import ResumeError
    from flannel_repro.storage.format import digest_tensor

    p = Path(path)
    if not require_own_file(p, "a checkpoint"):
        raise ArtifactError(f"{p}: expected a checkpoint, found no such file.")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise ArtifactError(f"{p}: expected a checkpoint, found no such file.") from None
    except Exception as exc:  # noqa: BLE001 (safetensors raises its own error types for damaged files)
        raise ResumeError(f"{p}: expected a checkpoint (safetensors), got an unreadable file ({exc}).") from None
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ResumeError(f"{p}: expected metadata format={CHECKPOINT_FORMAT!r}, got {meta.get('format')!r}.")
    try:
        sums = json.loads(meta["checksums"])
        expected_tensors, expected_meta = dict(sums["tensors"]), str(sums["metadata"])
    except (KeyError, ValueError, TypeError) as exc:
        raise ResumeError(f"{p}: the checkpoint's checksums are missing or damaged ({exc!r}).") from None
    if _metadata_digest(meta) != expected_meta:
        raise ResumeError(
            f"{p}: the checkpoint's metadata (step, state or info) does not hash to the digest written "
            "with it: it was changed after it was written."
        )
    if sorted(expected_tensors) != sorted(tensors):
        raise ResumeError(f"{p}: expected the tensors {sorted(expected_tensors)[:6]}..., got {sorted(tensors)[:6]}...")
    bad = [k for k, t in tensors.items() if digest_tensor(t).hex() != expected_tensors[k]]
    if bad:
        raise ResumeError(
            f"{p}: {len(bad)} tensor(s) do not hash to the digests written with them "
            f"({', '.join(sorted(bad)[:4])}): changed after the checkpoint was written."
        )
    try:
        state = unpack(json.loads(meta["state"]), tensors)
        info = json.loads(meta.get("info", "{}"))
        step = int(meta["step"])
    except (KeyError, ValueError, TypeError) as exc:
        raise ResumeError(f"{p}: the checkpoint's metadata is damaged ({exc!r}).") from None
    return Checkpoint(path=p, step=step, state=state, info=info)
