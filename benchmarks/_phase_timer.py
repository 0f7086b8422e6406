"""A pytest plugin for benchmarks/speed.py --overhead: wall time per phase, written as JSON.

Loaded with `-p _phase_timer` (benchmarks/ on PYTHONPATH); FLANNEL_PHASE_REPORT names the file.
"""

from __future__ import annotations

import json
import os
import time

_t: dict[str, float] = {
    "start": time.perf_counter(),
    "collect": 0.0,
    "setup": 0.0,
    "call": 0.0,
    "teardown": 0.0,
    "obtain": 0.0,
    "obtain_calls": 0,
}


def pytest_configure(config) -> None:
    """Time the plugin's run lookup (run key, lock, store, open), which tests call from their bodies."""
    import flannel_repro.plugin.hooks as plugin

    real = plugin.obtain

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            _t["obtain"] += time.perf_counter() - t0
            _t["obtain_calls"] += 1

    plugin.obtain = timed


def pytest_sessionstart(session) -> None:
    _t["start"] = time.perf_counter()


def pytest_collection_finish(session) -> None:
    _t["collect"] = time.perf_counter() - _t["start"]


def pytest_runtest_logreport(report) -> None:
    _t[report.when] += report.duration


def pytest_sessionfinish(session, exitstatus) -> None:
    out = os.environ.get("FLANNEL_PHASE_REPORT")
    if out:
        data = {k: v for k, v in _t.items() if k != "start"} | {
            "total": time.perf_counter() - _t["start"],
            "exitstatus": int(exitstatus),
        }
        with open(out, "w", encoding="utf-8") as f:
            json.dump(data, f)
