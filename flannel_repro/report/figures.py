"""The report's plots (matplotlib, headless: the Agg backend, never a window).

Each function draws one figure from `collect.Collected` and returns its PNG bytes and a description
of what it shows (the page prints it under the image; the JSON report lists it), or None where there is
nothing to draw: a pair class whose pairs are all bitwise identical gets no chart (the page says so in words).

Axes a reader can use (`_step_axis`, `_log_value_axis`): a run of at most `LINEAR_STEPS` steps gets a linear
step axis with whole-step ticks (every step on an 8-step run, every 2nd or 5th on longer ones): with that
few steps each one has room and the reader counts them, where a log axis spends half its width between
steps 0 and 1 and, on 8 steps, labels only 10^0. Longer runs get a symlog step axis (the parting in the
first steps needs room) ticked 0, 1, 2, 5, 10, 20, 50, ... (decades only past ~3000 steps). A log value
axis is ticked by decades where the view spans three or more, else 1-2-5 inside them, else every mantissa,
else evenly: at least two labelled ticks in view, written as numbers.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from flannel_repro.errors import ConfigError
from flannel_repro.report.compute import Collected, PairResult
from flannel_repro.report.names import SOURCES_PLOT, STALL_PLOT, pair_class_plot

DPI = 100
SIZE = (8.0, 4.5)
LINEAR_STEPS = 30  # runs of at most this many steps get a linear step axis (see the module docstring)


def require_matplotlib() -> Any:
    """matplotlib.pyplot on the Agg backend, or a ConfigError saying how to install it."""
    try:
        import matplotlib
    except ImportError:
        raise ConfigError(
            "the report's plots need matplotlib, an optional extra: pip install 'flannel-repro[report]' "
            "(or pip install matplotlib)."
        ) from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


@dataclass
class Figure:
    file: str
    title: str
    shows: str
    png: bytes
    # the data drawn in the first panel (min, max of finite values) and that panel's axis limits, to check
    # that a plot shows its data
    x_range: tuple[float, float]
    y_range: tuple[float, float]
    xlim: tuple[float, float] = (math.nan, math.nan)
    ylim: tuple[float, float] = (math.nan, math.nan)
    # that panel's scales and its labelled major ticks in view, (position, label) as drawn
    xscale: str = "linear"
    yscale: str = "linear"
    xticks: tuple[tuple[float, str], ...] = ()
    yticks: tuple[tuple[float, str], ...] = ()


def _figure(
    plt: Any,
    fig: Any,
    ax: Any,
    file: str,
    title: str,
    shows: str,
    x_range: tuple[float, float],
    y_range: tuple[float, float],
) -> Figure:
    """Render `fig` to PNG bytes (and close it), keeping the first panel `ax`'s axis limits and ticks."""
    fig.canvas.draw()
    xlim = tuple(float(v) for v in ax.get_xlim())
    ylim = tuple(float(v) for v in ax.get_ylim())
    xticks, yticks = _labelled_ticks(ax.xaxis, xlim), _labelled_ticks(ax.yaxis, ylim)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    plt.close(fig)
    return Figure(
        file,
        title,
        shows,
        buf.getvalue(),
        x_range,
        y_range,
        xlim,  # type: ignore[arg-type]
        ylim,  # type: ignore[arg-type]
        ax.get_xscale(),
        ax.get_yscale(),
        xticks,
        yticks,
    )


def _labelled_ticks(axis: Any, lim: tuple[float, ...]) -> tuple[tuple[float, str], ...]:
    """The major ticks of a drawn `axis` inside its view `lim` that carry a label: (position, label)."""
    lo, hi = sorted(lim)
    slack = 1e-9 * max(abs(lo), abs(hi), 1e-300)
    labels = [t.get_text() for t in axis.get_majorticklabels()]
    return tuple(
        (float(v), text)
        for v, text in zip(axis.get_majorticklocs(), labels)
        if lo - slack <= v <= hi + slack and text.strip()
    )


def _number(v: float, _pos: Any = None) -> str:
    """A tick label: a plain number where that is short (0.002, 0.5, 20, 5000), else a x 10^n."""
    if v == 0 or not math.isfinite(v):
        return f"{v:g}"
    if v == round(v) and abs(v) < 1e7:  # a step, or a whole number of anything
        return str(int(round(v)))
    if 1e-3 <= abs(v) < 1e5:
        return f"{v:.4g}"
    mantissa, exponent = f"{v:.3e}".split("e")
    m, e = float(mantissa), int(exponent)
    return f"$10^{{{e}}}$" if m == 1 else f"${m:g}\\times10^{{{e}}}$"


def _step_axis(ax: Any, last_step: int) -> None:
    """The step axis of `ax` for steps 0..`last_step` (see the module docstring)."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter, SymmetricalLogLocator

    if last_step <= LINEAR_STEPS:
        ax.set_xscale("linear")
        ax.xaxis.set_major_locator(MaxNLocator(nbins=max(1, min(last_step, 12)), integer=True, steps=[1, 2, 5, 10]))
        ax.set_xlabel("step")
    else:
        ax.set_xscale("symlog", linthresh=1)  # linear below 1, so step 0 is drawn
        decades = math.log10(max(last_step, 1))
        ax.xaxis.set_major_locator(
            SymmetricalLogLocator(linthresh=1, base=10, subs=[1, 2, 5] if decades <= 3.5 else [1])
        )
        ax.xaxis.set_minor_locator(SymmetricalLogLocator(linthresh=1, base=10, subs=list(range(1, 10))))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("step (log scale past 1)")
    ax.xaxis.set_major_formatter(FuncFormatter(_number))


def _log_value_axis(ax: Any) -> None:
    """Log-scale the value (y) axis of `ax`, ticked so that at least two labelled ticks are in view (see the
    module docstring); minor ticks stay unlabelled."""
    from matplotlib.ticker import AutoLocator, FixedLocator, FuncFormatter, LogLocator, NullFormatter

    ax.set_yscale("log")
    lo, hi = sorted(ax.get_ylim())
    chosen: Any = None
    for subs in ((1.0,), (1.0, 2.0, 5.0), tuple(float(k) for k in range(1, 10))):
        locator = LogLocator(base=10, subs=subs, numticks=12)
        if sum(1 for t in locator.tick_values(lo, hi) if lo <= t <= hi) >= 3:
            chosen = locator
            break
    if chosen is None:  # a view narrower than the mantissas' spacing: evenly spaced, positive ticks
        chosen = FixedLocator([t for t in AutoLocator().tick_values(lo, hi) if t > 0])
    ax.yaxis.set_major_locator(chosen)
    ax.yaxis.set_major_formatter(FuncFormatter(_number))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _positive(x: np.ndarray) -> np.ndarray:
    """Values for a log axis: zeros (bitwise equal) are not drawn."""
    x = np.asarray(x, dtype=np.float64)
    return np.where(x > 0, x, np.nan)


def _range(values: list[np.ndarray]) -> tuple[float, float]:
    finite = np.concatenate([v[np.isfinite(v)] for v in values]) if values else np.array([])
    return (float(finite.min()), float(finite.max())) if finite.size else (math.nan, math.nan)


def pair_class_figure(plt: Any, data: Collected, cls: str, pairs: list[PairResult]) -> Figure | None:
    """‖ΔW‖_F and max |ΔW| against step for the pairs of one class; None where every pair is bitwise identical
    (there is nothing to draw: the page says so in words)."""
    if all(p.first_step is None for p in pairs):
        return None
    fig, (ax_f, ax_m) = plt.subplots(1, 2, figsize=(SIZE[0] * 1.5, SIZE[1]), sharex=True)
    ys: list[np.ndarray] = []
    xs: list[np.ndarray] = []
    for p in pairs:
        label = f"{data.runs[p.a].name} vs {data.runs[p.b].name}"
        for ax, values in ((ax_f, p.frobenius), (ax_m, p.max_abs)):
            y = _positive(values)
            (line,) = ax.plot(p.steps, y, lw=1, alpha=0.8, label=label if ax is ax_f else None)
            if p.first_step is not None and np.isfinite(y[p.steps == p.first_step]).any():
                k = int(np.flatnonzero(p.steps == p.first_step)[0])
                ax.plot([p.first_step], [y[k]], "o", ms=4, color=line.get_color())
        ys.append(_positive(p.frobenius))
        xs.append(p.steps.astype(np.float64))
    identical = sum(1 for p in pairs if p.first_step is None)
    last = max(int(p.steps[-1]) for p in pairs)
    for ax, what in ((ax_f, "‖ΔW‖_F"), (ax_m, "max |ΔW|")):
        ax.set_ylabel(what)
        _step_axis(ax, last)  # the parting happens in the first steps
        _log_value_axis(ax)  # a pair that parted has some ‖ΔW‖_F > 0
        ax.grid(True, which="both", alpha=0.3)
    note = f"; {identical} of {len(pairs)} pairs bitwise identical (not drawn)" if identical else ""
    ax_f.set_title(f"{cls}: ‖ΔW‖_F ({len(pairs)} pairs{note})", fontsize=9)
    ax_m.set_title("max |ΔW| (dot: first divergent step)", fontsize=9)
    if len(pairs) <= 12:
        ax_f.legend(fontsize=6)
    fig.tight_layout()
    firsts = sorted({p.first_step for p in pairs if p.first_step is not None})
    shows = (
        f"{len(pairs)} pair(s) of runs that differ in: {cls}. "
        + (
            f"First divergent step {firsts[0]}" + (f"..{firsts[-1]}" if len(firsts) > 1 else "") + "; "
            if firsts
            else ""
        )
        + f"final ‖ΔW‖_F {min(float(p.frobenius[-1]) for p in pairs):.4g}..{max(float(p.frobenius[-1]) for p in pairs):.4g}"
        + (f"; {identical} pair(s) bitwise identical over every step" if identical else "")
        + "."
    )
    return _figure(plt, fig, ax_f, pair_class_plot(cls), f"Divergence: {cls}", shows, _range(xs), _range(ys))


def live_dead_figure(plt: Any, data: Collected) -> Figure | None:
    classes = {c: ps for c, ps in data.classes().items() if any(p.first_step is not None for p in ps)}
    if not classes:
        return None
    fig, ax = plt.subplots(figsize=SIZE)
    ys = []
    steps = None
    for cls, ps in classes.items():
        shares = np.stack([p.live_share() for p in ps])
        with np.errstate(all="ignore"):
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                median = np.nanmedian(shares, axis=0)
                lo, hi = np.nanmin(shares, axis=0), np.nanmax(shares, axis=0)
        steps = ps[0].steps
        (line,) = ax.plot(steps, median, lw=1.5, label=f"{cls} (median of {len(ps)})")
        ax.fill_between(steps, lo, hi, alpha=0.15, color=line.get_color())
        ys.append(median)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("step")
    ax.set_ylabel("live tokens' share of ‖ΔW‖²_F")
    ax.set_title("Where the divergence lives: live tokens (in the corpus) vs dead ones (1 - share)", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    n_live = int(data.runs[0].traj.live_mask.sum())
    vocab = int(data.runs[0].traj.live_mask.numel())
    finals = {c: float(np.nanmedian(np.stack([p.live_share() for p in ps])[:, -1])) for c, ps in classes.items()}
    shows = (
        f"Per pair class, the share of ‖ΔW‖²_F in the rows of the {n_live} live tokens (of {vocab}); the rest is in "
        "the dead tokens' rows, which move only through the tied output head. Final medians: "
        + ", ".join(f"{c} {v:.3f}" for c, v in finals.items())
        + "."
    )
    assert steps is not None  # classes is not empty
    return _figure(
        plt,
        fig,
        ax,
        "live-dead-share.png",
        "Live vs dead tokens' share of the divergence",
        shows,
        _range([steps.astype(np.float64)]),
        _range(ys),
    )


def loss_figure(plt: Any, data: Collected) -> Figure:
    fig, ax = plt.subplots(figsize=SIZE)
    ys, xs = [], []
    for r in data.runs:
        loss = r.traj.losses.double().numpy()
        steps = np.arange(loss.size)
        ax.plot(steps[1:], loss[1:], lw=0.8, alpha=0.8, label=r.name)
        ys.append(loss[1:])
        xs.append(steps[1:].astype(np.float64))
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(f"Loss of every run ({len(data.runs)} runs)", fontsize=9)
    ax.grid(True, alpha=0.3)
    if len(data.runs) <= 12:
        ax.legend(fontsize=6)
    fig.tight_layout()
    finals = [float(r.traj.final_loss) for r in data.runs]
    shows = f"Training loss against step, one line per run; final loss {min(finals):.4f}..{max(finals):.4f}."
    return _figure(plt, fig, ax, "loss.png", "Loss", shows, _range(xs), _range(ys))


def matrix_figure(plt: Any, data: Collected) -> Figure | None:
    m = data.matrix()
    if m is None:
        return None
    names = [data.runs[i].name for i in data.matrix_runs]
    fig, ax = plt.subplots(figsize=(max(4.5, 1.2 + 0.55 * len(names)), max(3.8, 0.8 + 0.5 * len(names))))
    im = ax.imshow(m, cmap="viridis")
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    if len(names) <= 12:
        for i in range(len(names)):
            for j in range(len(names)):
                if np.isfinite(m[i, j]):
                    ax.text(
                        j,
                        i,
                        f"{m[i, j]:.3g}",
                        ha="center",
                        va="center",
                        fontsize=6,
                        color="white" if m[i, j] < np.nanmax(m) / 2 else "black",
                    )
    fig.colorbar(im, ax=ax, label="final ‖ΔW‖_F")
    step = int(data.runs[data.matrix_runs[0]].traj.steps)
    ax.set_title(f"‖W_a - W_b‖_F at step {step}", fontsize=9)
    fig.tight_layout()
    off = m[~np.eye(len(names), dtype=bool)]
    shows = (
        f"Final ‖ΔW‖_F between every pair of the {len(names)} single-seed runs: "
        f"{np.nanmin(off):.4g}..{np.nanmax(off):.4g}."
    )
    return _figure(
        plt,
        fig,
        ax,
        "seed-matrix.png",
        "Seed x seed: final divergence",
        shows,
        (0.0, float(len(names) - 1)),
        (0.0, float(len(names) - 1)),
    )


def update_figure(plt: Any, data: Collected) -> Figure | None:
    profiles = [(r, p) for r, p in zip(data.runs, data.stall) if p.steps.size > 1]
    if not profiles:
        return None
    recorded = any(p.recorded for _, p in profiles)
    fig, axes = plt.subplots(
        2 if recorded else 1, 1, figsize=(SIZE[0], SIZE[1] * (1.6 if recorded else 1)), sharex=True, squeeze=False
    )
    ax = axes[0][0]
    ys, xs = [], []
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, (r, p) in enumerate(_update_runs(profiles)):
        color = colors[k % len(colors)]
        style = "-" if p.dtype == "bfloat16" else "--"
        y = _positive(p.changed[1:])
        ax.plot(p.steps[1:], y, style, color=color, lw=0.9, label=f"{r.name} ({p.dtype})")
        ys.append(y)
        xs.append(p.steps[1:].astype(np.float64))
        if recorded and p.recorded:
            axes[1][0].plot(p.steps[1:], p.lost[1:], style, color=color, lw=0.9, label=f"lost: {r.name} ({p.dtype})")
            axes[1][0].plot(
                p.steps[1:], p.second_moment_moved[1:], ":", color=color, lw=0.9, label=f"v moved: {r.name}"
            )
    _log_value_axis(ax)
    ax.set_ylabel("share of W's entries changed")
    ax.set_title("Update fraction per step (dashed: float32 weights)", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6)
    if recorded:
        ax2 = axes[1][0]
        ax2.set_ylim(-0.02, 1.02)
        ax2.set_ylabel("share")
        ax2.set_title("Proposed updates lost to rounding, and Adam's second moment entries that moved", fontsize=9)
        ax2.grid(True, alpha=0.3)
        ax2.legend(fontsize=6)
    axes[-1][0].set_xlabel("step")
    fig.tight_layout()
    parts = []
    for dtype in sorted({p.dtype for _, p in profiles}):
        ps = [p for _, p in profiles if p.dtype == dtype]
        last = ps[0].steps[-1]
        probe = [s for s in (10, 100, 500, int(last)) if s <= last]
        vals = ", ".join(f"step {s} {100 * float(np.nanmedian([p.changed[s] for p in ps])):.3g}%" for s in probe)
        parts.append(f"{dtype} ({len(ps)} runs, median): {vals}")
    shows = "Share of W's entries whose bits changed per step. " + "; ".join(parts) + "."
    return _figure(plt, fig, ax, STALL_PLOT, "Update fraction (the bf16 stall)", shows, _range(xs), _range(ys))


def _update_runs(profiles: list[tuple[Any, Any]], per_dtype: int = 4) -> list[tuple[Any, Any]]:
    """The runs the update plot draws: every non-bf16 run (float32 weights: the cure), each beside the bf16
    run of the same seeds whose settings differ least from it (the cause), then bf16 runs of other seeds,
    up to `per_dtype` runs per dtype."""
    from flannel_repro.report.compute import settings

    def seeds(r: Any) -> tuple[int, int]:
        return (r.config.model_seed, r.config.data_seed)

    def distance(a: Any, b: Any) -> int:
        sa, sb = settings(a.traj), settings(b.traj)
        return sum(1 for k in set(sa) | set(sb) if k not in ("dtype", "amp") and sa.get(k) != sb.get(k))

    cures = [(r, p) for r, p in profiles if p.dtype != "bfloat16"][:per_dtype]
    bf16 = [(r, p) for r, p in profiles if p.dtype == "bfloat16" and r.traj.repeat == 0]
    chosen: list[tuple[Any, Any]] = []
    for cure, _ in cures:
        same = [rp for rp in bf16 if seeds(rp[0]) == seeds(cure) and rp not in chosen]
        if same:
            chosen.append(min(same, key=lambda rp: distance(rp[0], cure)))
    usual_seeds = {seeds(r) for r, _ in chosen}
    for rp in bf16:
        if len(chosen) >= max(per_dtype, len(cures)):
            break
        if seeds(rp[0]) not in usual_seeds and rp[0].config.train_seed is not None:
            chosen.append(rp)
            usual_seeds.add(seeds(rp[0]))
    return chosen + cures


def sources_figure(plt: Any, data: Collected) -> Figure | None:
    table = data.sources
    if table is None or not table.rows:
        return None
    fig, ax = plt.subplots(figsize=SIZE)
    ys, xs = [], []
    for row in table.rows:
        y = _positive(np.array(row.frobenius))
        x = np.array(row.steps, dtype=np.float64)
        ax.plot(
            x,
            y,
            "o-",
            lw=1.2,
            ms=3,
            label=f"{row.description} (parts at {row.first_step if row.first_step is not None else 'never'})",
        )
        ys.append(y)
        xs.append(x)
    if any(np.isfinite(y).any() for y in ys):
        _log_value_axis(ax)
    _step_axis(ax, int(max(max(row.steps) for row in table.rows)))
    ax.set_ylabel("‖ΔW‖_F against the base run")
    ax.set_title(f"Divergence by source (base {table.base}); a source not drawn never parted", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6)
    fig.tight_layout()
    shows = (
        "Each source changed alone against the base run: "
        + "; ".join(
            f"{r.source} parts at {r.first_step if r.first_step is not None else 'never'}, final ‖ΔW‖_F {r.frobenius[-1]:.4g}"
            for r in table.rows
        )
        + "."
    )
    return _figure(plt, fig, ax, SOURCES_PLOT, "Divergence by source", shows, _range(xs), _range(ys))


def all_figures(data: Collected) -> list[Figure]:
    plt = require_matplotlib()
    figures: list[Figure] = []
    makers: list[Callable[[], Figure | None]] = [
        *(lambda c=c, ps=ps: pair_class_figure(plt, data, c, ps) for c, ps in data.classes().items()),
        lambda: live_dead_figure(plt, data),
        lambda: loss_figure(plt, data),
        lambda: matrix_figure(plt, data),
        lambda: update_figure(plt, data),
        lambda: sources_figure(plt, data),
    ]
    for make in makers:
        fig = make()
        if fig is not None:
            figures.append(fig)
    return figures
