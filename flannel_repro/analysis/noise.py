"""Noise bands: how far a summary moves when only the arithmetic changes, measured rather than guessed.

Two machines of different numerics classes train the same config to trajectories that part at step 1
and then drift apart by rounding alone. A tolerant comparison between classes needs to know how far
that drift goes at each recorded step, for each summary field. This module measures it the way the
divergence bounds are measured from held-out seeds (`flannel_repro.bounds`): train the same seeds
under several arithmetic variants (thread counts, oneDNN ISAs, MKL branches: `numerics.VARIANT_ENV`),
summarize each, and take, per field and step, the largest deviation of any variant from a reference
variant. The band is MARGIN times that: a comparison is between two arbitrary classes, each up to the
measured deviation away from the reference, so by the triangle inequality twice the deviation covers
any two of the measured classes.

What the band says is also what it does not allow:

* a field the variants never moved (W at step 0, the config, the data hashes) must match exactly;
* the digest chains must agree through the last step on which every variant agreed
  (`exact_through`, usually step 0: arithmetic cannot touch W_initial), so a one-ulp change of
  W_initial fails however wide the later bands are.

Bands are stored as JSON (`flannel_noise_bands.json` beside the tests, or `--flannel-noise-bands`),
one entry per scale (`bounds.scale_key`: the data's hashes and the config with seeds, device, engine and threads
neutralised), with how they were measured. `flannel-repro noise` (`runs.variants`) trains the
variants and derives them with `derive_band`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from flannel_repro.errors import ArtifactError, ConfigError
from flannel_repro.storage.jsonfile import read_json, write_text_atomic
from flannel_repro.analysis.compare import Comparison, FieldChange, compare
from flannel_repro.analysis.summary import Summary

BANDS_FORMAT = "flannel-repro/noise-bands/1"
MARGIN = 2.0
DEFAULT_FILE = "flannel_noise_bands.json"


@dataclass(frozen=True)
class NoiseBand:
    """Allowed |stored - obtained| per summary kind ('run', 'pair') and field path ('loss @ step 10')."""

    scale: str
    fields: Mapping[str, Mapping[str, float]]
    exact_through: int | None  # chains must agree on steps 0..exact_through (None: on every step)
    margin: float = MARGIN
    measured: Mapping[str, Any] = field(default_factory=dict)
    source: str = ""  # the file it was read from (set on reading)

    def allowed(self, kind: str, path: str) -> float:
        return float(self.fields.get(kind, {}).get(path, 0.0))

    def describe(self) -> str:
        m = self.measured
        variants = ", ".join(m.get("variants", [])) or "?"
        where = f" in {self.source}" if self.source else ""
        chain = (
            "digest chains exact on every step"
            if self.exact_through is None
            else f"digest chains exact through step {self.exact_through}"
        )
        return (
            f"noise band for scale {self.scale}{where}: {self.margin:g} x the largest deviation of "
            f"{variants} from {m.get('reference', '?')} (seeds {m.get('seeds', '?')}, measured on "
            f"{m.get('machine', '?')}); {chain}"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "scale": self.scale,
            "margin": self.margin,
            "exact_through": self.exact_through,
            "measured": dict(self.measured),
            "fields": {k: dict(sorted(v.items())) for k, v in self.fields.items()},
        }

    @classmethod
    def from_json(cls, data: Any, *, source: str) -> "NoiseBand":
        try:
            fields = {str(kind): {str(p): float(v) for p, v in paths.items()} for kind, paths in data["fields"].items()}
            exact = data["exact_through"]
            band = cls(
                scale=str(data["scale"]),
                fields=fields,
                exact_through=None if exact is None else int(exact),
                margin=float(data.get("margin", MARGIN)),
                measured=dict(data.get("measured", {})),
                source=source,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ArtifactError(
                f"{source}: expected a noise band with scale, fields and exact_through, got an entry "
                f"that cannot be read ({exc!r})."
            ) from None
        bad = [p for paths in band.fields.values() for p, v in paths.items() if not (math.isfinite(v) and v >= 0)]
        if bad:
            raise ArtifactError(
                f"{source}: noise band {band.scale}: expected finite allowances >= 0, got bad values for {bad[:3]}."
            )
        return band


def read_bands(path: str | os.PathLike[str]) -> dict[str, NoiseBand]:
    """The bands of a file, by scale; {} when the file does not exist."""
    p = Path(path)
    data = read_json(p, "a noise-bands JSON file", missing=None)
    if data is None:
        return {}
    if not isinstance(data, dict) or data.get("format") != BANDS_FORMAT:
        raise ArtifactError(
            f"{p}: expected format {BANDS_FORMAT!r}, got {data.get('format') if isinstance(data, dict) else data!r}."
        )
    return {b.scale: b for b in (NoiseBand.from_json(e, source=str(p)) for e in data.get("bands", []))}


def write_bands(path: str | os.PathLike[str], bands: Iterable[NoiseBand]) -> Path:
    """Write bands (merged with the file's others: an entry of the same scale is replaced), atomically."""
    p = Path(path)
    merged = read_bands(p) if p.exists() else {}
    for band in bands:
        merged[band.scale] = band
    text = (
        json.dumps(
            {"format": BANDS_FORMAT, "bands": [merged[k].to_json() for k in sorted(merged)]}, indent=2, sort_keys=True
        )
        + "\n"
    )
    return write_text_atomic(p, text, "the noise bands")


def summary_scale(summary: Summary) -> str:
    """The scale key of the config a summary was made from (a pair: of its first run)."""
    from flannel_repro.analysis.bounds import scale_key
    from flannel_repro.config import RunConfig

    tree = summary.tree if summary.kind == "run" else summary.tree.get("a", {})
    cfg = tree.get("config") if isinstance(tree, Mapping) else None
    if not isinstance(cfg, Mapping):
        raise ArtifactError("summary: expected a 'config' table to find its noise band, got none.")
    data = tree.get("data") if isinstance(tree, Mapping) else None
    if not isinstance(data, Mapping):
        raise ArtifactError("summary: expected a 'data' table (the data's hashes) to find its noise band, got none.")
    return scale_key(RunConfig.from_dict(cfg, source="summary config"), data)


# --- measuring -------------------------------------------------------------------------------------------


def _numeric_delta(change: FieldChange) -> float | None:
    s, o = change.stored, change.obtained
    if isinstance(s, bool) or isinstance(o, bool) or not isinstance(s, (int, float)) or not isinstance(o, (int, float)):
        return None
    if not (math.isfinite(s) and math.isfinite(o)):
        return None
    return abs(float(o) - float(s))


def deviations(reference: Summary, variant: Summary) -> tuple[dict[str, float], int | None]:
    """|variant - reference| of every numeric field that moved, and the first step the chains part."""
    cmp = compare(reference, variant)
    if cmp.error:
        raise ArtifactError(f"noise: cannot compare summaries: {cmp.error}")
    out: dict[str, float] = {}
    for ch in cmp.changes:
        d = _numeric_delta(ch) if " @ step " in ch.path else None  # per-step measurements only
        if d is not None:
            out[ch.path] = max(out.get(ch.path, 0.0), d)
        elif ch.kind not in ("chain",) and not _is_digest_path(ch.path):
            raise ArtifactError(
                f"noise: the variants differ in {ch.path} ({ch.stored!r} vs {ch.obtained!r}), which "
                "arithmetic cannot change: they are not the same run."
            )
    return out, cmp.first_divergent_step


def derive_band(
    pairs: Iterable[tuple[Summary, Summary]],
    *,
    scale: str,
    margin: float = MARGIN,
    measured: Mapping[str, Any] | None = None,
) -> NoiseBand:
    """A band from (reference, variant) summary pairs of the same runs under different arithmetic."""
    if not (math.isfinite(margin) and margin >= 1):
        raise ConfigError(f"noise band margin: expected a finite number >= 1, got {margin!r}.")
    fields: dict[str, dict[str, float]] = {}
    first: int | None = None
    n = 0
    for ref, var in pairs:
        n += 1
        devs, part = deviations(ref, var)
        kind = fields.setdefault(ref.kind, {})
        for path, d in devs.items():
            kind[path] = max(kind.get(path, 0.0), d)
        if part is not None:
            first = part if first is None else min(first, part)
    if n == 0:
        raise ConfigError("noise band: expected at least one (reference, variant) pair of summaries, got none.")
    scaled = {k: {p: d * margin for p, d in v.items() if d > 0} for k, v in fields.items()}
    observed = {k: {p: d for p, d in v.items() if d > 0} for k, v in fields.items()}
    info = {**(measured or {}), "pairs": n, "max_deviation": observed}
    return NoiseBand(
        scale=scale, fields=scaled, exact_through=None if first is None else first - 1, margin=margin, measured=info
    )


# --- comparing within a band -----------------------------------------------------------------------------


def _is_digest_path(path: str) -> bool:
    parts = path.split(".")
    return "digests" in parts or path.endswith("digest_chain")


def _side(path: str) -> str:
    """'a.digests.last' -> 'a'; 'digests.last' -> '' (the key of Comparison.chains)."""
    head = path.split(".", 1)[0]
    return head if head in ("a", "b") else ""


def compare_within_band(stored: "Summary | str", obtained: "Summary | str", band: NoiseBand) -> Comparison:
    """Compare an obtained summary with one stored in another numerics class, within `band`.

    Numeric fields may move by the band's allowance (0 where the variants never moved them); the digest
    chains must agree through `band.exact_through`; everything else compares exactly.
    """
    cmp = compare(stored, obtained)
    if cmp.error:
        return cmp
    s = stored if isinstance(stored, Summary) else Summary.from_text(stored, source="stored snapshot")
    kind = s.kind
    kept: list[FieldChange] = []
    within = 0
    for ch in cmp.changes:
        delta = _numeric_delta(ch)
        if delta is not None:
            ok = delta <= band.allowed(kind, ch.path)
        elif ch.kind == "chain" or _is_digest_path(ch.path):
            chain = cmp.chains.get(_side(ch.path))
            part = chain.first_step if chain is not None else None
            lengths_agree = chain is not None and chain.stored_steps == chain.obtained_steps
            ok = (
                part is not None
                and lengths_agree
                and band.exact_through is not None
                and part > band.exact_through
                and not (ch.path.endswith("digests.first") and band.exact_through >= 0)
            )
        else:
            ok = False
        if ok:
            within += 1
        else:
            kept.append(ch)
    cmp.changes = kept
    cmp.band = band
    cmp.within_band = within
    return cmp
