"""--flannel-artifacts=URL: sessions on two "machines" (two folders, two caches) share one S3 store (a real
moto server over HTTP), each run is trained once across both, and a store that cannot be used is a usage
error before anything runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from tests.plugin.conftest import TINY_TOML
from tests.s3server import start_server, stop_server

USER_TESTS = """
from flannel_repro import assert_identical, assert_diverged

def test_repeatable(trajectory, train_seed):
    assert_identical(trajectory(train_seed, repeat=0), trajectory(train_seed, repeat=1))

def test_seeds_part(trajectory):
    assert_diverged(trajectory(42), trajectory(43), by_step=1)
"""
RUNS = 4  # seeds 42 and 43, repeats 0 and 1


def _machine(root, name):
    """A project folder as a second machine would have it: the suite, its config, nothing trained."""
    folder = root / name
    folder.mkdir()
    (folder / "flannel.toml").write_text(TINY_TOML)
    (folder / "pytest.ini").write_text("[pytest]\nflannel_config = flannel.toml\nflannel_progress = 0\n")
    (folder / "test_user.py").write_text(USER_TESTS)
    return folder


def _session(folder, url, env, *args):
    return subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--flannel-artifacts", url, *args],
        cwd=folder,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _trained(folder):
    logs = list(folder.glob(".flannel/cache/*/training.log"))
    return [json.loads(line)["run"] for log in logs for line in log.read_text().splitlines()]


def test_two_machines_at_once_train_each_run_once(s3, tmp_path):
    server, bucket = s3
    url = f"s3://{bucket}/runs"
    a, b = _machine(tmp_path, "a"), _machine(tmp_path, "b")
    first = _session(a, url, server.env(), "-p", "xdist", "-n", "2")
    second = _session(b, url, server.env())
    out_a, out_b = first.communicate(timeout=600)[0], second.communicate(timeout=600)[0]
    assert first.returncode == 0, out_a
    assert second.returncode == 0, out_b
    trained = _trained(a) + _trained(b)
    assert sorted(trained) == sorted(set(trained)) and len(trained) == RUNS, (trained, out_a, out_b)
    # the runs one machine did not train it downloaded and verified, and says so
    for out in (out_a, out_b):
        assert f"store {url} (cache" in out and "downloaded and verified" in out

    # a third machine, empty cache: trains nothing, judges every claim from the store
    c = _machine(tmp_path, "c")
    third = _session(c, url, server.env(), "-p", "xdist", "-n", "2")
    out_c = third.communicate(timeout=600)[0]
    assert third.returncode == 0, out_c
    assert _trained(c) == []
    assert f"0 run(s) trained and published here, {RUNS} downloaded and verified" in out_c


def test_unreachable_store_is_a_usage_error_at_session_start(s3, tmp_path):
    server, bucket = s3
    folder = _machine(tmp_path, "a")
    env = {**server.env(), "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9"}  # nothing listens on port 9
    start = time.monotonic()
    session = _session(folder, f"s3://{bucket}/runs", env)
    out = session.communicate(timeout=120)[0]
    assert session.returncode == 4, out  # pytest's usage error
    assert "--flannel-artifacts" in out and f"s3://{bucket}/runs" in out
    # refused at once, or (on a loaded machine, after the client's retries) no answer within the check's limit
    assert "expected a reachable store" in out or "got no answer within" in out, out
    assert "Traceback" not in out
    assert time.monotonic() - start < 90
    assert not (folder / ".flannel").exists()  # nothing trained, nothing written


def test_wrong_credentials_are_a_usage_error_that_shows_no_secret(tmp_path):
    # a second server with authentication on: only keys it issued are accepted
    server = start_server({"INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    try:
        folder = _machine(tmp_path, "a")
        secret = "wrongSECRETvalue123456"
        session = _session(folder, "s3://some-bucket/runs", server.env("AKIAWRONGKEY", secret))
        out = session.communicate(timeout=120)[0]
    finally:
        stop_server(server)
    assert session.returncode == 4, out
    assert "check the credentials" in out and "Traceback" not in out
    assert secret not in out


def test_unknown_protocol_is_a_usage_error(tmp_path):
    folder = _machine(tmp_path, "a")
    session = _session(folder, "s3x://bucket/runs", {})
    out = session.communicate(timeout=120)[0]
    assert session.returncode == 4 and "unknown protocol 's3x'" in out, out
    assert not list(folder.glob("s3x*"))  # never taken as a local folder named 's3x:'
