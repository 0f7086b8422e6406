"""The Flannel 6 experiment past one machine, end to end: its CI-scale plan trained as tasks on a real local Ray
cluster (2 workers) into an S3 store (moto's server, over HTTP), then judged by a fresh session with an empty
cache that trains nothing, and the runs bitwise equal to the same runs trained here in this process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ray")
pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    """The outer session's environment, less its xdist identity (an inner session must not think it is a worker)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST_")}


def test_flannel6_trained_on_a_ray_cluster_into_s3_then_judged_from_the_store(s3, tmp_path, all_cpus):
    server, bucket = s3
    url = f"s3://{bucket}/flannel6"
    train = subprocess.run(
        [sys.executable, "-m", "flannel_repro", "train", "tests/flannel6", "--store", url,
         "--cache", str(tmp_path / "trainer-cache"), "--cluster", "local", "--num-cpus", "2", "--json"],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    assert train.returncode == 0, train.stdout + train.stderr
    results = json.loads(train.stdout)["runs"]
    assert results and all(r["error"] == "" for r in results)
    assert len({r["run_name"] for r in results}) == len(results)  # each planned run once
    trained_on = {r["node_id"] for r in results if r["trained"]}
    assert trained_on  # trained by the cluster's workers, not here

    judge_cache = tmp_path / "judge-cache"  # another machine: nothing cached
    judge = subprocess.run(
        [sys.executable, "-m", "pytest", "tests/flannel6", "-p", "xdist", "-n", "2", "-p", "no:cacheprovider",
         f"--flannel-artifacts={url}", f"--flannel-cache={judge_cache}", "--flannel-no-train"],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    out = judge.stdout + judge.stderr
    assert judge.returncode == 0, out
    assert " failed" not in out and "passed" in out
    assert not (judge_cache / "training.log").exists()  # trained nothing
    assert f"0 run(s) trained and published here, {len(results)} downloaded and verified" in out

    # bitwise: two of the cluster's runs trained again here, in this process, are the same runs
    from flannel_repro.runs.remote import RemoteStore
    from flannel_repro.runs.store import RunStore
    from flannel_repro.storage.run import RunFile

    import torch

    remote = RemoteStore(url)
    threads = torch.get_num_threads()
    for result in results[:2]:
        published = RunFile(judge_cache / f"{result['run_name']}.safetensors")
        torch.set_num_threads(int(published.metadata.get("threads", 1)))  # as the session's runs: --flannel-threads
        try:
            here = RunStore(tmp_path / "here").obtain(published.config, repeat=published.repeat)
        finally:
            torch.set_num_threads(threads)
        assert here.trajectory.key_material == published.key_material
        assert here.trained and here.trajectory.run_key == published.run_key == result["run_key"]
        steps = range(published.steps + 1)
        assert [here.trajectory.digest_hex(s) for s in steps] == [published.digest_hex(s) for s in steps]
        assert remote.lookup(result["run_name"]).numerics_class == result["numerics_class"]
