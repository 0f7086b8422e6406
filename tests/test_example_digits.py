"""The example project (examples/digits): your own model on a real data set, with its own claims and
committed snapshots, run as a user runs it (`pytest examples/digits -n 2`), each run trained once."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

pytest.importorskip("sklearn", reason="the digits example needs scikit-learn (pip install -e '.[examples]')")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "digits"


def test_example_project_runs_under_xdist_and_trains_each_run_once(tmp_path):
    project = tmp_path / "digits"
    shutil.copytree(EXAMPLE, project, ignore=shutil.ignore_patterns(".flannel", "__pycache__"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-n", "2", "-q", "-rA", "-W", "error::pytest.PytestWarning"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    passed = [line for line in proc.stdout.splitlines() if line.startswith("PASSED ")]
    assert len(passed) == 11, out[-4000:]  # every claim ran: none skipped, none deselected
    assert "3 snapshots passed" in proc.stdout, out[-3000:]

    log = [json.loads(line) for line in (project / ".flannel" / "artifacts" / "training.log").read_text().splitlines()]
    trained = Counter(entry["run"] for entry in log)
    # seeds 0, 1, 2; seed 0 repeated; data order alone; three resumed runs: 8 runs, each trained once
    assert len(trained) == 8 and set(trained.values()) == {1}, trained
    assert {entry["worker"] for entry in log} <= {"gw0", "gw1"}
