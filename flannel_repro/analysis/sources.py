"""Divergence by source: what each thing the notebook's training seed conflated does, changed alone.

The notebook's `train_seed` drove both the example order and the initialisation of every parameter but
W, and it never trained one seed twice, so "batch order matters" could not be told apart from
initialisation or from hidden randomness. Here each source is changed alone against a base run:

| source | the other run |
| --- | --- |
| `data_order` | `data_seed` changed (model_seed kept) |
| `model_init` | `model_seed` changed (data_seed kept) |
| `threads` | numerics: another intra-op thread count |
| `engine` | numerics: the other engine (hf / torch; bitwise equal on CPU) |
| `none` | nothing changed: the same config trained again (hidden randomness) |

For each: the step the runs first part at, and ‖ΔW‖_F and max |ΔW| at steps 1, 10, 100, ... and the
last. Numerics classes that need another process (native vs portable CPU arithmetic) are not a source
here: compare their runs with `pair_divergence`, or their operations with `flannel-repro why`.

    variants = source_configs(base, other_seed=43)           # {source: (config, repeat)}
    table = divergence_by_source(base_run, {s: run for s, run in ...})
    print("\\n".join(table.lines())); assert_source_parts(table, "none", parts=False)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from flannel_repro.config import RunConfig
from flannel_repro.errors import ConfigError

SOURCES = ("data_order", "model_init", "threads", "engine", "none")
DESCRIPTIONS = {
    "data_order": "data order (data_seed changed alone)",
    "model_init": "initialisation of the other parameters (model_seed changed alone)",
    "threads": "numerics: thread count",
    "engine": "numerics: engine (hf vs torch)",
    "none": "none of these (same config trained again)",
}


def source_configs(
    base: RunConfig, *, other_seed: int, sources: Sequence[str] = SOURCES
) -> dict[str, tuple[RunConfig, int]]:
    """The run each source is measured with: {source: (config, repeat)}; the base is (base, 0)."""
    unknown = [s for s in sources if s not in SOURCES]
    if unknown:
        raise ConfigError(f"sources: unknown {unknown}; expected some of {', '.join(SOURCES)}.")
    if other_seed in (base.model_seed, base.data_seed):
        raise ConfigError(
            f"sources: other_seed must differ from the base's seeds ({base.model_seed}, {base.data_seed}); "
            f"got {other_seed}."
        )
    variants = {
        "data_order": (base.replace(data_seed=other_seed), 0),
        "model_init": (base.replace(model_seed=other_seed), 0),
        "threads": (base.replace(threads=2 if base.threads != 2 else 1), 0),
        "engine": (
            base.replace(
                engine="hf" if base.engine == "torch" else "torch", head="auto" if base.head == "fused" else base.head
            ),
            0,
        ),
        "none": (base, 1),
    }
    return {s: variants[s] for s in sources}


def checkpoints(steps: int) -> list[int]:
    """1, 10, 100, ... up to `steps`, and `steps`."""
    out, k = [], 1
    while k < steps:
        out.append(k)
        k *= 10
    return sorted({*out, steps}) if steps >= 1 else []


@dataclass
class SourceRow:
    source: str
    description: str
    first_step: int | None  # None: never parted
    steps: list[int]
    frobenius: list[float]
    max_abs: list[float]

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class SourceTable:
    base: str  # the base run's label
    rows: list[SourceRow] = field(default_factory=list)

    def row(self, source: str) -> SourceRow:
        for r in self.rows:
            if r.source == source:
                return r
        raise ConfigError(f"sources: {source!r} was not measured; measured: {', '.join(r.source for r in self.rows)}.")

    def lines(self) -> list[str]:
        if not self.rows:
            return [f"divergence by source against {self.base}: no source measured"]
        steps = self.rows[0].steps
        width = max(len(r.description) for r in self.rows)
        head = (
            f"  {'source':<{width}} {'parts at':>8} "
            + " ".join(f"{'F@' + str(s):>10}" for s in steps)
            + f" {'max|Δ|@' + str(steps[-1]):>12}"
        )
        out = [f"divergence by source against {self.base} (‖ΔW‖_F at each step; F = 0: bitwise equal):", head]
        for r in self.rows:
            parts = "never" if r.first_step is None else str(r.first_step)
            out.append(
                f"  {r.description:<{width}} {parts:>8} "
                + " ".join(f"{f:>10.4g}" for f in r.frobenius)
                + f" {r.max_abs[-1]:>12.4g}"
            )
        return out

    def to_json(self) -> dict[str, Any]:
        return {"base": self.base, "rows": [r.to_json() for r in self.rows]}


def divergence_by_source(base: Any, others: Mapping[str, Any], *, steps: Sequence[int] | None = None) -> SourceTable:
    """The table for a base run and, per source, the run that changes it alone (runs: artifacts or paths)."""
    from flannel_repro.analysis.divergence import pair_divergence
    from flannel_repro.analysis.trajectory import Trajectory

    ref = base if isinstance(base, Trajectory) else Trajectory(base)
    chosen = list(steps) if steps is not None else checkpoints(ref.steps)
    table = SourceTable(base=ref.label)
    for source, run in others.items():
        if source not in SOURCES:
            raise ConfigError(f"sources: unknown {source!r}; expected one of {', '.join(SOURCES)}.")
        d = pair_divergence(ref.reader, run.reader if isinstance(run, Trajectory) else run, steps=chosen)
        table.rows.append(
            SourceRow(
                source=source,
                description=DESCRIPTIONS[source],
                first_step=d.first_step,
                steps=[int(s) for s in d.steps],
                frobenius=[float(x) for x in d.frobenius],
                max_abs=[float(x) for x in d.max_abs],
            )
        )
    return table


def assert_source_parts(table: SourceTable, source: str, *, parts: bool, by_step: int | None = None) -> None:
    """A claim on one source: it parts the runs (no later than `by_step`), or it never does."""
    __tracebackhide__ = True
    row = table.row(source)
    if parts and row.first_step is None:
        raise AssertionError(
            f"{row.description}: expected the runs to part, they never did over {row.steps[-1]} steps "
            f"(base {table.base})."
        )
    if parts and by_step is not None and row.first_step is not None and row.first_step > by_step:
        raise AssertionError(
            f"{row.description}: expected the runs to part by step {by_step}, they parted at step "
            f"{row.first_step} (base {table.base})."
        )
    if not parts and row.first_step is not None:
        raise AssertionError(
            f"{row.description}: expected the runs never to part, they parted at step {row.first_step} "
            f"(‖ΔW‖_F {row.frobenius[-1]:.4g} at step {row.steps[-1]}; base {table.base}). Which "
            "operation made them part: flannel-repro why <base> <other>."
        )
