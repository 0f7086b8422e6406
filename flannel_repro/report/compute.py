"""What a report shows, computed from run artifacts: runs, pairs grouped by what differs between them,
the seed x seed matrix, the update statistics and divergence by source.

Pairs are not all pairs of all runs (a session of 33 runs has 528): per pair class, the runs that differ
in exactly that are scanned together with `all_pairs` (each run's W read once per step for the group):

| class | the runs scanned together |
| --- | --- |
| different train seeds | the runs trained with a single seed (model_seed = data_seed), repeat 0, per setting |
| data order only | runs of one model_seed and setting, data_seed varying |
| model init only | runs of one data_seed and setting, model_seed varying |
| same config, separate trainings | the repeats of one config |
| different <settings> | runs of the same seeds and repeat whose settings differ (threads, engine, numerics, ...) |

Runs of another shape (steps, vocabulary, width, dtype) are never compared; each shape is its own set.
"""

from __future__ import annotations

import itertools
import math
import os
from concurrent.futures import ThreadPoolExecutor
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from flannel_repro.analysis.assertions import pair_class
from flannel_repro.analysis.divergence import NEVER, all_pairs, live_share
from flannel_repro.analysis.sources import SOURCES, SourceTable, divergence_by_source
from flannel_repro.analysis.stall import StallProfile, stall_profile
from flannel_repro.analysis.trajectory import Trajectory
from flannel_repro.errors import ArtifactError

MAX_GROUP = 16  # runs scanned together for one class (120 pairs); larger groups keep the first 16 by name
SEED_FIELDS = ("model_seed", "data_seed")


def shape_of(traj: Trajectory) -> tuple:
    """What two runs must share to be compared step by step: the kind of run (the notebook's model, or an
    engine's), steps, the recorded W's shape and dtype (from the artifact: any model's)."""
    c = traj.config
    w = traj.reader.spec("W") if traj.has_W else None
    return (getattr(c, "kind", "flannel6"), c.steps, None if w is None else (tuple(w.shape[1:]), str(w.dtype)))


@dataclass
class RunInfo:
    name: str  # short and unique within the report
    traj: Trajectory

    @property
    def config(self) -> Any:
        return self.traj.config


@dataclass
class PairResult:
    a: int  # indices into Collected.runs
    b: int
    pair_class: str
    steps: np.ndarray
    frobenius: np.ndarray
    frobenius_live: np.ndarray
    max_abs: np.ndarray
    rows_differ: np.ndarray
    first_step: int | None

    def live_share(self) -> np.ndarray:
        return live_share(self.frobenius, self.frobenius_live)


@dataclass
class Collected:
    runs: list[RunInfo]
    pairs: list[PairResult] = field(default_factory=list)
    stall: list[StallProfile] = field(default_factory=list)
    matrix_runs: list[int] = field(default_factory=list)  # indices of the seed x seed matrix's runs
    sources: SourceTable | None = None
    notes: list[str] = field(default_factory=list)

    def classes(self) -> dict[str, list[PairResult]]:
        out: dict[str, list[PairResult]] = defaultdict(list)
        for p in self.pairs:
            out[p.pair_class].append(p)
        return dict(sorted(out.items()))

    def matrix(self) -> np.ndarray | None:
        """(n, n) final ‖ΔW‖_F between the matrix runs (NaN where a pair was not computed)."""
        idx = {r: k for k, r in enumerate(self.matrix_runs)}
        if len(idx) < 2:
            return None
        m = np.full((len(idx), len(idx)), math.nan)
        np.fill_diagonal(m, 0.0)
        for p in self.pairs:
            if p.a in idx and p.b in idx:
                m[idx[p.a], idx[p.b]] = m[idx[p.b], idx[p.a]] = float(p.frobenius[-1])
        return m


def find_runs(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Run artifacts among `paths`: files as given, directories searched (not recursively) for *.safetensors."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(q for q in p.glob("*.safetensors") if q.is_file()))
        elif p.is_file():
            out.append(p)
        else:
            raise ArtifactError(
                f"report: expected a run artifact or a directory of them, got {str(p)!r} (no such file)."
            )
    seen: set[Path] = set()
    unique = []
    for p in out:
        if p.resolve() not in seen:
            seen.add(p.resolve())
            unique.append(p)
    return unique


# what is recorded, and where the data came from (its content hashes are what counts): not a setting
NOT_SETTINGS = (
    "record_W",
    "record_grads",
    "record_momentum",
    "record_variance",
    "record_logits",
    "probe_examples",
    "tokenizer_path",
    "corpus_path",
    "token_mask_path",
    "allow_unknown_tokens",
)


def settings(traj: Trajectory) -> dict[str, Any]:
    """The config without the seeds and what is only recorded: what a 'setting' is (threads, engine, dtype,
    lr, ...), plus the numerics class the run got."""
    d = traj.config.to_dict()
    for k in (*SEED_FIELDS, *NOT_SETTINGS):
        d.pop(k, None)
    d["numerics_class"] = (traj.env.get("numerics") or {}).get("class")
    return d


def setting_key(traj: Trajectory) -> str:
    """`settings(traj)` as one comparable string: runs of one key differ only in their seeds (and repeat)."""
    return repr(sorted(settings(traj).items(), key=lambda kv: kv[0]))


def _names(trajs: Sequence[Trajectory]) -> list[str]:
    """Short unique names: the seeds, the repeat, and each setting that differs from the most common one."""
    all_settings = [settings(t) for t in trajs]
    common: dict[str, Any] = {}
    for k in sorted({k for s in all_settings for k in s}):
        values = Counter(repr(s.get(k)) for s in all_settings)
        common[k] = values.most_common(1)[0][0]
    names = []
    for t, s in zip(trajs, all_settings):
        c = t.config
        base = f"s{c.train_seed}" if c.train_seed is not None else f"m{c.model_seed}/d{c.data_seed}"
        extra = [f"{k}={s.get(k)}" for k in sorted(s) if repr(s.get(k)) != common[k] and k != "numerics_class"]
        if repr(s.get("numerics_class")) != common["numerics_class"]:
            extra.append(str(s.get("numerics_class")))
        if t.repeat:
            extra.append(f"r{t.repeat}")
        names.append(" ".join([base, *extra]))
    counts = Counter(names)
    seen: Counter[str] = Counter()
    unique = []
    for n, t in zip(names, trajs):
        seen[n] += 1
        unique.append(n if counts[n] == 1 else f"{n} [{t.path.stem[-8:]}]")
    return unique


def _groups(runs: Sequence[RunInfo], offset_of: Sequence[int]) -> list[tuple[str, list[int]]]:
    """(intended class, run indices) of every group of runs to scan together (see the module docstring);
    `offset_of[k]` is the index in the report's runs of `runs[k]`."""
    return [(kind, [offset_of[i] for i in idx]) for kind, idx in _local_groups(runs)]


def _local_groups(runs: Sequence[RunInfo]) -> list[tuple[str, list[int]]]:
    by_shape: dict[tuple, list[int]] = defaultdict(list)
    for i, r in enumerate(runs):
        by_shape[shape_of(r.traj)].append(i)
    groups: list[tuple[str, list[int]]] = []
    for members in by_shape.values():
        key_of = {i: setting_key(runs[i].traj) for i in members}
        seeds = {i: (runs[i].config.model_seed, runs[i].config.data_seed) for i in members}
        rep = {i: runs[i].traj.repeat for i in members}
        buckets: dict[tuple, list[int]] = defaultdict(list)
        for i in members:
            m, d = seeds[i]
            if m == d and rep[i] == 0:
                buckets[("seeds", key_of[i])].append(i)
            if rep[i] == 0:
                buckets[("order", key_of[i], m)].append(i)
                buckets[("init", key_of[i], d)].append(i)
                buckets[("settings", m, d)].append(i)
            buckets[("repeats", key_of[i], m, d)].append(i)
        for key, idx in buckets.items():
            if key[0] == "order":
                idx = _distinct(idx, lambda i, seeds=seeds: seeds[i][1])
            elif key[0] == "init":
                idx = _distinct(idx, lambda i, seeds=seeds: seeds[i][0])
            elif key[0] == "settings":
                idx = _distinct(idx, lambda i, key_of=key_of: key_of[i])
            if len(idx) >= 2:
                groups.append((key[0], idx))
    return groups


def _distinct(idx: list[int], key: Any) -> list[int]:
    seen: set[Any] = set()
    distinct = []
    for i in idx:
        if key(i) not in seen:
            seen.add(key(i))
            distinct.append(i)
    return distinct


def collect(
    paths: Sequence[str | os.PathLike[str]], *, verify: bool = True, sources: SourceTable | None = None
) -> Collected:
    """Open the runs (verified first unless `verify` is false) and compute everything the report shows."""
    found = find_runs(paths)
    if not found:
        raise ArtifactError(f"report: expected at least one run artifact in {', '.join(map(str, paths))}, found none.")
    trajs = [Trajectory(p) for p in found]
    if verify:  # hash-bound (hashlib releases the GIL): one thread per core
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        with ThreadPoolExecutor(max_workers=max(1, min(cpus, len(trajs)))) as pool:
            for failure in pool.map(_problem, trajs):
                if failure is not None:
                    for t in trajs:
                        t.close()
                    raise failure
    order = sorted(range(len(trajs)), key=lambda i: _sort_key(trajs[i]))
    trajs = [trajs[i] for i in order]
    runs = [RunInfo(name=n, traj=t) for n, t in zip(_names(trajs), trajs)]
    out = Collected(runs=runs)
    done: set[tuple[int, int]] = set()
    keys = [setting_key(r.traj) for r in runs]
    usual = Counter(keys).most_common(1)[0][0]
    without_w = [r.name for r in runs if not r.traj.has_W]
    if without_w:
        out.notes.append(
            f"{len(without_w)} run(s) recorded digests only (record_W = false), not compared: " + ", ".join(without_w)
        )
    for kind, idx in _groups(
        [r for r in runs if r.traj.has_W], offset_of=[i for i, r in enumerate(runs) if r.traj.has_W]
    ):
        if len(idx) > MAX_GROUP:
            out.notes.append(f"{kind}: {len(idx)} runs of one group; the first {MAX_GROUP} by name were compared.")
            idx = idx[:MAX_GROUP]
        todo = [(i, j) for i, j in itertools.combinations(idx, 2) if (i, j) not in done]
        if not todo:
            continue
        pw = all_pairs([runs[i].traj.reader for i in idx])
        for p, (ii, jj) in enumerate(pw.pairs.tolist()):
            i, j = idx[ii], idx[jj]
            if (min(i, j), max(i, j)) in done:
                continue
            if kind == "settings" and usual not in (keys[i], keys[j]):
                continue  # two variants of the usual setting: their difference is two things at once
            done.add((min(i, j), max(i, j)))
            first = int(pw.first_step[p])
            out.pairs.append(
                PairResult(
                    a=i,
                    b=j,
                    pair_class=_pair_class(runs[i].traj, runs[j].traj),
                    steps=pw.steps,
                    frobenius=pw.frobenius[p],
                    frobenius_live=pw.frobenius_live[p],
                    max_abs=pw.max_abs[p],
                    rows_differ=pw.rows_differ[p],
                    first_step=None if first == NEVER else first,
                )
            )
        if kind == "seeds" and len(idx) > len(out.matrix_runs):
            out.matrix_runs = list(idx)
    out.stall = [stall_profile(r.traj) for r in runs]
    out.sources = sources if sources is not None else _sources(runs, keys, usual)
    return out


def _pair_class(a: Trajectory, b: Trajectory) -> str:
    cls = pair_class(a, b)
    if cls == "same run":  # one config and repeat: trained apart, e.g. on two machines
        ka, kb = (settings(t)["numerics_class"] for t in (a, b))
        cls = "different numerics class" if ka != kb else "same config, trained apart"
    return cls


def _problem(t: Trajectory) -> ArtifactError | None:
    try:
        t.require_verified()
    except ArtifactError as exc:
        return exc
    return None


def _sort_key(t: Trajectory) -> tuple:
    c = t.config
    return (
        c.steps,
        c.dtype,
        c.train_seed is None,
        c.model_seed,
        c.data_seed,
        t.repeat,
        c.threads,
        c.engine,
        str(t.path),
    )


def _sources(runs: Sequence[RunInfo], keys: Sequence[str], usual: str) -> SourceTable | None:
    """Divergence by source when the runs hold a base (the lowest single-seed run of the usual setting
    `usual`, repeat 0; `keys[i]` is run i's setting key) and at least one run that changes one source
    alone; None otherwise."""
    singles = [
        r for r, key in zip(runs, keys) if r.config.train_seed is not None and r.traj.repeat == 0 and key == usual
    ]
    if not singles:
        return None
    base = singles[0]
    bc, bs = base.config, settings(base.traj)
    others: dict[str, Trajectory] = {}
    for r in runs:
        if r is base or shape_of(r.traj) != shape_of(base.traj):
            continue
        c, s = r.config, settings(r.traj)
        same_seeds = (c.model_seed, c.data_seed) == (bc.model_seed, bc.data_seed)
        diff = {k for k in set(s) | set(bs) if s.get(k) != bs.get(k)}
        if r.traj.repeat == 0 and not diff and c.model_seed == bc.model_seed and c.data_seed != bc.data_seed:
            others.setdefault("data_order", r.traj)
        elif r.traj.repeat == 0 and not diff and c.data_seed == bc.data_seed and c.model_seed != bc.model_seed:
            others.setdefault("model_init", r.traj)
        elif same_seeds and r.traj.repeat == 0 and diff <= {"threads", "numerics_class"} and "threads" in diff:
            others.setdefault("threads", r.traj)
        elif same_seeds and r.traj.repeat == 0 and diff and diff <= {"engine", "head"}:
            others.setdefault("engine", r.traj)
        elif same_seeds and r.traj.repeat == 1 and not diff:
            others.setdefault("none", r.traj)
    if not others or not base.traj.has_W:
        return None
    others = {s: t for s, t in others.items() if t.has_W}
    return divergence_by_source(base.traj, {s: others[s] for s in SOURCES if s in others})
