"""Divergence bounds derived from measured runs, keyed by the scale they were measured at.

A bound is only meaningful for the configuration it was measured on, so each entry carries the
"scale key": the config fingerprint with the per-run knobs (seeds, device, engine, threads, what is
recorded) neutralised. The engines are bitwise equal, so the engine does not enter the key; the device
does not either (a bound is an upper limit on seed-to-seed divergence, which the tests check per
device).
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

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


def scale_key(config: RunConfig) -> str:
    neutral = config.replace(model_seed=0, data_seed=0, engine="torch", device="cpu", threads=0, record_W=True,
                             record_grads=False, record_momentum=False, record_variance=False, record_logits=False,
                             deterministic=False)
    return neutral.fingerprint()


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


def bound_for(config: RunConfig, path: str | Path) -> Bound | None:
    return load_bounds(path).get(scale_key(config))


def derive(final_frobenius: Iterable[float], order_shares: Iterable[float], *, scale: str, measured: str) -> Bound:
    """Bounds from measurements: MARGIN x the largest final ‖ΔW‖_F; the data-order share band widened
    by MARGIN on both sides (clipped to [0, inf))."""
    frobs = [f for f in final_frobenius if math.isfinite(f)]
    shares = [s for s in order_shares if math.isfinite(s)]
    if not frobs or not shares:
        raise ValueError("derive() needs at least one finite divergence and one finite share.")
    return Bound(scale=scale, max_frobenius=max(frobs) * MARGIN, order_share_min=min(shares) / MARGIN,
                 order_share_max=max(shares) * MARGIN, measured=measured)


def to_toml(name: str, bound: Bound) -> str:
    return (f"[{name}]\nscale = \"{bound.scale}\"\nmax_frobenius = {bound.max_frobenius!r}\n"
            f"order_share_min = {bound.order_share_min!r}\norder_share_max = {bound.order_share_max!r}\n"
            f"measured = \"{bound.measured}\"\n")
