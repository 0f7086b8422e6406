"""Runs trained on a real (local) Ray cluster: bitwise equal to runs trained in this process, in the same
numerics class, each trained once however often it is asked for, and the errors of a cluster that cannot be used.

One cluster of 2 CPUs for the module (it starts in seconds; its workers import torch once and are reused).
Deselect with `-m "not cluster"`."""

from __future__ import annotations

import os
import socket
import sys
import textwrap
import time

import pytest

from flannel_repro.errors import ConfigError, DeterminismWarning, NumericsError
from flannel_repro.runs import cluster
from flannel_repro.runs.cluster import ClusterResult, check_store_shared, train_on_cluster
from flannel_repro.runs.plan import RunRequest
from flannel_repro.runs.store import RunStore
from tests.conftest import TINY
from tests.test_resume import assert_bitwise_equal_artifacts

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.cluster

# threads=1 in the config: the local runs, trained in this process, then have the tasks' thread count (and class)
NATIVE = TINY.replace(steps=4, model_seed=1, data_seed=1, numerics="native", threads=1)
PORTABLE = TINY.replace(steps=4, model_seed=2, data_seed=2, numerics="portable", threads=1)


def portable_here() -> bool:
    """Whether this process computes in the portable class (the suite's ini arranges it at start-up)."""
    from flannel_repro.training.numerics import check

    try:
        check("portable")
    except NumericsError:
        return False
    return True


def test_a_cluster_started_for_the_call_is_shut_down_after_it(tmp_path):
    """First in the module: before its cluster starts (skipped when another test's cluster is running)."""
    if ray.is_initialized():
        pytest.skip("a Ray cluster is already running in this process")
    (got,) = submit([RunRequest(NATIVE)], "nosuch://bucket/runs", cache=str(tmp_path), num_cpus=1)  # fails at once
    assert "ConfigError" in got.error and "unknown protocol 'nosuch'" in got.error
    assert not ray.is_initialized()


@pytest.fixture(scope="module")
def local_cluster():
    """A real single-machine Ray cluster of 2 CPUs, for the module: train_on_cluster uses it and leaves it running."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield
    ray.shutdown()


def submit(requests, store, address=None, cache=None, **kwargs):
    return train_on_cluster(
        requests, location=str(store), cache=cache, address=address, threads=1, session="cluster-test",
        checkpoint_every=0, **kwargs,
    )  # fmt: skip


@pytest.fixture(scope="module")
def first(local_cluster, tmp_path_factory):
    """The native run asked for twice and the portable run once, in one submission, into an empty store."""
    store = tmp_path_factory.mktemp("cluster-store")
    requests = [RunRequest(NATIVE), RunRequest(NATIVE)]
    if portable_here():
        requests.append(RunRequest(PORTABLE))
    seen: list[ClusterResult] = []
    start = time.perf_counter()
    results = submit(requests, store, on_result=seen.append)
    print(f"first submission: {time.perf_counter() - start:.1f} s")
    assert [r.error for r in results] == [""] * len(requests)
    return store, requests, results, seen


def test_each_result_reported_as_it_completes_and_one_run_trained_once(first):
    _, requests, results, seen = first
    assert sorted(r.run_name for r in seen) == sorted(r.run_name for r in results)
    assert [r.request for r in results] == [q.to_dict() for q in requests]  # the requests' order
    native = results[:2]
    assert native[0].run_name == native[1].run_name and native[0].run_key == native[1].run_key
    assert sorted(r.trained for r in native) == [False, True]  # the run lock: the second task read the first's
    for r in results:
        assert r.host == socket.gethostname() and len(r.node_id) > 8 and r.wall_time_s > 0
        assert ClusterResult.from_dict(r.to_dict()) == r


def test_a_task_computes_in_the_drivers_numerics_class(first):
    from flannel_repro.training.numerics import numerics_info

    _, requests, results, _ = first
    for request, result in zip(requests, results):
        mode = request.config.numerics
        driver = numerics_info("cpu", threads=1, deterministic=request.config.deterministic, mode=mode)["class"]
        assert result.numerics_class == driver, mode
    assert {q.config.numerics for q in requests} == ({"native", "portable"} if portable_here() else {"native"})


def test_cluster_runs_are_bitwise_equal_to_runs_trained_here(first, tmp_path):
    store, requests, results, _ = first
    local = RunStore(tmp_path / "local")
    for request, result in zip(requests[1:], results[1:]):  # the native run once, the portable one
        got = local.obtain(request.config)
        assert got.trained and got.trajectory.path.stem == result.run_name  # the same run key
        got.trajectory.close()
        assert_bitwise_equal_artifacts(store / f"{result.run_name}.safetensors", got.trajectory.path)


def test_a_second_submission_trains_nothing(first):
    store, requests, results, _ = first
    again = submit(requests, store)
    assert [(r.run_name, r.trained, r.error) for r in again] == [(r.run_name, False, "") for r in results]


def test_a_run_of_another_class_is_reported_and_warned_about(first):
    store, requests, results, _ = first
    with pytest.warns(DeterminismWarning) as caught:
        (got,) = submit(requests[:1], store, expected_class="cpu-elsewhere-00000000-t1")
    assert got.class_differs and got.expected_class == "cpu-elsewhere-00000000-t1"
    text = str(caught[0].message)
    for part in (got.run_name, got.node_id[:12], got.numerics_class, "cpu-elsewhere-00000000-t1", "different run"):
        assert part in text
    (same,) = submit(requests[:1], store, expected_class=results[0].numerics_class)
    assert same.ok and not same.class_differs


def test_a_url_store_is_shared_through_each_machines_cache(first, tmp_path):
    _, requests, results, _ = first
    url = f"file://{tmp_path / 'shared'}"
    (got,) = submit(requests[:1], url, cache=str(tmp_path / "cache-a"))
    assert got.ok and got.trained and got.run_name == results[0].run_name
    assert (tmp_path / "cache-a" / f"{got.run_name}.safetensors").is_file()
    (again,) = submit(requests[:1], url, cache=str(tmp_path / "cache-b"))  # another machine: downloads it
    assert again.ok and not again.trained
    assert (tmp_path / "cache-b" / f"{got.run_name}.safetensors").is_file()


def test_a_failing_task_is_a_result_naming_its_error(local_cluster, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    (got,) = submit([RunRequest(NATIVE)], blocker / "store")
    assert not got.ok and not got.trained
    assert "ArtifactError" in got.error and "a-file" in got.error and " in obtain" in got.error


def tiny_suite(folder):
    """A suite of one test over 2 training seeds (7 and 8) of a 3-step tiny run; the pytest arguments for it."""
    folder.mkdir()
    (folder / "flannel.toml").write_text(
        'dataset = "tiny"\nvocab_size = 512\nsteps = 3\nbatch_size = 8\nseq_len = 32\nnumerics = "native"\n'
        "[experiment]\nn_runs = 2\nbase_train_seed = 7\ndevices = ['cpu']\n"
    )
    (folder / "test_claims.py").write_text(
        textwrap.dedent(
            """
            def test_runs(trajectory, train_seed):
                trajectory(train_seed)
            """
        )
    )
    return [f"--flannel-config={folder / 'flannel.toml'}", "-p", "no:cacheprovider", f"--rootdir={folder}"]


def test_train_command_trains_the_plan_of_the_collected_tests(local_cluster, tmp_path, monkeypatch, capsys):
    from flannel_repro import cli

    for name in ("PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT", "PYTEST_XDIST_TESTRUNUID"):
        monkeypatch.delenv(name, raising=False)
    suite = tmp_path / "suite"
    argv = ["train", str(suite), "--store", str(tmp_path / "store"), "--", *tiny_suite(suite)]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "2 runs: 2 trained, 0 reused, 0 failed" in out, out
    assert out.count("trained  seed") == 2 and "seed7-cpu-torch" in out and "seed8-cpu-torch" in out
    assert cli.main([*argv[:4], "--shard", "2/2", *argv[4:]]) == 0
    assert "1 runs: 0 trained, 1 reused, 0 failed" in capsys.readouterr().out


def test_train_command_exits_1_when_a_run_fails(local_cluster, tmp_path, monkeypatch, capsys):
    from flannel_repro.cli import train as command

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    collected = command.PlanCollector(plan=[RunRequest(NATIVE)])
    collected.session = type("S", (), {"planned_threads": lambda self: 1, "checkpoint_every": 0})()
    monkeypatch.setattr(command, "collect", lambda paths, args: collected)
    from flannel_repro import cli

    assert cli.main(["train", "--store", str(blocker / "store")]) == 1
    captured = capsys.readouterr()
    assert "failed   " in captured.out and "1 failed" in captured.out and "not every run" in captured.err


def test_train_command_connects_to_a_running_cluster_by_its_address_and_leaves_it_running(tmp_path, monkeypatch):
    """A head node in processes of its own (as `ray start --head` starts one), the command in another process."""
    import subprocess

    from ray.cluster_utils import Cluster

    for name in ("PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT", "PYTEST_XDIST_TESTRUNUID"):
        monkeypatch.delenv(name, raising=False)
    suite = tmp_path / "suite"
    args = tiny_suite(suite)
    head = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    try:
        command = [sys.executable, "-m", "flannel_repro", "train", str(suite), "--cluster", head.address]
        command += ["--store", f"file://{tmp_path / 'shared'}", "--cache", str(tmp_path / "cache"), "--", *args]
        for trained in (2, 0):  # the second command finds the cluster the first left running, and the runs
            done = subprocess.run(command, capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, done.stderr[-3000:]
            assert f"2 runs: {trained} trained, {2 - trained} reused, 0 failed" in done.stdout, done.stdout
    finally:
        head.shutdown()


# --- errors, before anything connects -------------------------------------------------------------------------


def test_without_ray_the_error_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ConfigError, match=r"flannel-repro\[ray\]"):
        submit([RunRequest(NATIVE)], tmp_path)


def test_a_remote_cluster_needs_a_store_every_machine_shares(tmp_path):
    with pytest.raises(ConfigError, match="local folder.*head:6379.*URL store"):
        train_on_cluster(
            [RunRequest(NATIVE)], location=str(tmp_path), cache=None, address="head:6379", threads=1, session="s",
            checkpoint_every=0,
        )  # fmt: skip
    for shared in ("s3://bucket/runs", "file:///mnt/shared/runs", "gs://b/p"):
        check_store_shared(shared, "ray://head:10001")
    for local in (None, "local", "LOCAL"):
        check_store_shared(str(tmp_path), local)


def test_an_unreachable_address_is_named_within_a_bounded_time(tmp_path, monkeypatch):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}"):
        start = time.perf_counter()
        with pytest.raises(ConfigError, match=f"'{address}'.*no Ray cluster answers at 127.0.0.1:{port}"):
            submit([RunRequest(NATIVE)], f"file://{tmp_path}", address=address)
        assert time.perf_counter() - start < 5
    monkeypatch.setattr(cluster, "CONNECT_TIMEOUT_S", 0.5)
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="192.0.2.1:6379"):  # TEST-NET-1: never routed, so never answered
        cluster.check_reachable(ray, "192.0.2.1")
    assert time.perf_counter() - start < 5


def test_bad_addresses_are_named(monkeypatch):
    for bad in ("http://head:6379", "head:port", ":6379"):
        with pytest.raises(ConfigError, match="expected 'auto', HOST:PORT or ray://HOST:PORT"):
            cluster.bootstrap_endpoint(ray, bad)
    assert cluster.bootstrap_endpoint(ray, "ray://head") == ("head", 10001)
    assert cluster.bootstrap_endpoint(ray, "head") == ("head", 6379)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6380")
    assert cluster.bootstrap_endpoint(ray, "auto") == ("10.0.0.5", 6380)


def test_a_task_starts_with_the_numerics_pins_of_its_mode(monkeypatch):
    from flannel_repro.training.numerics import NUMERICS_ENV, PINS

    for key in NUMERICS_ENV:
        monkeypatch.delenv(key, raising=False)
    assert cluster.task_env(RunRequest(NATIVE)) == {}
    assert cluster.task_env(RunRequest(PORTABLE)) == PINS["portable"]
    assert cluster.task_env(RunRequest(NATIVE.replace(device="cuda"))) == {
        "CUBLAS_WORKSPACE_CONFIG": os.environ.get("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    }
