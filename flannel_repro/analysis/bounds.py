"""Divergence bounds derived from measured runs, keyed by the scale and the data they were measured on.

A bound is only meaningful for the configuration and the data it was measured on, so each entry carries
the "scale key": the config fingerprint with the per-run knobs (seeds, device, engine, threads, what is
recorded) neutralised, and the content hashes of the tokenizer and the corpus. The engines are bitwise
equal, so the engine does not enter the key; the device does not either (a bound is an upper limit on
seed-to-seed divergence, which the tests check per device). The data does: a band derived on the
embedded synthetic corpus says nothing about a real-text corpus (measured: the data-order share of a
Python-docstrings corpus fell below the synthetic data's band), and file paths are not in the config's
fingerprint, so without the hashes another corpus would silently get this one's bounds.
"""

from __future__ import annotations

import hashlib
import json
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from flannel_repro.config import RunConfig
from flannel_repro.errors import ConfigError

MARGIN = 1.5  # bound = MARGIN x the largest final divergence measured over all seed pairs


@dataclass(frozen=True)
class Bound:
    scale: str
    max_frobenius: float
    order_share_min: float
    order_share_max: float
    measured: str  # how it was derived (pairs, steps, command)


def scale_key(config: RunConfig, data: Mapping[str, Any]) -> str:
    """The key of bounds and noise bands: the neutralised config and the data's content hashes.

    `data` holds the tokenizer's and corpus's sha256, as `CorpusData.hashes` ({"tokenizer", "corpus"})
    or as an artifact's or summary's data description ({"tokenizer_sha256", "corpus_sha256"})."""
    neutral = config.replace(model_seed=0, data_seed=0, engine="torch", device="cpu", threads=0, record_W=True,
                             record_grads=False, record_momentum=False, record_variance=False, record_logits=False,
                             deterministic=False)
    hashes = {}
    for name in ("tokenizer", "corpus"):
        value = data.get(name) or data.get(f"{name}_sha256")
        if not isinstance(value, str) or not value:
            raise ConfigError(f"scale key: expected the {name}'s sha256 in the data description, got {value!r}; a bound "
                              "belongs to the data it was derived on.")
        hashes[name] = value
    payload = json.dumps({"config": neutral.fingerprint(), **hashes}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def data_hashes(config: RunConfig) -> dict[str, str]:
    """The content hashes of the data `config` trains on (loads it: tokenises the corpus once, then cached)."""
    from flannel_repro.data.corpus import load_data

    return dict(load_data(config).hashes)


def load_bounds(path: str | Path) -> dict[str, Bound]:
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
            b = Bound(scale=str(table["scale"]), max_frobenius=float(table["max_frobenius"]),
                      order_share_min=float(table["order_share_min"]), order_share_max=float(table["order_share_max"]),
                      measured=str(table.get("measured", "")))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"bounds file {str(p)!r}: table [{name}] needs scale, max_frobenius, order_share_min, "
                              f"order_share_max ({exc!r}).") from None
        out[b.scale] = b
    return out


def bound_for(config: RunConfig, path: str | Path, data: Mapping[str, Any] | None = None) -> Bound | None:
    """The bound derived for this config on this data (`data`: its hashes; loaded from the config when None)."""
    return load_bounds(path).get(scale_key(config, data if data is not None else data_hashes(config)))


def derive(final_frobenius: Iterable[float], order_shares: Iterable[float], *, scale: str, measured: str) -> Bound:
    """Bounds from measurements: MARGIN x the largest final ‖ΔW‖_F; the data-order share band widened
    by MARGIN on both sides (clipped to [0, inf))."""
    frobs = [f for f in final_frobenius if math.isfinite(f)]
    shares = [s for s in order_shares if math.isfinite(s)]
    if not frobs or not shares:
        raise ValueError("derive() needs at least one finite divergence and one finite share.")
    return Bound(scale=scale, max_frobenius=max(frobs) * MARGIN, order_share_min=min(shares) / MARGIN,
                 order_share_max=max(shares) * MARGIN, measured=measured)


def measure_bound(run: RunConfig, base: int, others: Sequence[int], obtain: Callable[[RunConfig], Any], *,
                  log: Callable[[str], None] | None = None,
                  done_with: Callable[[Any], None] | None = None) -> Bound:
    """Train (or reuse, through `obtain(config) -> Trajectory`) seed `base` against each of `others`, both
    seeds changed and data order alone, and derive the bound of the Flannel 6 claims from them.

    `done_with(trajectory)` is called on each held-out run once its figures are taken (never on the base
    run): the CLI's --discard-compared deletes it there, so deriving a full-scale bound needs the disk of
    three runs, not of 2 x len(others) + 1 (1.3 GB each at the notebook's scale)."""
    from flannel_repro.analysis.assertions import measure_divergence, relative_divergence

    others = [s for s in others if s != base]
    if not others:
        raise ConfigError(f"bounds need at least one seed other than the base seed {base}.")
    ref = obtain(run.replace(model_seed=base, data_seed=base))
    finals, shares = [], []
    for s in others:
        both = obtain(run.replace(model_seed=s, data_seed=s))
        d_both = measure_divergence(ref, both)
        finals.append(d_both.at(run.steps)["frobenius"])
        order = obtain(run.replace(model_seed=base, data_seed=s))
        shares.append(relative_divergence(measure_divergence(ref, order), d_both))
        if done_with is not None:
            done_with(both)
            done_with(order)
        if log is not None:
            log(f"seed {s}: final ‖ΔW‖_F = {finals[-1]:.6g}, data-order share = {shares[-1]:.4f}")
    measured = (f"{len(finals)} pairs (seed {base} vs {others[0]}..{others[-1]}), {run.steps} steps: final F in "
                f"[{min(finals):.6g}, {max(finals):.6g}], share in [{min(shares):.4f}, {max(shares):.4f}]")
    return derive(finals, shares, scale=scale_key(run, ref.data_info), measured=measured)


def to_toml(name: str, bound: Bound) -> str:
    return (f"[{name}]\nscale = \"{bound.scale}\"\nmax_frobenius = {bound.max_frobenius!r}\n"
            f"order_share_min = {bound.order_share_min!r}\norder_share_max = {bound.order_share_max!r}\n"
            f"measured = \"{bound.measured}\"\n")
