"""Fixtures of the Flannel 6 suite: the divergence bounds derived for this repository's data."""

from __future__ import annotations

from pathlib import Path

import pytest

from flannel_repro.analysis.bounds import Bound, bound_for, data_hashes, measure_bound, scale_key
from flannel_repro.plugin.session import SESSION_KEY

BOUNDS = Path(__file__).with_name("bounds.toml")
_DERIVED: dict[str, Bound] = {}  # bounds derived in this process (--flannel-derive-bounds), by scale key


@pytest.fixture
def derived_bound(flannel_config, trajectory, request):  # noqa: ANN201
    """A function returning the bound for this session's config and data: the committed one
    (bounds.toml), or with --flannel-derive-bounds=SEEDS one derived now from those held-out seeds
    (their runs are trained once and shared like every run). Otherwise it skips the calling test with
    the way to derive one, so call it after the test has measured and recorded what it can."""

    def get() -> Bound:
        hashes = data_hashes(flannel_config.run)
        bound = bound_for(flannel_config.run, BOUNDS, hashes)
        if bound is not None:
            return bound
        key = scale_key(flannel_config.run, hashes)
        held_out = request.config.stash[SESSION_KEY].derive_bounds
        if held_out:
            if key not in _DERIVED:
                _DERIVED[key] = measure_bound(
                    flannel_config.run, flannel_config.train_seeds[0], held_out,
                    lambda cfg: trajectory(model_seed=cfg.model_seed, data_seed=cfg.data_seed))
            return _DERIVED[key]
        pytest.skip(f"no divergence bound derived for this configuration on this data (scale {key}: config and the "
                    f"tokenizer's and corpus's hashes); the measurement was recorded. Derive one with `flannel-repro "
                    f"bounds` and add it to {BOUNDS}, or pass --flannel-derive-bounds=46-61 to derive one in this "
                    "session from held-out seeds (2 runs per seed)")

    return get
