"""Run summaries: a few stable numbers per run, built from its artifact, and their reviewable text.

A summary is what a team commits to say "this is what training looked like"; CI compares a fresh
run's summary with the committed one (`compare.compare`, through the syrupy extension in
`flannel_repro.plugin.snapshot`). A run summary holds:

* the config (the fingerprinted fields, with the device reduced to its class: cpu, cuda or mps) and
  its fingerprint, and the hashes of the data files (`provenance`);
* at a fixed set of steps (0, 1, 10, 100, ... and the last, only those that exist): the loss,
  ‖W‖_F and the mean, std and max|W| of W, computed in float64 from the stored bf16 values with
  exactly rounded sums (so they do not depend on the thread count or the CPU), and the fraction of W
  entries that changed at that step (as `bitwise.update_fraction`, bitwise);
* the per-step digests of W: the first and last in full, a sha256 over the whole chain, and every
  step's first 16 hex characters (the digest chain, `chain`), which is what lets two machines find
  the step where they part;
* the environment the run was trained in (package versions, device, threads, deterministic flags):
  stored so that a failure can say what changed, never compared.

A pair summary (`summarize_pair`) holds both runs' summaries and their divergence at those steps,
with the first step at which they part (`divergence.pair_divergence`).

Everything that is compared is a function of the artifact alone: no paths, no wall times, no
timestamps. The same trajectory gives the same text in every process and on every xdist worker:
`Summary.to_text`.

This module imports only the standard library at import time; torch and numpy are imported by the
functions that read artifacts.
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

from flannel_repro.analysis.chain import PREFIX_HEX, chain_sha256, digest_hex, pack_prefixes, unpack_prefixes
from flannel_repro.analysis.provenance import (
    RunFileOrPath,
    config_dict,
    config_fingerprint,
    data_identity,
    device_class,
    environment_subset,
    open_run,
)
from flannel_repro.errors import ArtifactError
from flannel_repro.storage.format import DIGEST_ALGO

if TYPE_CHECKING:
    from flannel_repro.storage.run import RunFile

__all__ = [
    "SUMMARY_FORMAT",
    "Summary",
    "default_steps",
    "summarize",
    "summarize_pair",
]

SUMMARY_FORMAT = "flannel-repro/summary/1"


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


# --- building summaries ---------------------------------------------------------------------------


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
    """Share of W entries whose bits changed from step t-1 to t (as `bitwise.update_fraction`)."""
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
    full = digest_hex(traj)
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
        "config": config_dict(traj),
        "config_fingerprint": config_fingerprint(traj),
        "data": data_identity(traj),
        "device_class": device_class(traj.config.device),
        "digests": {
            "algorithm": traj.metadata.get("digest_algo", DIGEST_ALGO),
            "chain_sha256": chain_sha256(full),
            "first": full[0],
            "last": full[-1],
            "prefix_hex": PREFIX_HEX,
        },
        "digest_chain": pack_prefixes([d[:PREFIX_HEX] for d in full]),
        "steps": records,
        "total_steps": traj.steps,
    }


def summarize(run: RunFileOrPath, steps: Iterable[int] | None = None) -> "Summary":
    """The summary of one recorded run (a RunFile such as a Trajectory, or the path of its artifact).

    `steps` defaults to `default_steps(run.steps)`: 0, 1, 10, 100, ... and the last step.
    """
    traj = open_run(run)
    tree = {
        "format": SUMMARY_FORMAT,
        "kind": "run",
        **_run_tree(traj, _chosen_steps(traj, steps)),
        "environment": environment_subset(traj.env),
    }
    return Summary(tree)


def summarize_pair(a: RunFileOrPath, b: RunFileOrPath, steps: Iterable[int] | None = None) -> "Summary":
    """The summary of two runs and of their divergence (max|ΔW|, ‖ΔW‖_F, rows differing) at the
    summary steps, with the first step at which they part (None when they never do)."""
    from flannel_repro.analysis.divergence import pair_divergence

    ta, tb = open_run(a), open_run(b)
    if ta.steps != tb.steps:
        raise ArtifactError(
            f"pair summary: expected two runs of the same length, got {ta.steps} steps ({ta.label}) "
            f"and {tb.steps} ({tb.label})."
        )
    chosen = _chosen_steps(ta, steps)
    div = pair_divergence(ta.reader, tb.reader, steps=chosen)
    records = []
    for t in chosen:
        s = div.at(t)
        records.append(
            {
                "step": t,
                "max_abs": s["max_abs"],
                "frobenius": s["frobenius"],
                "rows_differ": s["rows_differ"],
                "rows_differ_live": s["rows_differ_live"],
                "rows_differ_dead": s["rows_differ_dead"],
            }
        )
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
                out[side] = unpack_prefixes(sub["digest_chain"], f"summary{'.' + side if side else ''}.digest_chain")
        return out

    def to_text(self) -> str:
        return json.dumps(self.tree, indent=2, sort_keys=True, ensure_ascii=False, allow_nan=True) + "\n"

    @classmethod
    def from_text(cls, text: str, *, source: str = "summary") -> "Summary":
        try:
            tree = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ArtifactError(
                f"{source}: expected a flannel-repro summary (JSON), got unparsable text ({exc})."
            ) from None
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
