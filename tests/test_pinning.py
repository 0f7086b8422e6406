"""xdist workers are pinned to their own CPUs (placement only: no arithmetic changes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no sched_setaffinity on this platform")

PROBE = """
import json, os, sys
from flannel_repro.plugin.session import pin_worker
worker, workers, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
print(json.dumps({"pinned": pin_worker(worker or None, workers, threads), "now": sorted(os.sched_getaffinity(0))}))
"""


def _probe(worker: str, workers: int, threads: int, **env: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, worker, str(workers), str(threads)],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, **env},
    )
    return json.loads(out.stdout)


def test_each_worker_gets_its_own_cpus():
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        pytest.skip(f"needs 2 allowed CPUs, this process has {allowed}")
    first, second = _probe("gw0", 2, 1), _probe("gw1", 2, 1)
    assert first["pinned"] == first["now"] == [allowed[0]]
    assert second["pinned"] == second["now"] == [allowed[1]]


def test_no_pinning_when_cpus_do_not_suffice_or_when_turned_off():
    allowed = sorted(os.sched_getaffinity(0))
    too_many = _probe("gw0", len(allowed) + 1, 1)
    assert too_many["pinned"] is None and too_many["now"] == allowed
    off = _probe("gw0", 1, 1, FLANNEL_REPRO_PIN="0")
    assert off["pinned"] is None and off["now"] == allowed
    not_a_worker = _probe("", 1, 1)
    assert not_a_worker["pinned"] is None and not_a_worker["now"] == allowed
