"""Run summaries, their tolerant comparison, digest chains (library and CLI), and deterministic_mode's
promise to restore every global flag it changes."""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
import textwrap

import pytest
import torch

from flannel_repro import cli
from flannel_repro.config import RunConfig
from flannel_repro.analysis.bitwise import update_fraction
from flannel_repro.errors import ArtifactError, ConfigError
from flannel_repro.analysis.chain import PREFIX_HEX, DigestChain
from flannel_repro.analysis.compare import Tolerance, compare, compare_run_to_chain
from flannel_repro.analysis.provenance import ENV_KEYS, device_class
from flannel_repro.analysis.summary import SUMMARY_FORMAT, Summary, default_steps, summarize_pair
from flannel_repro.analysis.trajectory import Trajectory

# 12 steps: the default summary steps are then 0, 1, 10 and 12.
BASE = RunConfig(dataset="tiny", vocab_size=512, steps=12, batch_size=8, seq_len=32, threads=1)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Trajectory]:
    """Three tiny trainings: the base run, the same with lr doubled, and seed 43."""
    from flannel_repro.training.harness import train

    out = tmp_path_factory.mktemp("summary-runs")
    with pytest.MonkeyPatch.context() as mp:  # the autouse cache fixture is function-scoped: set it here too
        mp.setenv("FLANNEL_REPRO_CACHE", str(tmp_path_factory.getbasetemp() / "flannel-cache"))
        made = {
            "base": train(BASE, out / "base.safetensors").path,
            "lr": train(BASE.replace(lr=2e-3), out / "lr.safetensors").path,
            "seed43": train(BASE.with_train_seed(43), out / "seed43.safetensors").path,
        }
    return {k: Trajectory(p) for k, p in made.items()}


# --- building summaries ---------------------------------------------------------------------------


def test_default_steps_and_device_class():
    assert default_steps(1) == [0, 1]
    assert default_steps(4) == [0, 1, 4]
    assert default_steps(10) == [0, 1, 10]
    assert default_steps(20) == [0, 1, 10, 20]
    assert default_steps(1000) == [0, 1, 10, 100, 1000]
    assert [device_class(d) for d in ("cpu", "cuda", "cuda:1", "mps")] == ["cpu", "cuda", "cuda", "mps"]
    with pytest.raises(ConfigError, match="device: expected 'cpu', 'cuda', 'cuda:N' .* or 'mps', got 'tpu'"):
        device_class("tpu")


def test_run_summary_holds_the_requested_statistics(runs):
    traj = runs["base"]
    tree = traj.summary().tree
    assert tree["format"] == SUMMARY_FORMAT and tree["kind"] == "run" and tree["device_class"] == "cpu"
    assert tree["total_steps"] == 12
    assert [r["step"] for r in tree["steps"]] == [0, 1, 10, 12]
    assert tree["config_fingerprint"] == traj.config.fingerprint()  # device is already the class 'cpu'
    assert tree["config"]["lr"] == 1e-3 and "tokenizer_path" not in tree["config"]
    assert set(tree["data"]) >= {"tokenizer_sha256", "corpus_sha256", "n_live", "n_dead"}

    fractions = update_fraction(traj.path)
    for rec in tree["steps"]:
        t = rec["step"]
        w = traj.W[t].to(torch.float64)
        assert rec["W"]["max_abs"] == float(w.abs().max())
        assert math.isclose(rec["W"]["frobenius"], float(w.square().sum().sqrt()), rel_tol=1e-12)
        assert math.isclose(rec["W"]["mean"], float(w.mean()), rel_tol=1e-9)
        assert math.isclose(rec["W"]["std"], float(w.std(correction=0)), rel_tol=1e-12)
        if t == 0:  # no loss and no update before the first step: the fields are absent, not NaN
            assert "loss" not in rec and "update_fraction" not in rec
        else:
            assert rec["loss"] == float(traj.losses[t])
            assert rec["update_fraction"] == float(fractions[t])

    digests = [traj.digest_hex(t) for t in range(13)]
    assert tree["digests"]["first"] == digests[0] and tree["digests"]["last"] == digests[-1]
    assert tree["digests"]["chain_sha256"] == hashlib.sha256(b"".join(bytes.fromhex(d) for d in digests)).hexdigest()
    assert Summary(tree).chains() == {"": [d[:PREFIX_HEX] for d in digests]}
    assert tree["digest_chain"][0].count(" ") == 7  # rows of 8 prefixes

    env = tree["environment"]
    assert set(env) <= set(ENV_KEYS) and env["threads"] == 1
    assert "platform" not in env and "malloc" not in env

    assert [r["step"] for r in traj.summary(steps=[3, 0]).tree["steps"]] == [0, 3]
    with pytest.raises(ValueError, match=r"expected steps in 0..12 .*got \[13\]"):
        traj.summary(steps=[0, 13])


def test_summary_text_is_canonical_round_trip_exact_and_free_of_paths(runs):
    traj = runs["base"]
    text = traj.summary().to_text()
    again = Summary.from_text(text)
    assert again.to_text() == text and again == traj.summary()

    def check_sorted(pairs):
        keys = [k for k, _ in pairs]
        assert keys == sorted(keys)
        return dict(pairs)

    json.loads(text, object_pairs_hook=check_sorted)
    for rec, parsed in zip(traj.summary().tree["steps"], again.tree["steps"]):
        for key, value in rec["W"].items():
            assert parsed["W"][key] == value  # repr round-trips every float exactly
    assert str(traj.path.parent) not in text and traj.path.name not in text
    assert "wall" not in text and "steps_per_s" not in text


def test_summary_is_identical_in_other_processes_and_thread_counts(runs):
    path = runs["base"].path
    expected = runs["base"].summary().to_text()
    script = textwrap.dedent(f"""
        import sys, torch
        torch.set_num_threads(int(sys.argv[1]))
        from flannel_repro.analysis.summary import summarize
        sys.stdout.write(summarize({str(path)!r}).to_text())
    """)
    for threads in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", script, threads], capture_output=True, text=True, check=True)
        assert out.stdout == expected


def test_pair_summary(runs):
    pair = summarize_pair(runs["base"], runs["seed43"]).tree
    assert pair["kind"] == "pair" and pair["device_class"] == "cpu"
    assert pair["divergence"]["first_step"] == 1
    at = {r["step"]: r for r in pair["divergence"]["steps"]}
    assert at[0]["frobenius"] == 0.0 and at[0]["rows_differ"] == 0
    assert at[12]["frobenius"] > 0 and at[12]["rows_differ"] == at[12]["rows_differ_live"] + at[12]["rows_differ_dead"]
    assert pair["a"]["config"]["model_seed"] == 42 and pair["b"]["config"]["model_seed"] == 43
    same = summarize_pair(runs["base"].path, runs["base"].path).tree
    assert same["divergence"]["first_step"] is None
    assert all(r["max_abs"] == 0.0 for r in same["divergence"]["steps"])


# --- comparing summaries --------------------------------------------------------------------------


def test_identical_summaries_match(runs):
    s = runs["base"].summary()
    result = compare(s.to_text(), s)
    assert result.ok and result.compared > 50 and result.first_divergent_step is None
    assert result.report(name="t[cpu]")[0].startswith("flannel snapshot t[cpu] matches")


def test_changed_learning_rate_names_the_fields_and_the_first_divergent_step(runs):
    result = compare(runs["base"].summary().to_text(), runs["lr"].summary())
    assert not result.ok
    moved = {c.path: c for c in result.changes}
    assert (
        moved["config.lr"].stored == 1e-3 and moved["config.lr"].obtained == 2e-3 and moved["config.lr"].kind == "exact"
    )
    assert {
        "config_fingerprint",
        "digests.last",
        "digests.chain_sha256",
        "loss @ step 12",
        "W.frobenius @ step 12",
    } <= set(moved)
    assert "digests.first" not in moved and not any("step 0" in p for p in moved)  # same W_initial
    assert "loss @ step 1" not in moved  # the first loss is computed before any update
    assert moved["digest_chain"].detail == "parts at step 1"
    assert result.first_divergent_step == 1
    report = "\n".join(result.report(name="test_lr[cpu]", location="__snapshots__/t/test_lr[cpu].flannel"))
    assert report.startswith("flannel snapshot test_lr[cpu] moved: ")
    assert "the trajectories part at step 1 (steps 0..0 agree;" in report
    assert "environment: same as stored (torch " in report
    assert "config.lr" in report and "--snapshot-update" in report


def _tree(**step1) -> Summary:
    return Summary(
        {
            "format": SUMMARY_FORMAT,
            "kind": "run",
            "config": {"lr": 0.001},
            "label": "x",
            "steps": [{"step": 1, **step1}],
        }
    )


@pytest.mark.parametrize(
    ("tol", "stored", "obtained", "ok"),
    [
        (Tolerance(), 1.0, 1.0, True),
        (Tolerance(), 1.0, 1.0000000000000002, False),  # default exact: one ulp fails
        (Tolerance(atol=0.5), 1.0, 1.5, True),  # just inside: |d| == atol
        (Tolerance(atol=0.5), 1.0, 1.5000000000000002, False),  # just outside
        (Tolerance(rtol=0.25), 2.0, 2.5, True),  # |d| == rtol * |stored|
        (Tolerance(rtol=0.25), 2.0, 2.5000000000000004, False),
        (Tolerance(rtol=0.25, atol=1.0), 2.0, 3.0, True),  # the larger of the two allowances
        (Tolerance(rtol=0.25, atol=1.0), 2.0, 3.0000000000000004, False),
        (Tolerance(atol=1.0), math.nan, math.nan, True),
        (Tolerance(atol=1.0), math.nan, 1.0, False),
        (Tolerance(atol=1.0), math.inf, math.inf, True),
        (Tolerance(atol=1.0), math.inf, 1e308, False),
    ],
)
def test_tolerance_edges(tol, stored, obtained, ok):
    assert compare(_tree(loss=stored), _tree(loss=obtained), tol).ok is ok


def test_tolerance_applies_to_measured_floats_only():
    loose = Tolerance(rtol=0.5, atol=10.0)
    assert not compare(_tree(rows=3), _tree(rows=4), loose).ok  # ints exact
    assert not compare(_tree(d="ab"), _tree(d="ac"), loose).ok  # strings (digests) exact
    stored = _tree(loss=1.0)
    obtained = Summary({**stored.tree, "config": {"lr": 0.0011}})
    result = compare(stored, obtained, loose)  # config values are inputs: exact
    assert [c.path for c in result.changes] == ["config.lr"]
    row = "\n".join(compare(_tree(loss=1.0), _tree(loss=2.0), Tolerance(atol=0.5)).report())
    assert "loss @ step 1" in row and "+1.000e+00 (rel 1.00e+00)" in row and "0.5" in row


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf, True, "0.1"])
def test_tolerance_is_validated(bad):
    with pytest.raises(ConfigError, match="tolerance 'rtol' must be a finite number >= 0"):
        Tolerance(rtol=bad)


def test_environment_is_stored_and_reported_but_not_compared(runs):
    stored = runs["base"].summary()
    older = Summary(
        {
            **stored.tree,
            "environment": {
                **stored.tree["environment"],
                "packages": {**stored.tree["environment"]["packages"], "torch": "2.12.0"},
                "threads": 2,
            },
        }
    )
    assert compare(older, stored).ok  # same numbers: a different environment alone is no failure
    result = compare(older, runs["lr"].summary())
    report = "\n".join(result.report())
    assert "environment differs from the stored one" in report
    assert "packages.torch: 2.12.0 -> " in report and "threads: 2 -> 1" in report


def test_unreadable_or_foreign_stored_snapshot_is_a_mismatch_not_a_crash(runs):
    obtained = runs["base"].summary()
    broken = compare("{ not json", obtained)
    assert not broken.ok and "cannot be read" in broken.error
    old = compare(Summary({**obtained.tree, "format": "flannel-repro/summary/0"}), obtained)
    assert not old.ok and "format 'flannel-repro/summary/0'" in old.error
    assert "--snapshot-update" in "\n".join(old.report())


def test_different_step_sets_are_reported_per_step(runs):
    stored = runs["base"].summary(steps=[0, 1, 12])
    obtained = runs["base"].summary(steps=[0, 1, 10, 12])
    result = compare(stored, obtained)
    assert [(c.path, c.kind, c.detail) for c in result.changes] == [
        ("step 10", "added", "step not in the stored summary")
    ]
    assert [(c.path, c.kind) for c in compare(obtained, stored).changes] == [("step 10", "removed")]


# --- digest chains --------------------------------------------------------------------------------


def test_digest_chain_round_trip_and_first_divergent_step(runs, tmp_path):
    base, lr = runs["base"], runs["lr"]
    chain = DigestChain.from_run(base)
    assert len(chain) == 13 and chain.prefixes[5] == base.digest_hex(5)[:PREFIX_HEX]
    path = chain.write(tmp_path / "chain.json")
    assert path.stat().st_size < 4000
    back = DigestChain.read(path)
    assert back == chain and back.info["config_fingerprint"] == base.config.fingerprint()
    assert back.compare(DigestChain.from_run(base)).identical
    parted = back.compare(DigestChain.from_run(lr))
    assert parted.first_step == 1 and not parted.identical
    assert parted.stored_digest == base.digest_hex(1)[:PREFIX_HEX]
    # a shorter prefix still compares; a truncated chain agrees on its steps but is not identical
    short = DigestChain(tuple(p[:8] for p in chain.prefixes[:5]))
    cut = short.compare(DigestChain.from_run(base))
    assert cut.first_step is None and not cut.identical
    assert cut.describe() == "steps 0..4 agree, but the stored chain has 4 steps and the obtained one 12"
    result, lines = compare_run_to_chain(lr, path)
    assert result.first_step == 1
    assert lines[0].startswith("the trajectories part at step 1 (steps 0..0 agree; at step 1 stored ")
    assert any(line.startswith("config differs: the chain's config fingerprint is ") for line in lines)


def test_digest_chain_file_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(
        ArtifactError, match=r"bad.json: expected format 'flannel-repro/digest-chain/1', got 'something else'"
    ):
        DigestChain.read(bad)
    with pytest.raises(ArtifactError, match="found no such file"):
        DigestChain.read(tmp_path / "absent.json")


def test_cli_digests_writes_and_compares(runs, tmp_path, capsys):
    base, lr = str(runs["base"].path), str(runs["lr"].path)
    chain = tmp_path / "chain.json"
    assert cli.main(["digests", base, "-o", str(chain)]) == 0
    assert "13 digests (steps 0..12) of seed=42 cpu torch repeat=0" in capsys.readouterr().out
    assert cli.main(["digests", base, "--compare", str(chain)]) == 0
    assert "digest chains identical over all 13 entries (steps 0..12)" in capsys.readouterr().out
    assert cli.main(["digests", lr, "--compare", str(chain)]) == 1
    out = capsys.readouterr().out
    assert f"{lr} vs {chain}: the trajectories part at step 1 (steps 0..0 agree; " in out
    assert "environment: same as stored" in out
    assert cli.main(["digests", lr, "--compare", str(tmp_path / "absent.json")]) == 3
    assert "ArtifactError" in capsys.readouterr().err
    assert cli.main(["digests", base]) == 0
    assert json.loads(capsys.readouterr().out)["format"] == "flannel-repro/digest-chain/1"


# --- deterministic_mode restores every flag (in a subprocess: it changes process-global state) -----

_FLAGS_SCRIPT = """
import json, warnings
import torch
from flannel_repro.training.determinism import deterministic_mode

def flags():
    return {
        "algorithms": torch.are_deterministic_algorithms_enabled(),
        "warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
        "cudnn_deterministic": torch.backends.cudnn.deterministic,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "matmul_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_tf32": torch.backends.cudnn.allow_tf32,
    }

out = {}
# start from values that differ from what the block sets, so that "restored" differs from "reset"
torch.use_deterministic_algorithms(False)
torch.backends.cudnn.deterministic = False
torch.backends.cudnn.benchmark = True
torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True
out["before"] = flags()
with deterministic_mode(warn_only=True):
    out["inside"] = flags()
out["after"] = flags()
try:
    with deterministic_mode():
        out["inside_raising"] = flags()
        raise KeyError("boom")
except KeyError:
    out["after_raise"] = flags()
torch.use_deterministic_algorithms(True, warn_only=True)
out["before_det"] = flags()
with deterministic_mode(warn_only=False):
    out["inside_det"] = flags()
out["after_det"] = flags()
with deterministic_mode(enabled=False):
    out["disabled"] = flags()
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def flag_states() -> dict[str, dict[str, bool]]:
    done = subprocess.run([sys.executable, "-c", _FLAGS_SCRIPT], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_deterministic_mode_sets_the_flags_inside(flag_states):
    inside = flag_states["inside"]
    assert inside == {
        "algorithms": True,
        "warn_only": True,
        "cudnn_deterministic": True,
        "cudnn_benchmark": False,
        "matmul_tf32": False,
        "cudnn_tf32": False,
    }
    assert flag_states["inside_raising"]["warn_only"] is False and flag_states["inside_det"]["warn_only"] is False


def test_deterministic_mode_restores_every_flag(flag_states):
    assert flag_states["before"] != flag_states["inside"]
    assert flag_states["after"] == flag_states["before"]
    assert flag_states["after_det"] == flag_states["before_det"]  # warn_only=True restored, not just "on"


def test_deterministic_mode_restores_every_flag_when_the_body_raises(flag_states):
    assert flag_states["after_raise"] == flag_states["before"]


def test_deterministic_mode_disabled_changes_nothing(flag_states):
    assert flag_states["disabled"] == flag_states["after_det"]


def test_cuda_determinism_warnings(monkeypatch):
    from flannel_repro.training import determinism

    if not torch.cuda.is_available():
        assert determinism.cuda_determinism_warnings() == []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    (missing,) = determinism.cuda_determinism_warnings()
    assert "needs CUBLAS_WORKSPACE_CONFIG=:4096:8" in missing and "it is None" in missing
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    monkeypatch.setattr(determinism, "_CUBLAS_AT_IMPORT", None)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    assert determinism.cuda_determinism_warnings() == []  # set in time: CUDA not started yet
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    (late,) = determinism.cuda_determinism_warnings()
    assert "after CUDA was initialised" in late
