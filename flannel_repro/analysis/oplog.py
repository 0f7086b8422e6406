"""Per-operation logs of one training step, and where two of them first differ.

An `OpLog` lists every aten operation of one optimizer step in the order it ran: its name, the phase of
the step (head-check, forward, backward, clip, optimizer), the innermost module it ran in (forward or
backward, e.g. `transformer.h.0.attn.c_attn`), and for each tensor input and output its dtype, shape,
a blake2b-128 digest of its bytes and its largest magnitude. It is recorded by
`flannel_repro.runs.replay.record_step` and is a small JSON file: written on machine A, compared on
machine B, exactly like a digest chain.

`compare_logs(a, b)` finds:

- the **root cause**: the first operation whose output differs while every tensor input is equal (an
  operation that computed other bits from the same bits: another kernel, another reduction order, a
  random number);
- the **first differing output** (the same operation, or an earlier one whose inputs already differed,
  e.g. when the batch itself differs);
- how far it differs: from the logs alone, the largest magnitudes on both sides; in one process (both
  runs replayed, `replay.first_divergent_operation`), max |Δ| and the distance in ulps of the outputs.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from flannel_repro.errors import ArtifactError
from flannel_repro.storage.jsonfile import read_json, write_text_atomic

OPLOG_FORMAT = "flannel-repro/op-log/1"


@dataclass(frozen=True)
class OpTensor:
    dtype: str
    shape: tuple[int, ...]
    digest: str  # blake2b-128 hex of the raw bytes
    absmax: float | None  # largest |x| (floating tensors), None otherwise

    def to_json(self) -> list[Any]:
        return [self.dtype, list(self.shape), self.digest, self.absmax]

    @classmethod
    def from_json(cls, raw: Any) -> "OpTensor | None":
        if raw is None:
            return None
        dtype, shape, digest, absmax = raw
        return cls(str(dtype), tuple(int(s) for s in shape), str(digest), None if absmax is None else float(absmax))

    def describe(self) -> str:
        return f"{self.dtype}{list(self.shape)}"


@dataclass(frozen=True)
class OpRecord:
    index: int
    op: str  # e.g. aten.mm.default
    phase: str  # head-check, forward, backward, clip, optimizer
    module: str  # innermost module ("" at top level)
    backward: bool
    args: str  # digest of the non-tensor arguments (ints, floats, dtypes, ...)
    inputs: tuple[OpTensor | None, ...]
    outputs: tuple[OpTensor | None, ...]

    @property
    def where(self) -> str:
        module = self.module or "(top level)"
        return f"{module} ({'backward' if self.backward else self.phase})"

    def to_json(self) -> dict[str, Any]:
        return {
            "op": self.op,
            "phase": self.phase,
            "module": self.module,
            "bw": self.backward,
            "args": self.args,
            "in": [None if t is None else t.to_json() for t in self.inputs],
            "out": [None if t is None else t.to_json() for t in self.outputs],
        }

    @classmethod
    def from_json(cls, index: int, raw: dict[str, Any]) -> "OpRecord":
        return cls(
            index,
            str(raw["op"]),
            str(raw["phase"]),
            str(raw["module"]),
            bool(raw["bw"]),
            str(raw["args"]),
            tuple(OpTensor.from_json(t) for t in raw["in"]),
            tuple(OpTensor.from_json(t) for t in raw["out"]),
        )


@dataclass
class OpLog:
    """Every operation of optimizer step `step` of one run, with what the step started from."""

    step: int
    label: str  # which run (seeds, device, engine, numerics class)
    config: dict[str, Any]
    env: dict[str, Any]  # torch version, numerics class, threads
    batch_starts: list[int]
    W_before: str  # digest (blake2b-256 hex, as in the artifact) of W after step - 1
    W_after: str
    ops: list[OpRecord] = field(default_factory=list)
    # blake2b-128 of every parameter and optimizer state tensor (and the learning rate) before the step:
    # W can be equal while another parameter already differs
    state_before: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": OPLOG_FORMAT,
            "step": self.step,
            "label": self.label,
            "config": self.config,
            "env": self.env,
            "batch_starts": self.batch_starts,
            "W_before": self.W_before,
            "W_after": self.W_after,
            "state_before": self.state_before,
            "ops": [o.to_json() for o in self.ops],
        }

    def write(self, path: str | os.PathLike[str]) -> Path:
        """Write as JSON (atomically: a temporary file renamed)."""
        return write_text_atomic(path, json.dumps(self.to_json(), separators=(",", ":")), "the op log")

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> "OpLog":
        p = Path(path)
        raw = read_json(p, "an op log (JSON, written by flannel-repro oplog -o)")
        if not isinstance(raw, dict) or raw.get("format") != OPLOG_FORMAT:
            got = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
            raise ArtifactError(f"{p}: expected format {OPLOG_FORMAT!r}, got {got!r}.")
        try:
            return cls(
                step=int(raw["step"]),
                label=str(raw["label"]),
                config=dict(raw["config"]),
                env=dict(raw["env"]),
                batch_starts=[int(s) for s in raw["batch_starts"]],
                W_before=str(raw["W_before"]),
                W_after=str(raw["W_after"]),
                state_before={str(k): str(v) for k, v in raw["state_before"].items()},
                ops=[OpRecord.from_json(i, o) for i, o in enumerate(raw["ops"])],
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(
                f"{p}: op log is missing or has a malformed entry ({type(exc).__name__}: {exc})."
            ) from None


# --- comparison ----------------------------------------------------------------------------------------


@dataclass
class OpDiff:
    """Where two op logs of the same step first differ (see the module docstring)."""

    step: int
    a: str  # labels of the two runs
    b: str
    kind: str  # "identical", "operation", "data", "before", "sequence"
    root: OpRecord | None = None  # first op with equal tensor inputs and a different output
    root_b: OpRecord | None = None
    first_output: OpRecord | None = None  # first op whose output differs at all
    differing_ops: int = 0
    total_ops: int = 0
    config_changes: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    detail: str = ""
    max_abs: float | None = None  # of the root's first differing output, when both were replayed here
    max_ulps: int | None = None

    @property
    def identical(self) -> bool:
        return self.kind == "identical"

    def to_json(self) -> dict[str, Any]:
        def op(r: OpRecord | None) -> dict[str, Any] | None:
            return None if r is None else {"index": r.index, **r.to_json()}

        return {
            "step": self.step,
            "a": self.a,
            "b": self.b,
            "kind": self.kind,
            "identical": self.identical,
            "root": op(self.root),
            "root_b": op(self.root_b),
            "first_output": op(self.first_output),
            "differing_ops": self.differing_ops,
            "total_ops": self.total_ops,
            "config_changes": {k: list(v) for k, v in self.config_changes.items()},
            "detail": self.detail,
            "max_abs": self.max_abs,
            "max_ulps": self.max_ulps,
        }

    def lines(self) -> list[str]:
        head = f"step {self.step}: {self.a}  vs  {self.b}"
        out = [head]
        if self.config_changes:
            out.append(
                "  configs differ in: "
                + ", ".join(f"{k} {v[0]!r} -> {v[1]!r}" for k, v in sorted(self.config_changes.items()))
            )
        if self.kind == "identical":
            out.append(f"  identical: all {self.total_ops} operations computed the same bits")
            return out
        if self.kind in ("data", "before"):
            out.append("  " + self.detail)
            return out
        if self.root is not None:
            r = self.root
            out.append(f"  root cause: op #{r.index} {r.op} in {r.where}: every tensor input equal, output differs")
            out.append(
                f"    inputs  {', '.join(t.describe() for t in r.inputs if t is not None) or '(none: a generator)'}"
                + ("" if self.root_b is None or self.root_b.args == r.args else "; its non-tensor arguments differ")
            )
            out.append(f"    outputs {', '.join(t.describe() for t in r.outputs if t is not None)}")
            if self.max_abs is not None:
                out.append(f"    max |Δ| {self.max_abs:.6g}, {self.max_ulps} ulp(s) at most")
            else:
                mags = [t.absmax for t in r.outputs if t is not None and t.absmax is not None]
                mags_b = [
                    t.absmax
                    for t in (self.root_b.outputs if self.root_b else ())
                    if t is not None and t.absmax is not None
                ]
                if mags and mags_b:
                    out.append(
                        f"    largest |output|: {mags[0]:.6g} vs {mags_b[0]:.6g} (replay both here for max |Δ| and ulps)"
                    )
        if self.first_output is not None and (self.root is None or self.first_output.index != self.root.index):
            f = self.first_output
            out.append(f"  first differing output: op #{f.index} {f.op} in {f.where} (its inputs already differed)")
        if self.detail:
            out.append("  " + self.detail)
        out.append(f"  {self.differing_ops} of {self.total_ops} operations of the step have a differing output")
        return out


def _config_changes(a: dict[str, Any], b: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    keys = set(a) | set(b)
    return {k: (a.get(k), b.get(k)) for k in keys if a.get(k) != b.get(k) and not k.endswith("_path")}


def compare_logs(a: OpLog, b: OpLog) -> OpDiff:
    """Where `a` and `b` (the same step of two runs) first differ."""
    diff = OpDiff(
        step=a.step,
        a=a.label,
        b=b.label,
        kind="identical",
        total_ops=len(a.ops),
        config_changes=_config_changes(a.config, b.config),
    )
    if a.step != b.step:
        diff.kind, diff.detail = "sequence", f"the logs are of different steps ({a.step} and {b.step})"
        return diff
    if a.W_before != b.W_before:
        diff.kind = "before"
        diff.detail = (
            f"W already differs before step {a.step} (digests {a.W_before[:16]} vs {b.W_before[:16]}): "
            "the runs parted at an earlier step; log the first step they part at"
        )
        return diff
    if a.state_before != b.state_before:
        keys = sorted(set(a.state_before) | set(b.state_before))
        differ = [k for k in keys if a.state_before.get(k) != b.state_before.get(k)]
        diff.kind = "before"
        diff.detail = (
            f"the runs already differ before step {a.step} in {len(differ)} parameter/optimizer tensor(s), "
            f"e.g. {', '.join(differ[:3])}{' (W itself is still equal)' if a.W_before == b.W_before else ''}: "
            "they parted at an earlier step; log the first step whose state differs "
            "(first_divergent_operation finds it)"
        )
        return diff
    if a.batch_starts != b.batch_starts:
        differ_at = [i for i, (x, y) in enumerate(zip(a.batch_starts, b.batch_starts)) if x != y]
        diff.kind = "data"
        diff.detail = (
            f"the batches differ at step {a.step}: {len(differ_at)} of {len(a.batch_starts)} examples "
            f"(first at position {differ_at[0] if differ_at else len(a.batch_starts)}: start "
            f"{a.batch_starts[differ_at[0]] if differ_at else '-'} vs {b.batch_starts[differ_at[0]] if differ_at else '-'}): "
            "the data order differs, not the arithmetic"
        )
        return diff
    for i, (x, y) in enumerate(zip(a.ops, b.ops)):
        # the module is not part of an operation's identity: in backward, ModTracker's attribution of an
        # operation that passes a gradient through (views of dropout, residual adds) can vary from run to run
        if (x.op, x.phase, x.backward) != (y.op, y.phase, y.backward):
            if diff.root is None:
                diff.kind = "sequence"
            diff.detail = (
                f"the runs execute different operations from op #{i}: {x.op} in {x.where} vs {y.op} in "
                f"{y.where} ({'after the root cause: ' if diff.root else ''}another code path)"
            )
            break
        if x.outputs != y.outputs:
            diff.differing_ops += 1
            if diff.first_output is None:
                diff.first_output = x
            if diff.root is None and x.inputs == y.inputs:
                diff.root, diff.root_b = x, y
                diff.kind = "operation"
    else:
        if len(a.ops) != len(b.ops):
            diff.kind = "sequence"
            diff.detail = f"one run executes more operations: {len(a.ops)} vs {len(b.ops)}"
    if diff.kind == "identical" and diff.first_output is not None:
        diff.kind = "operation"  # outputs differ but no op had equal inputs: reported by the first differing output
    if diff.kind == "identical" and a.W_after != b.W_after:
        diff.kind = "operation"
        diff.detail = "no logged operation differs, yet W after the step does: an operation outside the log moved it"
    return diff


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> int:
    """The largest distance in units in the last place between corresponding elements of two floating
    tensors of one dtype (0 when bitwise equal; +0 and -0 are 0 apart)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        raise ValueError(
            f"ulp_distance needs tensors of one dtype and shape, got {a.dtype}{list(a.shape)} and "
            f"{b.dtype}{list(b.shape)}"
        )
    ints = {
        torch.bfloat16: torch.int16,
        torch.float16: torch.int16,
        torch.float32: torch.int32,
        torch.float64: torch.int64,
    }
    if a.dtype not in ints:
        return 0 if torch.equal(a, b) else -1
    width = {torch.int16: 16, torch.int32: 32, torch.int64: 64}[ints[a.dtype]]

    def ordered(t: torch.Tensor) -> torch.Tensor:
        i = t.contiguous().view(ints[a.dtype]).to(torch.int64)
        magnitude = i & ((1 << (width - 1)) - 1) if width < 64 else i & 0x7FFFFFFFFFFFFFFF
        return torch.where(i < 0, -magnitude, magnitude)

    if a.numel() == 0:
        return 0
    return int((ordered(a) - ordered(b)).abs().max())
