"""Fixtures of the Flannel 6 suite: the divergence bounds derived for this repository's data."""

from __future__ import annotations

from pathlib import Path

import pytest

from flannel_repro.bounds import Bound, bound_for, scale_key

BOUNDS = Path(__file__).with_name("bounds.toml")


@pytest.fixture(scope="session")
def derived_bound(flannel_config) -> Bound:
    """The bound measured at this session's scale; a skip (with the way to derive one) when there is none."""
    bound = bound_for(flannel_config.run, BOUNDS)
    if bound is None:
        pytest.skip(f"no divergence bound derived for this configuration (scale {scale_key(flannel_config.run)}); "
                    f"derive one with `python -m flannel_repro.cli bounds` and add it to {BOUNDS}")
    return bound
