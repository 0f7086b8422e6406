"""The report's file names, light to import (no torch, no matplotlib): the pytest plugin names the plot
that shows a failing claim with these, on the controller and in workers."""

from __future__ import annotations

import re
from typing import Any

STALL_PLOT = "update-fraction.png"  # == analysis.stall.PLOT (a test keeps the two equal)
SOURCES_PLOT = "sources.png"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def pair_class_plot(pair_class: str) -> str:
    return f"divergence-{slug(pair_class)}.png"


def plot_for_claim(claim: dict[str, Any]) -> str:
    """The report plot that shows what a recorded claim checked (its file name in the report folder). A pair
    the claim found bitwise identical may have no plot (a class whose pairs are all identical is a line of
    text on the page): it is named by its place on the page, `index.html#<plot name>`, which always exists."""
    if claim.get("claim") == "not_stalled":
        return STALL_PLOT
    plot = pair_class_plot(str(claim.get("pair_class", "")))
    return f"index.html#{plot}" if claim.get("identical") is True else plot


def plots_for(claims: list[dict[str, Any]], *, sources: bool = False) -> list[str]:
    """The plots that show a test's recorded claims (and its divergence-by-source table, if it made one)."""
    return sorted({plot_for_claim(c) for c in claims} | ({SOURCES_PLOT} if sources else set()))
