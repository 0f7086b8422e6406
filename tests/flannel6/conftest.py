"""Fixtures of the Flannel 6 suite: the divergence bounds derived for this repository's data."""

from __future__ import annotations

from pathlib import Path

import pytest

from flannel_repro.analysis.bounds import Bound, bound_for, scale_key

BOUNDS = Path(__file__).with_name("bounds.toml")


@pytest.fixture(scope="session")
def derived_bound(flannel_config):  # noqa: ANN201
    """A function returning the bound measured at this session's scale. When none was derived it skips
    the calling test with the way to derive one, so call it after the test has measured and recorded
    what it can (the measurement is worth having even without a bound)."""

    def get() -> Bound:
        bound = bound_for(flannel_config.run, BOUNDS)
        if bound is None:
            pytest.skip(f"no divergence bound derived for this configuration (scale {scale_key(flannel_config.run)}); "
                        f"the measurement was recorded; derive a bound with `flannel-repro bounds` and add it to {BOUNDS}")
        return bound

    return get
