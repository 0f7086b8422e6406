"""Shared test helpers: a private cache directory and small run configs."""

from __future__ import annotations

import pytest

from flannel_repro.config import RunConfig

# The tiny embedded data set: 512-entry vocabulary, ~40k characters. Small enough that a 20-step run
# takes about a second, large enough that every code path (masks, batches, epochs) is exercised.
TINY = RunConfig(dataset="tiny", vocab_size=512, steps=6, batch_size=8, seq_len=32)


@pytest.fixture
def tiny_config() -> RunConfig:
    return TINY


# The experiment and the gate run as a user runs them, with the user's cache (a second session
# reads the tokenised corpus instead of tokenising it again, as the plugin-overhead benchmark assumes).
_USER_CACHE_DIRS = ("flannel6", "gate")


@pytest.fixture(autouse=True)
def _isolated_cache(request, tmp_path_factory, monkeypatch):
    """Unit tests' token-id caches and generated data go to a per-session temp dir, never to ~/.cache."""
    if request.node.path.parent.name in _USER_CACHE_DIRS:
        return
    monkeypatch.setenv("FLANNEL_REPRO_CACHE", str(tmp_path_factory.getbasetemp() / "flannel-cache"))


@pytest.fixture
def all_cpus():
    """An xdist worker may have pinned itself to one CPU (plugin.session.pin_worker); child processes and
    inner runs would inherit that mask. Give them the whole machine, then restore it."""
    import os

    if not hasattr(os, "sched_setaffinity"):
        yield
        return
    before = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, range(os.cpu_count() or 1))
    except OSError:
        pass
    yield
    os.sched_setaffinity(0, before)


# A real S3 server (moto's server mode) for the URL-store tests: started only by the tests that ask for it.
from tests.s3server import s3, s3_server  # noqa: E402, F401
