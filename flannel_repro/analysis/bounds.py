"""Divergence bounds derived from measured runs, keyed by the scale and the data they were measured on.

A bound is only meaningful for the configuration and the data it was measured on, so each entry carries
the "scale key": the config fingerprint with the per-run knobs (seeds, device, engine, threads, what is
recorded) neutralised, and the content hashes of the tokenizer and the corpus. The engines are bitwise
equal, so the engine does not enter the key; the device does not either (a bound is an upper limit on
seed-to-seed divergence, which the tests check per device). The data does: a band derived on the
embedded synthetic corpus says nothing about a real-text corpus (measured: the data-order share of a
Python-docstrings corpus fell below the synthetic data's band), and file paths are not in the config's
fingerprint, so without the hashes another corpus would silently get this one's bounds.

Each limit states how it was derived and how often it fails a clean session: Student-t prediction limits on
the log scale from n held-out pairs, at a nominal false-alarm rate per claim and session (see METHOD below;
the rate is measured on held-out seeds by benchmarks/false_alarm.py).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence, TypedDict

from flannel_repro.config import RunConfig
from flannel_repro.errors import ConfigError

# --- how a bound is derived: a stated false-alarm rate -----------------------------------------------------
#
# A claim compares each of a session's k claim seeds against the limit, so a claim fails a clean session when
# any of its k comparisons falls outside. Distribution-free limits (the largest of n held-out values) would
# need n >= k / alpha - k held-out pairs for a rate alpha per claim and session: 396 pairs for 1% over 4
# comparisons. So the limits are Student-t prediction limits on the log scale (the final divergence and the
# data-order share are positive, skewed ratios of norms): with the n held-out values' log mean m and standard
# deviation s, the limit for one new value is exp(m + t_{n-1}(1 - a) * s * sqrt(1 + 1/n)). If the logs are
# normal, a new clean comparison falls outside with probability exactly a, averaged over the held-out draw. The
# share's band is the union of that and the same limit on the raw scale (a normal fit; see _limits).
# The per-claim rate alpha is split over the k comparisons (Bonferroni: a = alpha / k one-sided, alpha / 2k on
# each side of a two-sided band), which holds whatever their correlation (they share the base seed's run).
# Whether the logs are normal enough is measured on held-out seeds: benchmarks/false_alarm.py.

METHOD = "t-prediction"  # see above: final divergence log-normal; share band the union of log-normal and normal
LEGACY_METHOD = "margin-1.5x"  # old tables: 1.5 x the largest measured value, [min / 1.5, max x 1.5]; no stated rate
LEGACY_MARGIN = 1.5
FALSE_ALARM = 0.01  # nominal false-alarm rate per claim and clean session
COMPARISONS = 4  # comparisons per claim and session the rate is split over (the CI preset's 4 claim seeds)
HELD_OUT = 16  # held-out pairs a derivation uses by default (the seeds after the claim seeds)
MIN_PAIRS = 3  # fewest held-out pairs a limit is derived from (a spread needs two; t with 1 df is useless)


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularised incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with `df` degrees of freedom."""
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


@functools.lru_cache(maxsize=256)
def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t with `df` degrees of freedom (bisection on t_cdf; to ~1e-12)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"t_quantile: p must be in (0, 1), got {p}.")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = (lo + hi) / 2.0
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * max(1.0, hi):
            break
    return (lo + hi) / 2.0


@dataclass(frozen=True)
class LogFit:
    """A normal fit to the logs of n measured values (or to the values themselves, `log=False`): what a
    prediction limit is computed from."""

    mean: float
    sd: float
    n: int
    log: bool = True

    @classmethod
    def of(cls, values: Sequence[float], what: str, log: bool = True) -> "LogFit":
        if len(values) < MIN_PAIRS:
            raise ValueError(f"a {what} limit needs at least {MIN_PAIRS} held-out pairs, got {len(values)}.")
        if any(not (math.isfinite(v) and v > 0) for v in values):
            raise ValueError(
                f"a {what} limit needs finite positive values (it is fitted on their logs), got {sorted(values)[:3]}..."
            )
        logs = [math.log(v) if log else float(v) for v in values]
        mean = math.fsum(logs) / len(logs)
        sd = math.sqrt(math.fsum((x - mean) ** 2 for x in logs) / (len(logs) - 1))
        return cls(mean, sd, len(logs), log)

    def limit(self, tail: float, upper: bool) -> float:
        """The prediction limit one new value exceeds (upper) or falls below (lower) with probability `tail`."""
        half = t_quantile(1.0 - tail, self.n - 1) * self.sd * math.sqrt(1.0 + 1.0 / self.n)
        x = self.mean + half if upper else self.mean - half
        return math.exp(x) if self.log else x


@dataclass(frozen=True)
class Bound:
    scale: str
    max_frobenius: float
    order_share_min: float
    order_share_max: float
    measured: str  # how it was derived (pairs, steps, command)
    method: str = LEGACY_METHOD
    n: int = 0  # held-out pairs it was derived from (0: not recorded)
    false_alarm: float | None = None  # nominal false-alarm rate per claim and clean session (None: not stated)
    comparisons: int = 0  # comparisons per claim and session that rate is split over
    held_out: str = ""  # which seeds: "seed 42 vs 46..61"
    frobenius_fit: LogFit | None = None
    share_fit: LogFit | None = None  # of the share's logs
    share_raw_fit: LogFit | None = None  # of the share itself (log=False)

    def for_session(self, comparisons: int, false_alarm: float | None = None) -> "Bound":
        """The limits for a session whose claim makes `comparisons` comparisons, at the same nominal rate per
        claim and session (recomputed from the fits; a legacy table has none and is returned as it is)."""
        alpha = self.false_alarm if false_alarm is None else false_alarm
        if self.frobenius_fit is None or self.share_fit is None or alpha is None:
            return self
        k = max(1, int(comparisons))
        if k == self.comparisons and alpha == self.false_alarm:
            return self
        return replace(
            self,
            comparisons=k,
            false_alarm=alpha,
            **_limits(self.frobenius_fit, self.share_fit, self.share_raw_fit, alpha, k),
        )

    def describe(self) -> str:
        """How the limits were derived and the false-alarm rate they state (for failure messages and summaries)."""
        if self.false_alarm is None:
            return (
                f"method {self.method} (no stated false-alarm rate; re-derive with flannel-repro bounds); "
                f"{self.measured}"
            )
        each = self.false_alarm / max(1, self.comparisons)
        return (
            f"method {self.method}, from n = {self.n} held-out pairs ({self.held_out}); nominal false-alarm rate "
            f"{self.false_alarm:.3g} per claim and clean session over {self.comparisons} comparison(s) "
            f"({each:.3g} each, split over both sides of a band)"
        )


class _Limits(TypedDict):
    """The three limits of a `Bound`, as keyword arguments for it."""

    max_frobenius: float
    order_share_min: float
    order_share_max: float


def _limits(frob: LogFit, share: LogFit, share_raw: LogFit | None, false_alarm: float, comparisons: int) -> _Limits:
    """The limits at `false_alarm` per claim and session over `comparisons` comparisons. The share's band is
    the union of its log-normal and its normal prediction bands: measured on held-out pairs, neither family
    fits the share's tails on every corpus (benchmarks/RESULTS.md), and a value outside the union is outside
    both, so the union keeps the rate of whichever fits (clipped at 0)."""
    each = false_alarm / comparisons
    lo, hi = share.limit(each / 2, upper=False), share.limit(each / 2, upper=True)
    if share_raw is not None:
        lo = max(0.0, min(lo, share_raw.limit(each / 2, upper=False)))
        hi = max(hi, share_raw.limit(each / 2, upper=True))
    return {"max_frobenius": frob.limit(each, upper=True), "order_share_min": lo, "order_share_max": hi}


def scale_key(config: RunConfig, data: Mapping[str, Any]) -> str:
    """The key of bounds and noise bands: the neutralised config and the data's content hashes.

    `data` holds the tokenizer's and corpus's sha256, as `CorpusData.hashes` ({"tokenizer", "corpus"})
    or as an artifact's or summary's data description ({"tokenizer_sha256", "corpus_sha256"})."""
    neutral = config.replace(
        model_seed=0,
        data_seed=0,
        engine="torch",
        device="cpu",
        threads=0,
        record_W=True,
        record_grads=False,
        record_momentum=False,
        record_variance=False,
        record_logits=False,
        deterministic=False,
    )
    hashes = {}
    for name in ("tokenizer", "corpus"):
        value = data.get(name) or data.get(f"{name}_sha256")
        if not isinstance(value, str) or not value:
            raise ConfigError(
                f"scale key: expected the {name}'s sha256 in the data description, got {value!r}; a bound "
                "belongs to the data it was derived on."
            )
        hashes[name] = value
    payload = json.dumps({"config": neutral.fingerprint(), **hashes}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def data_hashes(config: RunConfig) -> dict[str, str]:
    """The content hashes of the data `config` trains on (loads it: tokenises the corpus once, then cached)."""
    from flannel_repro.data.corpus import load_data

    return dict(load_data(config).hashes)


def _bound_from_table(table: Mapping[str, Any]) -> Bound:
    fits = {}
    for what in ("frobenius", "share"):
        if f"{what}_log_mean" in table:
            fits[f"{what}_fit"] = LogFit(
                float(table[f"{what}_log_mean"]), float(table[f"{what}_log_sd"]), int(table["n"])
            )
    if "share_mean" in table:
        fits["share_raw_fit"] = LogFit(float(table["share_mean"]), float(table["share_sd"]), int(table["n"]), False)
    rate = table.get("false_alarm")
    return Bound(
        scale=str(table["scale"]),
        max_frobenius=float(table["max_frobenius"]),
        order_share_min=float(table["order_share_min"]),
        order_share_max=float(table["order_share_max"]),
        measured=str(table.get("measured", "")),
        method=str(table.get("method", LEGACY_METHOD)),
        n=int(table.get("n", 0)),
        false_alarm=None if rate is None else float(rate),
        comparisons=int(table.get("comparisons", 0)),
        held_out=str(table.get("held_out", "")),
        **fits,
    )


def load_bounds(path: str | Path) -> dict[str, Bound]:
    """The tables of a bounds file by scale key. Tables without `method` (the old format: 1.5 x the largest
    measured value) still load, as method margin-1.5x with no stated false-alarm rate."""
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"bounds file {str(p)!r} is not valid TOML: {exc}.") from None
    out = {}
    for name, table in data.items():
        try:
            b = _bound_from_table(table)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ConfigError(
                f"bounds file {str(p)!r}: table [{name}] needs scale, max_frobenius, order_share_min, "
                f"order_share_max (and with a fit: n, *_log_mean, *_log_sd) ({exc!r})."
            ) from None
        _check_bound(b, table, f"bounds file {str(p)!r}: [{name}]")
        out[b.scale] = b
    return out


def _check_bound(b: Bound, table: Mapping[str, Any], where: str) -> None:
    """A loaded table's values must be finite and in range (a hand-edited inf or a reversed band is refused)."""

    def bad(key: str, expected: str) -> ConfigError:
        return ConfigError(f"{where} {key}: expected {expected}, got {table.get(key)!r}.")

    if not (math.isfinite(b.max_frobenius) and b.max_frobenius > 0):
        raise bad("max_frobenius", "a finite number > 0")
    for key in ("order_share_min", "order_share_max"):
        if not (math.isfinite(getattr(b, key)) and getattr(b, key) >= 0):
            raise bad(key, "a finite number >= 0")
    if b.order_share_min > b.order_share_max:
        raise bad("order_share_min", f"at most order_share_max ({b.order_share_max!r})")
    if b.false_alarm is not None and not 0 < b.false_alarm < 1:
        raise bad("false_alarm", "a rate in (0, 1)")
    if b.comparisons < 0:
        raise bad("comparisons", "an integer >= 0")
    fits = {"frobenius_log": b.frobenius_fit, "share_log": b.share_fit, "share": b.share_raw_fit}
    for prefix, fit in fits.items():
        if fit is None:
            continue
        if not math.isfinite(fit.mean):
            raise bad(f"{prefix}_mean", "a finite number")
        if not (math.isfinite(fit.sd) and fit.sd >= 0):
            raise bad(f"{prefix}_sd", "a finite number >= 0")
        if fit.n < 2:
            raise bad("n", "an integer >= 2 (held-out pairs of the fits)")


def bound_for(config: RunConfig, path: str | Path, data: Mapping[str, Any] | None = None) -> Bound | None:
    """The bound derived for this config on this data (`data`: its hashes; loaded from the config when None)."""
    return load_bounds(path).get(scale_key(config, data if data is not None else data_hashes(config)))


def derive(
    final_frobenius: Iterable[float],
    order_shares: Iterable[float],
    *,
    scale: str,
    measured: str,
    held_out: str = "",
    false_alarm: float = FALSE_ALARM,
    comparisons: int = COMPARISONS,
) -> Bound:
    """Limits from held-out measurements with a stated false-alarm rate (see METHOD above): the upper
    prediction limit of the final ‖ΔW‖_F, and the two-sided prediction band of the data-order share, so that
    a clean session's claim with `comparisons` comparisons fails with probability `false_alarm` if the logs
    are normal. Needs at least MIN_PAIRS finite positive values of each."""
    frobs = [float(f) for f in final_frobenius]
    shares = [float(s) for s in order_shares]
    if not 0.0 < false_alarm < 1.0 or comparisons < 1:
        raise ValueError(
            f"derive(): false_alarm must be in (0, 1) and comparisons >= 1, got {false_alarm}, {comparisons}."
        )
    frob_fit, share_fit = LogFit.of(frobs, "final-divergence"), LogFit.of(shares, "data-order share")
    raw_fit = LogFit.of(shares, "data-order share", log=False)
    return Bound(
        scale=scale,
        measured=measured,
        method=METHOD,
        n=len(frobs),
        false_alarm=false_alarm,
        comparisons=comparisons,
        held_out=held_out,
        frobenius_fit=frob_fit,
        share_fit=share_fit,
        share_raw_fit=raw_fit,
        **_limits(frob_fit, share_fit, raw_fit, false_alarm, comparisons),
    )


def seed_list(seeds: Sequence[int]) -> str:
    """'46..61' for a run of consecutive seeds, else '46,48,50'."""
    seeds = list(seeds)
    if len(seeds) > 2 and seeds == list(range(seeds[0], seeds[0] + len(seeds))):
        return f"{seeds[0]}..{seeds[-1]}"
    return ",".join(str(s) for s in seeds)


def bound_configs(
    run: RunConfig, base: int, others: Sequence[int]
) -> tuple[RunConfig, list[tuple[int, RunConfig, RunConfig]]]:
    """The runs `measure_bound` compares, in the order it obtains them: seed `base`'s run, and for each held-out
    seed s (other than `base`), (s, the run of seed s, the run with base's model seed and s's data order).
    A plan (runs.plan) asks for the same runs before they are measured. ConfigError for too few seeds."""
    kept = [s for s in others if s != base]
    if len(kept) < MIN_PAIRS:
        raise ConfigError(
            f"bounds need at least {MIN_PAIRS} held-out seeds other than the base seed {base}, got "
            f"{kept}; {HELD_OUT} (the default) give useful limits."
        )
    pairs = [(s, run.replace(model_seed=s, data_seed=s), run.replace(model_seed=base, data_seed=s)) for s in kept]
    return run.replace(model_seed=base, data_seed=base), pairs


def measure_bound(
    run: RunConfig,
    base: int,
    others: Sequence[int],
    obtain: Callable[[RunConfig], Any],
    *,
    log: Callable[[str], None] | None = None,
    done_with: Callable[[Any], None] | None = None,
    false_alarm: float = FALSE_ALARM,
    comparisons: int = COMPARISONS,
) -> Bound:
    """Train (or reuse, through `obtain(config) -> Trajectory`) seed `base` against each of `others`, both
    seeds changed and data order alone, and derive the bound of the Flannel 6 claims from them.

    `done_with(trajectory)` is called on each held-out run once its figures are taken (never on the base
    run): the CLI's --discard-compared deletes it there, so deriving a full-scale bound needs the disk of
    three runs, not of 2 x len(others) + 1 (1.3 GB each at the notebook's scale)."""
    from flannel_repro.analysis.assertions import measure_divergence, relative_divergence

    ref_config, pairs = bound_configs(run, base, others)
    others = [s for s, _, _ in pairs]
    ref = obtain(ref_config)
    finals, shares = [], []
    for s, both_config, order_config in pairs:
        both = obtain(both_config)
        d_both = measure_divergence(ref, both)
        finals.append(d_both.at(run.steps)["frobenius"])
        order = obtain(order_config)
        shares.append(relative_divergence(measure_divergence(ref, order), d_both))
        if done_with is not None:
            done_with(both)
            done_with(order)
        if log is not None:
            log(f"seed {s}: final ‖ΔW‖_F = {finals[-1]:.6g}, data-order share = {shares[-1]:.4f}")
    held_out = f"seed {base} vs {seed_list(others)}"
    measured = (
        f"{len(finals)} pairs ({held_out}), {run.steps} steps: final F in "
        f"[{min(finals):.6g}, {max(finals):.6g}], share in [{min(shares):.4f}, {max(shares):.4f}]"
    )
    return derive(
        finals,
        shares,
        scale=scale_key(run, ref.data_info),
        measured=measured,
        held_out=held_out,
        false_alarm=false_alarm,
        comparisons=comparisons,
    )


def to_toml(name: str, bound: Bound) -> str:
    lines = [f"[{name}]", f'scale = "{bound.scale}"', f'method = "{bound.method}"']
    if bound.false_alarm is not None:
        lines += [
            f"n = {bound.n}",
            f"false_alarm = {bound.false_alarm!r}  # nominal, per claim and clean session",
            f"comparisons = {bound.comparisons}  # per claim and session; limits recomputed for other counts",
            f'held_out = "{bound.held_out}"',
        ]
    lines += [
        f"max_frobenius = {bound.max_frobenius!r}",
        f"order_share_min = {bound.order_share_min!r}",
        f"order_share_max = {bound.order_share_max!r}",
    ]
    for what, fit in (("frobenius", bound.frobenius_fit), ("share", bound.share_fit)):
        if fit is not None:
            lines += [f"{what}_log_mean = {fit.mean!r}", f"{what}_log_sd = {fit.sd!r}"]
    if bound.share_raw_fit is not None:
        lines += [f"share_mean = {bound.share_raw_fit.mean!r}", f"share_sd = {bound.share_raw_fit.sd!r}"]
    lines.append(f'measured = "{bound.measured}"')
    return "\n".join(lines) + "\n"
