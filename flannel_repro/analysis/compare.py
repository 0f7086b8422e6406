"""Comparing an obtained summary with a stored one within a tolerance, and the report of what moved.

`compare`: floats within a tolerance ``|obtained - stored| <= max(atol, rtol * |stored|)`` (default
exact; NaN equals NaN); ints, strings, digests and the config compare exactly; the digest chains are
compared step by step to report the first step at which the trajectories part; the environments are
never compared, only diffed to say what changed. `Comparison.report` renders the outcome as the
failure message. `compare_run_to_chain` does the same for a recorded run against a stored digest chain.

This module imports only the standard library at import time.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from flannel_repro.analysis.chain import ChainComparison, DigestChain, compare_prefixes, unpack_prefixes
from flannel_repro.analysis.provenance import RunFileOrPath, config_fingerprint, environment_subset, open_run
from flannel_repro.analysis.summary import Summary
from flannel_repro.errors import ArtifactError, ConfigError

__all__ = [
    "Tolerance",
    "FieldChange",
    "Comparison",
    "compare",
    "compare_run_to_chain",
    "environment_changes",
    "environment_lines",
    "display_path",
]


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


# --- environments ---------------------------------------------------------------------------------


def environment_changes(stored: Mapping[str, Any], obtained: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """(dotted key, stored, obtained) for every environment entry that differs (MISSING when absent)."""
    fs, fo = _flatten(stored), _flatten(obtained)
    return [
        (k, fs.get(k, MISSING), fo.get(k, MISSING))
        for k in sorted(set(fs) | set(fo))
        if not _same(fs.get(k, MISSING), fo.get(k, MISSING))
    ]


def environment_lines(changes: Sequence[tuple[str, Any, Any]], obtained: Mapping[str, Any]) -> list[str]:
    """'environment: same as stored (torch ..., 1 thread(s), ...)' or one line per difference."""
    if not changes:
        pk = obtained.get("packages") or {}
        dev = obtained.get("device") or {}
        brief = ", ".join(
            x
            for x in (
                f"torch {pk['torch']}" if "torch" in pk else "",
                f"transformers {pk['transformers']}" if "transformers" in pk else "",
                f"{dev.get('kind', '?')} {dev.get('name', '')}".strip() if dev else "",
                f"{obtained['threads']} thread(s)" if "threads" in obtained else "",
                f"deterministic {'on' if obtained.get('deterministic_algorithms') else 'off'}",
            )
            if x
        )
        return [f"environment: same as stored ({brief})"]
    lines = ["environment differs from the stored one (the usual reason a trajectory moves without a config change):"]
    lines.extend(f"  {key}: {_show(s, 60)} -> {_show(o, 60)}" for key, s, o in changes)
    return lines


# --- a run against a stored digest chain ----------------------------------------------------------


def compare_run_to_chain(
    run: RunFileOrPath, stored: "DigestChain | str | os.PathLike[str]"
) -> tuple[ChainComparison, list[str]]:
    """Where a recorded run's digests part from a stored chain (a DigestChain or its file).

    Returns the comparison and a report: one line saying where they part (or that they agree),
    then, when they differ, how the chain's recorded environment differs from the run's.
    """
    chain = stored if isinstance(stored, DigestChain) else DigestChain.read(stored)
    traj = open_run(run)
    result = chain.compare(DigestChain.from_run(traj, prefix_hex=len(chain.prefixes[0])))
    lines = [result.describe()]
    fingerprint = chain.info.get("config_fingerprint")
    if not result.identical and fingerprint is not None and fingerprint != config_fingerprint(traj):
        lines.append(
            f"config differs: the chain's config fingerprint is {fingerprint}, this run's {config_fingerprint(traj)}"
        )
    stored_env = chain.info.get("environment")
    if not result.identical and isinstance(stored_env, Mapping):
        obtained_env = environment_subset(traj.env)
        lines.extend(environment_lines(environment_changes(stored_env, obtained_env), obtained_env))
    return result, lines


# --- summaries ------------------------------------------------------------------------------------


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
            lines = [
                f"{label} moved beyond the noise band: {len(self.changes)} of {self.compared} compared values "
                f"differ by more than arithmetic alone moves them ({self.within_band} moved within the band)"
            ]
        else:
            lines = [
                f"{label} moved: {len(self.changes)} of {self.compared} compared values differ "
                f"(tolerance: {self.tolerance})"
            ]
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
            lines.append(
                f"  which operation moved it: `flannel-repro oplog ARTIFACT --step {parted[0]} -o here.json` here "
                "and where the snapshot holds, then `flannel-repro why here.json there.json`"
            )
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
    return text if len(text) <= width else text[: width - 1] + "…"


def _show(value: Any, limit: int = 24) -> str:
    if value is MISSING:
        return "(absent)"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        text = value
    else:
        text = json.dumps(value, sort_keys=True, allow_nan=True)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _row(ch: FieldChange, tol: Tolerance, allowed: float | None = None) -> tuple[str, str, str, str, str]:
    """One table row; `allowed` is a noise band's allowance for the field (None: the tolerance's)."""
    if ch.kind == "float" or (allowed is not None and _is_number(ch.stored) and _is_number(ch.obtained)):
        s, o = float(ch.stored), float(ch.obtained)
        if math.isfinite(s) and math.isfinite(o):
            diff = f"{o - s:+.3e}" + (f" (rel {abs(o - s) / abs(s):.2e})" if s else "")
        else:
            diff = "non-finite"
        if allowed is not None:
            return (
                ch.path,
                repr(ch.stored),
                repr(ch.obtained),
                diff,
                f"band {allowed:.3g}" if allowed else "exact (band 0)",
            )
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
            sp = unpack_prefixes(s, f"stored {where}")
            op = unpack_prefixes(o, f"obtained {where}")
        except ArtifactError as exc:
            self.change(path, MISSING, MISSING, "exact", str(exc))
            return
        self.out.compared += 1
        cmp = compare_prefixes(sp, op)
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
        out.error = (
            f"the stored snapshot has format {s.format!r}, this version of flannel-repro writes {o.format!r}; "
            "it has to be regenerated"
        )
        return out
    _Walker(tol, out).walk(s.tree, o.tree, ())
    out.kind = s.kind
    out.stored_class, out.obtained_class = s.numerics_class, o.numerics_class
    out.stored_environment = s.environment
    out.obtained_environment = o.environment
    out.environment = environment_changes(out.stored_environment, out.obtained_environment)
    return out
