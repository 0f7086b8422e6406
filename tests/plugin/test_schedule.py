"""The plan from collection (plugin.plan.session_plan), the local scheduler (--flannel-schedule=plan), CI shards
(--flannel-shard, --flannel-train-only) and the gate job (--flannel-no-train), on the Flannel 6 suite at a tiny
scale: the plan is exactly the runs the claims ask for, both ways."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flannel_repro.config import RunConfig
from flannel_repro.runs.plan import RunRequest, request_label, shard, sorted_plan

ROOT = Path(__file__).parents[2]
CLAIMS = 11  # Flannel 6 claims at 2 seeds on cpu
# 2 seeds x (r0, r1, data order only) + threads=2 + hf + the bound's base and 3 held-out seeds x 2
PLANNED = 14
EXPERIMENT = 'dataset = "tiny"\nvocab_size = 512\nsteps = 2\nbatch_size = 8\nseq_len = 32\n[experiment]\nn_runs = 2\n'


def flannel6(tmp: Path, artifacts: str, *extra: str) -> subprocess.CompletedProcess:
    """A Flannel 6 session at the tiny scale, on cpu, deriving its bound from 3 held-out seeds."""
    exp = tmp / "exp.toml"
    exp.write_text(EXPERIMENT)
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        str(ROOT / "tests" / "flannel6"),
        "-p",
        "no:cacheprovider",
        "-rA",
        f"--flannel-config={exp}",
        f"--flannel-artifacts={tmp / artifacts}",
        "--flannel-progress=0",
        "--flannel-threads=1",
        "--flannel-devices=cpu",
        "--flannel-derive-bounds=44-46",
        *extra,
    ]
    if "-n" not in extra:
        cmd += ["-p", "no:xdist"]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=dict(os.environ))


def trained(folder: Path) -> list[dict]:
    log = folder / "training.log"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def runs_in(folder: Path) -> set[tuple[str, int]]:
    """(config fingerprint, repeat) of every run artifact: independent of the code's hash in the run key."""
    from flannel_repro.analysis.trajectory import Trajectory

    out = set()
    for path in folder.glob("*.safetensors"):
        traj = Trajectory(path)
        out.add((traj.config.fingerprint(), int(traj.metadata.get("repeat", 0))))
        traj.close()
    return out


def passed_line(result: subprocess.CompletedProcess) -> str:
    """The session's last line, without its ===: '11 passed in 4.1s'."""
    return result.stdout.strip().splitlines()[-1].strip("= ")


@pytest.fixture(scope="module")
def claims_runs(tmp_path_factory) -> set[tuple[str, int]]:
    """The runs the claims ask for: a session where each run trains when a claim first asks for it."""
    tmp = tmp_path_factory.mktemp("claims")
    result = flannel6(tmp, "a", "--flannel-schedule=claims")
    assert result.returncode == 0, result.stdout[-3000:]
    assert f"{CLAIMS} passed" in passed_line(result)
    runs = runs_in(tmp / "a")
    assert len(runs) == len(trained(tmp / "a")) == PLANNED
    return runs


def test_shards_train_exactly_the_plan_and_the_gate_trains_nothing(tmp_path, claims_runs):
    shards = []
    for k in (1, 2):
        result = flannel6(tmp_path, "store", f"--flannel-shard={k}/2")
        assert result.returncode == 0, result.stdout[-3000:]
        assert "deselected" in passed_line(result) and "PASSED flannel-train::seed" in result.stdout
        shards.append(len(trained(tmp_path / "store")) - sum(shards))
    assert sorted(shards) == [PLANNED // 2, PLANNED - PLANNED // 2]  # round-robin: balanced
    assert runs_in(tmp_path / "store") == claims_runs  # the plan is what the claims ask for, both ways
    gate = flannel6(tmp_path, "store", "--flannel-no-train")
    assert gate.returncode == 0 and f"{CLAIMS} passed" in passed_line(gate), gate.stdout[-3000:]
    assert len(trained(tmp_path / "store")) == PLANNED  # the gate trained nothing
    (missing,) = (tmp_path / "store").glob("seed43-cpu-torch-r1-*.safetensors")
    missing.unlink()
    gate = flannel6(tmp_path, "store", "--flannel-no-train")
    assert gate.returncode == 1 and passed_line(gate).startswith("1 failed"), gate.stdout[-3000:]
    out = gate.stdout
    assert (
        "FAILED tests/flannel6/test_determinism.py::test_same_seed_trained_twice_is_bitwise_identical[cpu-seed43]"
        in out
    )
    assert f"{missing.stem}: expected this run in the store" in out
    assert "the shard job --flannel-shard=K/N with K = " in out and "--flannel-train-only trains the whole plan" in out
    assert len(trained(tmp_path / "store")) == PLANNED


def test_plan_schedule_trains_the_plan_first_on_both_workers(tmp_path, claims_runs):
    result = flannel6(tmp_path, "a", "--flannel-schedule=plan", "-n", "2")
    assert result.returncode == 0 and f"{CLAIMS} passed" in passed_line(result), result.stdout[-3000:]
    log = trained(tmp_path / "a")
    assert len(log) == len({r["run"] for r in log}) == PLANNED  # each run trained once
    assert {r["worker"] for r in log} == {"gw0", "gw1"}  # both workers trained
    assert runs_in(tmp_path / "a") == claims_runs
    # the terminal summary lists the runs the workers trained before the claims
    assert "= flannel-repro =" in result.stdout and "seed43-cpu-torch-r1-" in result.stdout


def test_train_only_trains_the_whole_plan_as_items(tmp_path, claims_runs):
    result = flannel6(tmp_path, "a", "--flannel-train-only")
    assert result.returncode == 0, result.stdout[-3000:]
    assert passed_line(result).startswith(f"{PLANNED} passed, {CLAIMS} deselected")
    assert runs_in(tmp_path / "a") == claims_runs


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--flannel-shard=0/2"], "--flannel-shard (ini: flannel_shard) accepts K/N: shard K of N, integers with "),
        (["--flannel-shard=3/2"], "1 <= K <= N (e.g. 1/2); got '3/2'."),
        (["--flannel-shard=x"], "--flannel-shard (ini: flannel_shard) accepts K/N: * got 'x'."),
        (["--flannel-shard=1/2", "--flannel-no-train"], "--flannel-no-train * cannot go with --flannel-shard=1/2"),
        (
            ["--flannel-schedule=eager"],
            "--flannel-schedule (ini: flannel_schedule) accepts plan or claims; got 'eager'.",
        ),
    ],
)
def test_bad_schedule_options_are_usage_errors(tiny_experiment, args, needle):
    tiny_experiment.makepyfile("def test_x(trajectory):\n    pass\n")
    result = tiny_experiment.runpytest(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*{needle}*"])


def _request(seed: int, repeat: int = 0, **changes) -> RunRequest:
    return RunRequest(
        RunConfig(dataset="tiny", vocab_size=512, steps=2).replace(model_seed=seed, data_seed=seed, **changes), repeat
    )


def test_sorted_plan_drops_repeats_and_shards_split_it_round_robin():
    plan = sorted_plan([_request(s, r) for s in (42, 43, 44) for r in (0, 1)] + [_request(42), _request(43, 1)])
    assert len(plan) == 6 and plan == sorted(plan, key=RunRequest.sort_key)
    parts = [shard(plan, k, 4) for k in (1, 2, 3, 4)]
    assert [len(p) for p in parts] == [2, 2, 1, 1]
    assert sorted((r for p in parts for r in p), key=RunRequest.sort_key) == plan
    assert request_label(_request(42, 1)).startswith("seed42-cpu-torch-r1-")
    assert request_label(_request(42, threads=2)) != request_label(_request(42))  # unique where run_name is not
