"""Fixtures of the Flannel 6 suite: the divergence bounds derived for this repository's data."""

from __future__ import annotations

from pathlib import Path

import pytest

from flannel_repro.analysis.bounds import Bound, bound_for, data_hashes, scale_key

BOUNDS = Path(__file__).with_name("bounds.toml")


@pytest.fixture(scope="session")
def derived_bound(flannel_config):  # noqa: ANN201
    """A function returning the bound measured at this session's scale. When none was derived it skips
    the calling test with the way to derive one, so call it after the test has measured and recorded
    what it can (the measurement is worth having even without a bound)."""

    def get() -> Bound:
        hashes = data_hashes(flannel_config.run)
        bound = bound_for(flannel_config.run, BOUNDS, hashes)
        if bound is None:
            pytest.skip(f"no divergence bound derived for this configuration on this data (scale "
                        f"{scale_key(flannel_config.run, hashes)}: config and the tokenizer's and corpus's hashes); the "
                        f"measurement was recorded; derive a bound with `flannel-repro bounds` and add it to {BOUNDS}")
        return bound

    return get
