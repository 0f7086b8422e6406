"""Run summaries: a few stable numbers per run, written as reviewable text and compared with tolerances.

A summary is what a team commits to say "this is what training looked like"; CI compares a fresh
run's summary with the committed one (the syrupy extension in `flannel_repro.snapshot` does that).
A run summary holds:

* the config (the fingerprinted fields, with the device reduced to its class: cpu, cuda or mps) and
  its fingerprint, and the hashes of the data files;
* at a fixed set of steps (0, 1, 10, 100, ... and the last, only those that exist): the loss,
  ‖W‖_F and the mean, std and max|W| of W, computed in float64 from the stored bf16 values with
  exactly rounded sums (so they do not depend on the thread count or the CPU), and the fraction of W
  entries that changed at that step (`divergence.update_fraction`, bitwise);
* the per-step digests of W: the first and last in full, a sha256 over the whole chain, and every
  step's first 16 hex characters (the "digest chain"), which is what lets two machines find the
  step where they part;
* the environment the run was trained in (package versions, device, threads, deterministic flags):
  stored so that a failure can say what changed, never compared.

A pair summary (`summarize_pair`) holds both runs' summaries and their divergence at those steps,
with the first step at which they part (`divergence.pair_divergence`).

Everything that is compared is a function of the artifact alone: no paths, no wall times, no
timestamps. The same trajectory gives the same text in every process and on every xdist worker.

Comparison (`compare`): floats within a tolerance ``|obtained - stored| <= max(atol, rtol * |stored|)``
(default exact; NaN equals NaN); ints, strings, digests and the config compare exactly; the digest
chains are compared step by step to report the first step at which the trajectories part.

This module imports only the standard library at import time; torch and numpy are imported by the
functions that read artifacts.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence, Union

from flannel_repro.devices import DEVICE_KINDS, device_kind
from flannel_repro.errors import ArtifactError, ConfigError
from flannel_repro.storage.jsonfile import read_json, write_text_atomic

if TYPE_CHECKING:
    from flannel_repro.storage.run import RunFile

__all__ = [
    "SUMMARY_FORMAT",
    "CHAIN_FORMAT",
    "PREFIX_HEX",
    "DEVICE_CLASSES",
    "Summary",
    "DigestChain",
    "ChainComparison",
    "Tolerance",
    "FieldChange",
    "Comparison",
    "default_steps",
    "device_class",
    "environment_subset",
    "summarize",
    "summarize_pair",
    "compare",
    "compare_run_to_chain",
    "environment_changes",
    "environment_lines",
]

SUMMARY_FORMAT = "flannel-repro/summary/1"
CHAIN_FORMAT = "flannel-repro/digest-chain/1"
DIGEST_ALGO = "blake2b-256"  # what artifacts.DIGEST_ALGO records (kept here to avoid importing torch)
PREFIX_HEX = 16  # hex characters kept per step in a digest chain (64 bits: collisions are not a concern)
CHAIN_ROW = 8  # prefixes per line of a chain as written: keeps a 1000-step chain at ~126 short lines
DEVICE_CLASSES = DEVICE_KINDS

# The part of `Trajectory.env` worth keeping with a summary: what can move a trajectory's numbers.
ENV_KEYS = ("flannel_repro", "code_version", "python", "packages", "device", "threads", "deterministic_algorithms",
            "cudnn_deterministic", "cudnn_benchmark", "allow_tf32", "env", "numerics")
# Data description fields that identify the data (the origin label and paths do not).
DATA_KEYS = ("tokenizer_sha256", "corpus_sha256", "token_mask_sha256", "n_tokens", "n_live", "n_dead")

RunLike = Union["RunFile", str, "os.PathLike[str]"]


# --- small helpers --------------------------------------------------------------------------------


def default_steps(total: int) -> list[int]:
    """0, 1, 10, 100, ... up to `total`, and `total` itself: the steps a summary records by default."""
    if total < 0:
        raise ValueError(f"default_steps: expected a step count >= 0, got {total}.")
    steps = {0, total}
    p = 1
    while p <= total:
        steps.add(p)
        p *= 10
    return sorted(steps)


def device_class(device: str) -> str:
    """'cuda:1' -> 'cuda'; 'cpu' -> 'cpu' (ConfigError for anything that is not a device string)."""
    return device_kind(device)


def environment_subset(env: Mapping[str, Any]) -> dict[str, Any]:
    """The keys of an environment fingerprint (`determinism.environment_fingerprint`) that can move a
    trajectory: versions, device, threads, deterministic flags, allocator/thread environment variables."""
    return {k: env[k] for k in ENV_KEYS if k in env}


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, Mapping):
        out: dict[str, Any] = {}
        for k in sorted(tree):
            out.update(_flatten(tree[k], f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: tree}


def _same(a: Any, b: Any) -> bool:
    """Exact equality of JSON values with NaN equal to NaN and bool kept apart from int."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or a == b
    return bool(a == b)


# --- digest chains --------------------------------------------------------------------------------


def _pack(prefixes: Sequence[str]) -> list[str]:
    return [" ".join(prefixes[i:i + CHAIN_ROW]) for i in range(0, len(prefixes), CHAIN_ROW)]


def _unpack(rows: Any, where: str) -> list[str]:
    if not isinstance(rows, list) or not all(isinstance(r, str) for r in rows):
        raise ArtifactError(f"{where}: expected a list of strings of space-separated hex digests, got {type(rows).__name__}.")
    prefixes = [p for row in rows for p in row.split()]
    for i, p in enumerate(prefixes):
        if not p or any(c not in "0123456789abcdef" for c in p):
            raise ArtifactError(f"{where}: step {i}: expected lowercase hex, got {p!r}.")
    return prefixes


@dataclass(frozen=True)
class ChainComparison:
    """Where two digest chains (stored, obtained) part.

    `first_step` is the first step, among the steps both chains have, whose digests differ (None if
    they agree on all of them). Digests are compared on the shorter of the two prefix lengths.
    """

    first_step: int | None
    stored_steps: int  # number of entries (steps + 1) in the stored chain
    obtained_steps: int
    stored_digest: str | None = None  # the digests at first_step
    obtained_digest: str | None = None

    @property
    def identical(self) -> bool:
        return self.first_step is None and self.stored_steps == self.obtained_steps

    @property
    def common(self) -> int:
        return min(self.stored_steps, self.obtained_steps)

    def describe(self) -> str:
        """One line: identical, the step they part at, or a length difference."""
        if self.first_step is not None:
            k = self.first_step
            agree = "no step agrees (step 0, the initial W, already differs)" if k == 0 else (
                f"steps 0..{k - 1} agree")
            return (f"the trajectories part at step {k} ({agree}; at step {k} stored {self.stored_digest}, "
                    f"obtained {self.obtained_digest})")
        if self.stored_steps != self.obtained_steps:
            return (f"steps 0..{self.common - 1} agree, but the stored chain has {self.stored_steps - 1} steps and "
                    f"the obtained one {self.obtained_steps - 1}")
        return f"digest chains identical over all {self.stored_steps} entries (steps 0..{self.stored_steps - 1})"


@dataclass(frozen=True)
class DigestChain:
    """The per-step digests of one run (step 0 = W_initial .. step S), as hex prefixes.

    A few kilobytes even for 1000 steps: exchange these, not the trajectories, to find where two
    machines' runs part. `info` carries what identifies the run (label, config fingerprint,
    environment, full first/last digests); it is written along but not compared.
    """

    prefixes: tuple[str, ...]
    algorithm: str = DIGEST_ALGO
    info: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if not self.prefixes:
            raise ArtifactError("digest chain: expected at least one step (step 0), got none.")

    def __len__(self) -> int:
        return len(self.prefixes)

    @property
    def steps(self) -> int:
        return len(self.prefixes) - 1

    @classmethod
    def from_run(cls, run: RunLike, *, prefix_hex: int = PREFIX_HEX) -> "DigestChain":
        """The chain of a recorded run, from the digests stored in its artifact."""
        traj = _trajectory(run)
        if not 1 <= prefix_hex <= 64:
            raise ValueError(f"prefix_hex: expected 1..64 hex characters, got {prefix_hex}.")
        full = _digest_hex(traj)
        info = {
            "run": traj.label,
            "config_fingerprint": _config_fingerprint(traj),
            "steps": traj.steps,
            "first": full[0],
            "last": full[-1],
            "chain_sha256": _chain_sha256(full),
            "environment": environment_subset(traj.env),
        }
        algo = traj.metadata.get("digest_algo", DIGEST_ALGO)
        return cls(tuple(d[:prefix_hex] for d in full), algorithm=algo, info=info)

    def to_json(self) -> dict[str, Any]:
        return {"format": CHAIN_FORMAT, "algorithm": self.algorithm, "prefix_hex": len(self.prefixes[0]),
                "digests": _pack(self.prefixes), **{k: v for k, v in self.info.items() if k not in ("format",)}}

    @classmethod
    def from_json(cls, data: Any, *, source: str = "digest chain") -> "DigestChain":
        if not isinstance(data, dict):
            raise ArtifactError(f"{source}: expected a JSON object, got {type(data).__name__}.")
        if data.get("format") != CHAIN_FORMAT:
            raise ArtifactError(f"{source}: expected format {CHAIN_FORMAT!r}, got {data.get('format')!r} "
                                "(not written by `flannel-repro digests -o`?).")
        prefixes = _unpack(data.get("digests"), f"{source}: 'digests'")
        info = {k: v for k, v in data.items() if k not in ("format", "algorithm", "prefix_hex", "digests")}
        return cls(tuple(prefixes), algorithm=str(data.get("algorithm", DIGEST_ALGO)), info=info)

    def write(self, path: str | os.PathLike[str]) -> Path:
        """Write the chain as JSON (sorted keys, one row of prefixes per line)."""
        return write_text_atomic(path, json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n", "the digest chain")

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> "DigestChain":
        return cls.from_json(read_json(path, "a digest chain JSON file"), source=str(path))

    def compare(self, obtained: "DigestChain") -> ChainComparison:
        """Compare `obtained` against this (stored) chain, step by step."""
        if self.algorithm != obtained.algorithm:
            raise ArtifactError(f"digest chains: expected the same algorithm, got {self.algorithm!r} (stored) and "
                                f"{obtained.algorithm!r} (obtained).")
        return _compare_prefixes(self.prefixes, obtained.prefixes)


def _compare_prefixes(stored: Sequence[str], obtained: Sequence[str]) -> ChainComparison:
    for t, (s, o) in enumerate(zip(stored, obtained)):
        n = min(len(s), len(o))
        if s[:n] != o[:n]:
            return ChainComparison(t, len(stored), len(obtained), s, o)
    return ChainComparison(None, len(stored), len(obtained))


def compare_run_to_chain(run: RunLike, stored: "DigestChain | str | os.PathLike[str]") -> tuple[ChainComparison, list[str]]:
    """Where a recorded run's digests part from a stored chain (a DigestChain or its file).

    Returns the comparison and a report: one line saying where they part (or that they agree),
    then, when they differ, how the chain's recorded environment differs from the run's.
    """
    chain = stored if isinstance(stored, DigestChain) else DigestChain.read(stored)
    traj = _trajectory(run)
    result = chain.compare(DigestChain.from_run(traj, prefix_hex=len(chain.prefixes[0])))
    lines = [result.describe()]
    fingerprint = chain.info.get("config_fingerprint")
    if not result.identical and fingerprint is not None and fingerprint != _config_fingerprint(traj):
        lines.append(f"config differs: the chain's config fingerprint is {fingerprint}, this run's "
                     f"{_config_fingerprint(traj)}")
    stored_env = chain.info.get("environment")
    if not result.identical and isinstance(stored_env, Mapping):
        obtained_env = environment_subset(traj.env)
        lines.extend(environment_lines(environment_changes(stored_env, obtained_env), obtained_env))
    return result, lines


def environment_changes(stored: Mapping[str, Any], obtained: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """(dotted key, stored, obtained) for every environment entry that differs (MISSING when absent)."""
    fs, fo = _flatten(stored), _flatten(obtained)
    return [(k, fs.get(k, MISSING), fo.get(k, MISSING)) for k in sorted(set(fs) | set(fo))
            if not _same(fs.get(k, MISSING), fo.get(k, MISSING))]


def environment_lines(changes: Sequence[tuple[str, Any, Any]], obtained: Mapping[str, Any]) -> list[str]:
    """'environment: same as stored (torch ..., 1 thread(s), ...)' or one line per difference."""
    if not changes:
        pk = obtained.get("packages") or {}
        dev = obtained.get("device") or {}
        brief = ", ".join(x for x in (
            f"torch {pk['torch']}" if "torch" in pk else "",
            f"transformers {pk['transformers']}" if "transformers" in pk else "",
            f"{dev.get('kind', '?')} {dev.get('name', '')}".strip() if dev else "",
            f"{obtained['threads']} thread(s)" if "threads" in obtained else "",
            f"deterministic {'on' if obtained.get('deterministic_algorithms') else 'off'}",
        ) if x)
        return [f"environment: same as stored ({brief})"]
    lines = ["environment differs from the stored one (the usual reason a trajectory moves without a config change):"]
    lines.extend(f"  {key}: {_show(s, 60)} -> {_show(o, 60)}" for key, s, o in changes)
    return lines


# --- building summaries ---------------------------------------------------------------------------


def _trajectory(run: RunLike) -> "RunFile":
    from flannel_repro.storage.run import RunFile  # here, not at the top: importing this module stays light

    return run if isinstance(run, RunFile) else RunFile(run)


def _digest_hex(traj: "RunFile") -> list[str]:
    return [bytes(row).hex() for row in traj.digests.numpy().tolist()]


def _chain_sha256(full_hex: Sequence[str]) -> str:
    h = hashlib.sha256()
    for d in full_hex:
        h.update(bytes.fromhex(d))
    return h.hexdigest()


def _config_dict(traj: "RunFile") -> dict[str, Any]:
    import dataclasses

    cfg = traj.config
    out = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.metadata.get("fingerprint", True)}
    if "params" in out:  # an engine run's own hyperparameters (a read-only mapping)
        out["params"] = dict(out["params"])
    out["device"] = device_class(cfg.device)
    return out


def _config_fingerprint(traj: "RunFile") -> str:
    cfg = traj.config
    return cfg.replace(device=device_class(cfg.device)).fingerprint()


def _w_stats(w: Any) -> dict[str, float]:
    """‖W‖_F, mean, std (population) and max|W| in float64, with exactly rounded sums (math.fsum):
    independent of thread count, SIMD width and summation order."""
    import numpy as np
    import torch

    x = w.to(torch.float64).numpy().reshape(-1)
    n = x.size
    if n == 0:
        return {"frobenius": 0.0, "mean": math.nan, "std": math.nan, "max_abs": math.nan}
    sumsq = math.fsum((x * x).tolist())  # squares of bf16/f32 values are exact in float64
    mean = math.fsum(x.tolist()) / n
    d = x - mean
    var = math.fsum((d * d).tolist()) / n
    return {"frobenius": math.sqrt(sumsq), "mean": mean, "std": math.sqrt(var), "max_abs": float(np.abs(x).max())}


def _update_fraction_at(traj: "RunFile", t: int) -> float:
    """Share of W entries whose bits changed from step t-1 to t (as `divergence.update_fraction`)."""
    from flannel_repro.bits import bits_view

    cur, prev = traj.W_at(t), traj.W_at(t - 1)
    changed = int((bits_view(cur) != bits_view(prev)).sum())
    return changed / max(1, cur.numel())


def _chosen_steps(traj: "RunFile", steps: Iterable[int] | None) -> list[int]:
    total = traj.steps
    if steps is None:
        return default_steps(total)
    chosen = sorted({int(s) for s in steps})
    bad = [s for s in chosen if not 0 <= s <= total]
    if bad:
        raise ValueError(f"summary steps: expected steps in 0..{total} for {traj.label}, got {bad}.")
    if not chosen:
        raise ValueError(f"summary steps: expected at least one step in 0..{total}, got none.")
    return chosen


def _run_tree(traj: "RunFile", chosen: Sequence[int]) -> dict[str, Any]:
    full = _digest_hex(traj)
    if len(full) != traj.steps + 1:
        raise ArtifactError(f"{traj.path}: expected {traj.steps + 1} digests (steps 0..{traj.steps}), got {len(full)}.")
    losses = traj.losses.tolist()
    records = []
    for t in chosen:
        rec: dict[str, Any] = {"step": t}
        if t >= 1:
            rec["loss"] = float(losses[t])
        if traj.has_W:
            rec["W"] = _w_stats(traj.W_at(t))
            if t >= 1:
                rec["update_fraction"] = _update_fraction_at(traj, t)
        records.append(rec)
    return {
        "config": _config_dict(traj),
        "config_fingerprint": _config_fingerprint(traj),
        "data": {k: traj.data_info[k] for k in DATA_KEYS if k in traj.data_info},
        "device_class": device_class(traj.config.device),
        "digests": {
            "algorithm": traj.metadata.get("digest_algo", DIGEST_ALGO),
            "chain_sha256": _chain_sha256(full),
            "first": full[0],
            "last": full[-1],
            "prefix_hex": PREFIX_HEX,
        },
        "digest_chain": _pack([d[:PREFIX_HEX] for d in full]),
        "steps": records,
        "total_steps": traj.steps,
    }


def summarize(run: RunLike, steps: Iterable[int] | None = None) -> "Summary":
    """The summary of one recorded run (a Trajectory or the path of its artifact).

    `steps` defaults to `default_steps(run.steps)`: 0, 1, 10, 100, ... and the last step.
    """
    traj = _trajectory(run)
    tree = {"format": SUMMARY_FORMAT, "kind": "run", **_run_tree(traj, _chosen_steps(traj, steps)),
            "environment": environment_subset(traj.env)}
    return Summary(tree)


def summarize_pair(a: RunLike, b: RunLike, steps: Iterable[int] | None = None) -> "Summary":
    """The summary of two runs and of their divergence (max|ΔW|, ‖ΔW‖_F, rows differing) at the
    summary steps, with the first step at which they part (None when they never do)."""
    from flannel_repro.analysis.divergence import pair_divergence

    ta, tb = _trajectory(a), _trajectory(b)
    if ta.steps != tb.steps:
        raise ArtifactError(f"pair summary: expected two runs of the same length, got {ta.steps} steps ({ta.label}) "
                            f"and {tb.steps} ({tb.label}).")
    chosen = _chosen_steps(ta, steps)
    div = pair_divergence(ta.reader, tb.reader, steps=chosen)
    records = []
    for t in chosen:
        s = div.at(t)
        records.append({"step": t, "max_abs": s["max_abs"], "frobenius": s["frobenius"],
                        "rows_differ": s["rows_differ"], "rows_differ_live": s["rows_differ_live"],
                        "rows_differ_dead": s["rows_differ_dead"]})
    ca, cb = device_class(ta.config.device), device_class(tb.config.device)
    tree = {
        "format": SUMMARY_FORMAT,
        "kind": "pair",
        "device_class": ca if ca == cb else f"{ca}+{cb}",
        "a": _run_tree(ta, chosen),
        "b": _run_tree(tb, chosen),
        "divergence": {"first_step": div.first_step, "steps": records},
        "environment": environment_subset(ta.env),
    }
    if environment_subset(tb.env) != tree["environment"]:
        tree["environment_b"] = environment_subset(tb.env)
    return Summary(tree)


# --- the summary object and its text --------------------------------------------------------------


class Summary:
    """A run's or a pair's summary: a JSON tree with the layout described in the module docstring.

    `to_text()` is the canonical text (sorted keys, two-space indent, floats as repr: round-trip
    exact, one value per line); `Summary.from_text` reads it back.
    """

    __slots__ = ("tree",)

    def __init__(self, tree: Mapping[str, Any]) -> None:
        if not isinstance(tree, Mapping):
            raise ArtifactError(f"summary: expected a JSON object, got {type(tree).__name__}.")
        self.tree: dict[str, Any] = dict(tree)

    @property
    def format(self) -> Any:
        return self.tree.get("format")

    @property
    def kind(self) -> str:
        return str(self.tree.get("kind", "run"))

    @property
    def device_class(self) -> str:
        """'cpu', 'cuda', 'mps', or 'cpu+cuda' for a pair across device classes."""
        return str(self.tree.get("device_class", "cpu"))

    @property
    def environment(self) -> dict[str, Any]:
        return dict(self.tree.get("environment") or {})

    @property
    def numerics_class(self) -> str:
        """The numerics class the run(s) were trained in ('cpu-portable-cbf7a60f-t1'; 'A+B' for a pair across
        classes); the device class for a summary written before classes were recorded."""
        def of(env: Any, fallback: str) -> str:
            numerics = env.get("numerics") if isinstance(env, Mapping) else None
            name = numerics.get("class") if isinstance(numerics, Mapping) else None
            return str(name) if name else fallback

        kinds = self.device_class.split("+")
        first = of(self.tree.get("environment"), kinds[0])
        if "environment_b" not in self.tree:
            return first
        second = of(self.tree.get("environment_b"), kinds[-1])
        return first if second == first else f"{first}+{second}"

    def chains(self) -> dict[str, list[str]]:
        """The digest chain(s): {'': chain} for a run, {'a': ..., 'b': ...} for a pair."""
        out: dict[str, list[str]] = {}
        for side, sub in (("", self.tree), ("a", self.tree.get("a")), ("b", self.tree.get("b"))):
            if isinstance(sub, Mapping) and "digest_chain" in sub:
                out[side] = _unpack(sub["digest_chain"], f"summary{'.' + side if side else ''}.digest_chain")
        return out

    def to_text(self) -> str:
        return json.dumps(self.tree, indent=2, sort_keys=True, ensure_ascii=False, allow_nan=True) + "\n"

    @classmethod
    def from_text(cls, text: str, *, source: str = "summary") -> "Summary":
        try:
            tree = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ArtifactError(f"{source}: expected a flannel-repro summary (JSON), got unparsable text ({exc}).") from None
        if not isinstance(tree, dict):
            raise ArtifactError(f"{source}: expected a JSON object, got {type(tree).__name__}.")
        return cls(tree)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Summary):
            return NotImplemented
        return self.to_text() == other.to_text()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        fp = self.tree.get("config_fingerprint") or (self.tree.get("a") or {}).get("config_fingerprint", "?")
        steps = self.tree.get("total_steps") or (self.tree.get("a") or {}).get("total_steps", "?")
        return f"Summary({self.kind}, {self.device_class}, {steps} steps, config {fp})"


# --- comparison -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tolerance:
    """How far a float may move: |obtained - stored| <= max(atol, rtol * |stored|). Default exact."""

    rtol: float = 0.0
    atol: float = 0.0

    def __post_init__(self) -> None:
        for name in ("rtol", "atol"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ConfigError(f"tolerance {name!r} must be a finite number >= 0 (got {value!r}).")
            object.__setattr__(self, name, float(value))

    @property
    def exact(self) -> bool:
        return self.rtol == 0.0 and self.atol == 0.0

    def allowed(self, stored: float) -> float:
        return max(self.atol, self.rtol * abs(stored))

    def accepts(self, stored: float, obtained: float) -> bool:
        s, o = float(stored), float(obtained)
        if math.isnan(s) or math.isnan(o):
            return math.isnan(s) and math.isnan(o)
        if s == o:
            return True
        if math.isinf(s) or math.isinf(o):
            return False
        return abs(o - s) <= self.allowed(s)

    def __str__(self) -> str:
        return "exact" if self.exact else f"rtol={self.rtol:g}, atol={self.atol:g}"


class _Missing:
    def __repr__(self) -> str:
        return "(absent)"


MISSING: Any = _Missing()


@dataclass(frozen=True)
class FieldChange:
    """One compared value that moved: where, stored vs obtained, and how it was compared.

    kind: 'float' (compared within the tolerance), 'exact', 'chain' (a digest chain; `detail` says
    where it parts), 'added' or 'removed' (present on one side only).
    """

    path: str
    stored: Any
    obtained: Any
    kind: str
    detail: str = ""


@dataclass(frozen=True)
class _Step:
    step: int


def _render(path: Sequence[Any]) -> str:
    names: list[str] = []
    step: int | None = None
    for tok in path:
        if isinstance(tok, _Step):
            if names and names[-1] == "steps":
                names.pop()
            step = tok.step
        elif isinstance(tok, int):
            names[-1] = f"{names[-1] if names else ''}[{tok}]"
        else:
            names.append(str(tok))
    text = ".".join(names)
    if step is None:
        return text or "(summary)"
    return f"{text} @ step {step}" if text else f"step {step}"


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _is_step_records(x: Any) -> bool:
    return isinstance(x, list) and all(isinstance(r, dict) and isinstance(r.get("step"), int) for r in x)


@dataclass
class Comparison:
    """The outcome of comparing an obtained summary with a stored one."""

    tolerance: Tolerance
    compared: int = 0
    changes: list[FieldChange] = field(default_factory=list)
    chains: dict[str, ChainComparison] = field(default_factory=dict)
    environment: list[tuple[str, Any, Any]] = field(default_factory=list)  # (key, stored, obtained)
    stored_environment: dict[str, Any] = field(default_factory=dict)
    obtained_environment: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    kind: str = "run"  # of the stored summary: 'run' or 'pair'
    band: Any = None  # a noise.NoiseBand when compared across numerics classes (noise.compare_within_band)
    within_band: int = 0  # values that moved, but within the band
    stored_class: str = ""  # numerics classes of the two sides (shown when they differ)
    obtained_class: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None and not self.changes

    @property
    def first_divergent_step(self) -> int | None:
        """The earliest step at which any compared digest chain parts (None if none does)."""
        steps = [c.first_step for c in self.chains.values() if c.first_step is not None]
        return min(steps) if steps else None

    def environment_line(self) -> list[str]:
        return environment_lines(self.environment, self.obtained_environment)

    def report(self, *, name: str = "", location: str | None = None, max_rows: int = 40) -> list[str]:
        """The failure message, as lines: which fields moved, stored vs obtained, the difference and the
        tolerance, the first divergent step of the digest chains, and environment differences."""
        label = f"flannel snapshot {name}" if name else "flannel summary"
        if self.error is not None:
            lines = [f"{label}: {self.error}"]
            if location:
                lines.append(f"  snapshot file: {display_path(location)}")
            lines.append("  to rewrite it from this run: pytest --snapshot-update")
            return lines
        if self.ok:
            return [f"{label} matches ({self.compared} values compared, tolerance: {self.tolerance})"]
        if self.band is not None:
            lines = [f"{label} moved beyond the noise band: {len(self.changes)} of {self.compared} compared values "
                     f"differ by more than arithmetic alone moves them ({self.within_band} moved within the band)"]
        else:
            lines = [f"{label} moved: {len(self.changes)} of {self.compared} compared values differ "
                     f"(tolerance: {self.tolerance})"]
        if location:
            lines.append(f"  snapshot file: {display_path(location)}")
        if self.stored_class != self.obtained_class:
            lines.append(f"  numerics class: stored {self.stored_class}, this run {self.obtained_class}")
        if self.band is not None:
            lines.append(f"  compared within the {self.band.describe()}")
        for side, chain in self.chains.items():
            if not chain.identical:
                lines.append(f"  {side + ': ' if side else ''}{chain.describe()}")
        parted = sorted({c.first_step for c in self.chains.values() if c.first_step})
        if parted:
            lines.append(f"  which operation moved it: `flannel-repro oplog ARTIFACT --step {parted[0]} -o here.json` here "
                         "and where the snapshot holds, then `flannel-repro why here.json there.json`")
        lines.extend("  " + line for line in self.environment_line())
        lines.append("")
        rows = [("field", "stored", "obtained", "difference", "allowed")]
        for ch in self.changes[:max_rows]:
            allowed = self.band.allowed(self.kind, ch.path) if self.band is not None else None
            rows.append(_row(ch, self.tolerance, allowed))
        widths = [min(max(len(r[i]) for r in rows), cap) for i, cap in enumerate((44, 24, 24, 30, 14))]
        for r in rows:
            lines.append("  " + "  ".join(_fit(c, w).ljust(w) for c, w in zip(r, widths)).rstrip())
        if len(self.changes) > max_rows:
            lines.append(f"  ... and {len(self.changes) - max_rows} more")
        lines.append("")
        where = f" and commit {display_path(location)}" if location else ""
        lines.append(f"  if the change is intended: pytest --snapshot-update, then review{where}")
        return lines


def display_path(location: str) -> str:
    """A path as messages show it: relative to the working directory when possible."""
    try:
        return os.path.relpath(location)
    except ValueError:
        return location


def _fit(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"


def _show(value: Any, limit: int = 24) -> str:
    if value is MISSING:
        return "(absent)"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        text = value
    else:
        text = json.dumps(value, sort_keys=True, allow_nan=True)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _row(ch: FieldChange, tol: Tolerance, allowed: float | None = None) -> tuple[str, str, str, str, str]:
    """One table row; `allowed` is a noise band's allowance for the field (None: the tolerance's)."""
    if ch.kind == "float" or (allowed is not None and _is_number(ch.stored) and _is_number(ch.obtained)):
        s, o = float(ch.stored), float(ch.obtained)
        if math.isfinite(s) and math.isfinite(o):
            diff = f"{o - s:+.3e}" + (f" (rel {abs(o - s) / abs(s):.2e})" if s else "")
        else:
            diff = "non-finite"
        if allowed is not None:
            return ch.path, repr(ch.stored), repr(ch.obtained), diff, f"band {allowed:.3g}" if allowed else "exact (band 0)"
        return ch.path, repr(s), repr(o), diff, "exact" if tol.exact else f"{tol.allowed(s):.3g}"
    if ch.kind == "chain":
        return ch.path, _show(ch.stored, 22), _show(ch.obtained, 22), ch.detail, "exact"
    diff = ch.detail
    if not diff and _is_number(ch.stored) and _is_number(ch.obtained):
        diff = f"{ch.obtained - ch.stored:+}"
    elif not diff and ch.kind in ("added", "removed"):
        diff = ch.kind
    return ch.path, _show(ch.stored, 22), _show(ch.obtained, 22), diff, "exact"


class _Walker:
    def __init__(self, tolerance: Tolerance, out: Comparison) -> None:
        self.tol = tolerance
        self.out = out

    def walk(self, s: Any, o: Any, path: tuple[Any, ...]) -> None:
        key = path[-1] if path else None
        if key in ("environment", "environment_b"):
            return
        if key == "digest_chain":
            self.chain(s, o, path)
            return
        if isinstance(s, dict) and isinstance(o, dict):
            for k in sorted(set(s) | set(o), key=str):
                if k not in o:
                    self.change(path + (k,), s[k], MISSING, "removed")
                elif k not in s:
                    self.change(path + (k,), MISSING, o[k], "added")
                else:
                    self.walk(s[k], o[k], path + (k,))
            return
        if _is_step_records(s) and _is_step_records(o) and (s or o):
            sm = {r["step"]: r for r in s}
            om = {r["step"]: r for r in o}
            for t in sorted(set(sm) | set(om)):
                if t not in om:
                    self.change(path + (_Step(t),), "recorded", MISSING, "removed", "step not in the obtained summary")
                elif t not in sm:
                    self.change(path + (_Step(t),), MISSING, "recorded", "added", "step not in the stored summary")
                else:
                    self.walk(sm[t], om[t], path + (_Step(t),))
            return
        if isinstance(s, list) and isinstance(o, list):
            if len(s) != len(o):
                self.change(path, f"{len(s)} items", f"{len(o)} items", "exact", "length differs")
                return
            for i, (a, b) in enumerate(zip(s, o)):
                self.walk(a, b, path + (i,))
            return
        self.out.compared += 1
        exact_zone = "config" in path
        if _is_number(s) and _is_number(o) and (isinstance(s, float) or isinstance(o, float)) and not exact_zone:
            if not self.tol.accepts(s, o):
                self.change(path, s, o, "float")
        elif not _same(s, o):
            self.change(path, s, o, "exact")

    def chain(self, s: Any, o: Any, path: tuple[Any, ...]) -> None:
        side = ".".join(str(p) for p in path[:-1])
        where = _render(path)
        try:
            sp = _unpack(s, f"stored {where}")
            op = _unpack(o, f"obtained {where}")
        except ArtifactError as exc:
            self.change(path, MISSING, MISSING, "exact", str(exc))
            return
        self.out.compared += 1
        cmp = _compare_prefixes(sp, op)
        self.out.chains[side] = cmp
        if cmp.identical:
            return
        if cmp.first_step is not None:
            t = cmp.first_step
            self.change(path, f"{sp[t]}@{t}", f"{op[t]}@{t}", "chain", f"parts at step {t}")
        else:
            self.change(path, f"{len(sp)} steps", f"{len(op)} steps", "chain", "length differs")

    def change(self, path: tuple[Any, ...], s: Any, o: Any, kind: str, detail: str = "") -> None:
        self.out.changes.append(FieldChange(_render(path), s, o, kind, detail))


def compare(stored: "Summary | str", obtained: "Summary | str", tolerance: Tolerance | None = None) -> Comparison:
    """Compare an obtained summary with a stored one (Summary objects or their text).

    A stored text that cannot be read, or that has another format, gives a Comparison whose `error`
    says so (it never raises for a bad stored side: `--snapshot-update` must be able to replace it).
    """
    tol = tolerance or Tolerance()
    out = Comparison(tolerance=tol)
    try:
        s = stored if isinstance(stored, Summary) else Summary.from_text(stored, source="stored snapshot")
    except ArtifactError as exc:
        out.error = f"the stored snapshot cannot be read: {exc}"
        return out
    o = obtained if isinstance(obtained, Summary) else Summary.from_text(obtained, source="obtained summary")
    if s.format != o.format:
        out.error = (f"the stored snapshot has format {s.format!r}, this version of flannel-repro writes {o.format!r}; "
                     "it has to be regenerated")
        return out
    _Walker(tol, out).walk(s.tree, o.tree, ())
    out.kind = s.kind
    out.stored_class, out.obtained_class = s.numerics_class, o.numerics_class
    out.stored_environment = s.environment
    out.obtained_environment = o.environment
    out.environment = environment_changes(out.stored_environment, out.obtained_environment)
    return out
