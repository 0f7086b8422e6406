"""The command line: bounds from held-out seeds, info, divergence, notebook export, errors."""

from __future__ import annotations

import json
import tomllib

import pytest
import torch
from safetensors.torch import load_file

from flannel_repro import cli
from flannel_repro.cli import main
from flannel_repro.training.harness import train

TOML = """
dataset = "tiny"
vocab_size = 512
steps = 3
batch_size = 8
seq_len = 32
[experiment]
n_runs = 2
"""


@pytest.fixture
def tiny_runs(tmp_path, tiny_config):
    return [
        train(tiny_config.replace(steps=3).with_train_seed(s), tmp_path / f"r{s}.safetensors").path
        for s in (42, 43, 44)
    ]


def test_bounds_prints_a_loadable_table(tmp_path, capsys):
    cfg = tmp_path / "exp.toml"
    cfg.write_text(TOML)
    assert (
        main(
            [
                "bounds",
                "--config",
                str(cfg),
                "--artifacts",
                str(tmp_path / "art"),
                "--name",
                "tiny",
                "--compare-seeds",
                "44-46",
                "--threads",
                "1",
            ]
        )
        == 0
    )
    table = tomllib.loads(capsys.readouterr().out)["tiny"]
    assert table["max_frobenius"] > 0 and 0 <= table["order_share_min"] <= table["order_share_max"]
    assert table["n"] == 3 and table["false_alarm"] > 0
    assert "3 pairs (seed 42 vs 44..46), 3 steps" in table["measured"], table["measured"]


def test_bounds_discard_compared_keeps_only_the_base_run(tmp_path, capsys):
    """--discard-compared deletes each held-out run once measured, and the bound is the same as without it."""
    cfg = tmp_path / "exp.toml"
    cfg.write_text(TOML)
    common = ["bounds", "--config", str(cfg), "--compare-seeds", "44-46", "--threads", "1", "--json"]
    assert main([*common, "--artifacts", str(tmp_path / "keep")]) == 0
    kept = json.loads(capsys.readouterr().out)
    assert main([*common, "--artifacts", str(tmp_path / "lean"), "--discard-compared"]) == 0
    lean = json.loads(capsys.readouterr().out)
    assert lean == kept
    assert len(list((tmp_path / "keep").glob("*.safetensors"))) == 7  # the base run, then 2 per held-out seed
    left = sorted(p.name for p in (tmp_path / "lean").glob("*.safetensors*"))
    assert len(left) == 2 and left[0].startswith("seed42-") and left[1] == left[0] + ".lock", left


def test_info_and_divergence(tiny_runs, capsys):
    assert main(["info", str(tiny_runs[0])]) == 0
    out = capsys.readouterr().out
    assert "W entries changed" in out and "seed=42" in out
    assert main(["divergence", *map(str, tiny_runs)]) == 0
    assert "frobenius" in capsys.readouterr().out


def test_export_notebook(tiny_runs, tmp_path, capsys):
    out = tmp_path / "nb.safetensors"
    assert main(["export-notebook", *map(str, tiny_runs), "-o", str(out)]) == 0
    loaded = load_file(str(out))
    assert loaded["W"].shape == (3, 4, 512, 64) and loaded["W"].dtype == torch.bfloat16
    assert int(loaded["n_runs"]) == 3 and int(loaded["base_train_seed"]) == 42


def test_errors_are_reported_not_raised(tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 16)
    assert main(["info", str(bad)]) == 3
    assert "ArtifactError" in capsys.readouterr().err


def test_exit_codes_are_the_documented_ones_and_never_a_traceback(tiny_runs, tmp_path, capsys, monkeypatch):
    from flannel_repro import cli

    with pytest.raises(SystemExit) as usage:
        main(["numerics", "--threads", "100000"])
    assert usage.value.code == cli.EXIT_USAGE == 2
    assert "expected an integer in 1..256, got 100000" in capsys.readouterr().err
    assert main(["info", str(tmp_path / "absent.safetensors")]) == cli.EXIT_INPUT == 3
    err = capsys.readouterr().err
    assert "absent.safetensors" in err and "Traceback" not in err
    assert main(["verify", *map(str, tiny_runs)]) == cli.EXIT_OK
    assert "3 of 3 verified" in capsys.readouterr().out

    def broken(args):  # a bug in a command: one line and exit 4, the traceback only on request
        raise RuntimeError("boom")

    monkeypatch.setattr(cli, "cmd_info", broken)
    assert main(["info", str(tiny_runs[0])]) == cli.EXIT_INTERNAL == 4
    err = capsys.readouterr().err
    assert "internal error: RuntimeError: boom" in err and "FLANNEL_REPRO_TRACEBACK=1" in err
    monkeypatch.setenv("FLANNEL_REPRO_TRACEBACK", "1")
    with pytest.raises(RuntimeError, match="boom"):
        main(["info", str(tiny_runs[0])])


def test_json_output_of_every_command_that_prints_results(tiny_runs, tmp_path, capsys, tiny_config):
    import json

    TINY_CLI = tiny_config.replace(steps=3)

    def doc(argv, code=0):
        assert main(argv) == code, argv
        return json.loads(capsys.readouterr().out)

    info = doc(["info", "--json", str(tiny_runs[0])])
    assert info["config"]["steps"] == 3 and [r["step"] for r in info["steps"]] == [1, 2, 3]
    assert 0 <= info["steps"][0]["W_changed_fraction"] <= 1 and len(info["digest_last"]) == 64
    div = doc(["divergence", "--json", *map(str, tiny_runs)])
    assert div["n_pairs"] == 3 and div["final_frobenius_max"] > 0 and div["first_step_min"] == 1
    ver = doc(["verify", "--json", *map(str, tiny_runs)])
    assert ver["verified"] == ver["total"] == 3 and all(r["ok"] for r in ver["runs"])
    num = doc(["numerics", "--json"])
    assert num["class"].startswith("cpu-") and num["threads"] == 1
    pr = doc(["prune", "--json", "--dry-run", "--artifacts", str(tmp_path)])
    assert pr["dry_run"] is True and isinstance(pr["files"], list)
    chain = tmp_path / "chain.json"
    assert main(["digests", str(tiny_runs[0]), "-o", str(chain)]) == 0
    capsys.readouterr()
    cmp = doc(["digests", "--json", str(tiny_runs[1]), "--compare", str(chain)], code=1)
    assert cmp["identical"] is False and cmp["first_step"] == 1 and cmp["report"]
    order = train(TINY_CLI.with_train_seed(42).replace(data_seed=43), tmp_path / "order.safetensors").path
    why = doc(["why", "--json", str(tiny_runs[0]), str(order)], code=1)
    assert why["kind"] == "data" and why["identical"] is False and "batches differ" in why["detail"]


def test_every_command_that_prints_results_takes_json(tiny_runs, tmp_path, capsys):
    """--json is on every subcommand (bounds, export-notebook, oplog, noise and report included)."""
    import argparse
    import json

    from flannel_repro import cli

    captured: dict[str, argparse.ArgumentParser] = {}
    real = argparse._SubParsersAction.add_parser

    def spy(self, name, **kwargs):
        captured[name] = real(self, name, **kwargs)
        return captured[name]

    argparse._SubParsersAction.add_parser = spy
    try:
        with pytest.raises(SystemExit):
            cli.main(["--help"])
    finally:
        argparse._SubParsersAction.add_parser = real
    capsys.readouterr()
    assert len(captured) >= 13 and "report" in captured, sorted(captured)
    for name, sub in captured.items():
        assert "--json" in sub.format_help(), name
    out = tmp_path / "nb.safetensors"
    assert main(["export-notebook", "--json", *map(str, tiny_runs[:2]), "-o", str(out)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["output"] == str(out) and doc["bytes"] == out.stat().st_size


def test_an_output_never_overwrites_an_input_or_a_run_artifact(tiny_runs, tmp_path, capsys):
    """Every command that writes a file checks its output first: never an input (also through a link), never
    a run artifact, and a file of another kind only with --force; exit 2 naming the path."""
    import os

    r42, r43 = map(str, tiny_runs[:2])
    before = {p: open(p, "rb").read() for p in (r42, r43)}
    link = tmp_path / "link.safetensors"
    os.symlink(r42, link)
    cfg = tmp_path / "exp.toml"
    cfg.write_text(TOML)
    for argv in (
        ["export-notebook", r42, "-o", r42],
        ["export-notebook", r42, "-o", str(link)],
        ["export-notebook", r42, "-o", r43, "--force"],
        ["digests", r42, "-o", r42],
        ["digests", r42, "-o", r43],
        ["oplog", r42, "--step", "1", "-o", r42],
        ["noise", "--config", str(cfg), "-o", str(cfg)],
        ["report", str(tmp_path), "-o", str(tmp_path)],
        ["report", r42, "-o", r42],
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "UsageError" in err and argv[argv.index("-o") + 1] in err and "Traceback" not in err, err
    assert {p: open(p, "rb").read() for p in (r42, r43)} == before
    assert cfg.read_text() == TOML

    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    assert main(["digests", r42, "-o", str(notes)]) == 2
    assert "a file of another kind; pass --force" in capsys.readouterr().err and notes.read_text() == "mine"
    assert main(["digests", r42, "-o", str(notes), "--force"]) == 0
    assert main(["digests", r42, "-o", str(notes)]) == 0  # now a digest chain: replaced without --force


def test_usage_errors_name_the_option_and_the_value(tiny_runs, capsys):
    assert main(["noise", "--seeds", "5-3"]) == 2
    err = capsys.readouterr().err
    assert "--seeds" in err and "'5-3'" in err and "internal error" not in err
    assert main(["why", str(tiny_runs[0]), str(tiny_runs[1]), "--step", "99"]) == 3
    err = capsys.readouterr().err
    assert "step 99: expected a step in 1..3" in err and "internal error" not in err


def test_info_and_oplog_on_a_run_of_your_own_training(tmp_path, capsys):
    """A run recorded with TrajectoryRecorder has an EngineRunConfig: `info` shows its engine (it has no label
    mode), and `oplog` (a replay of the notebook's model) refuses it by name instead of an internal error."""
    import torch

    from flannel_repro import TrajectoryRecorder

    w = torch.nn.Parameter(torch.ones(4, 3))
    opt = torch.optim.SGD([w], lr=0.1)
    path = tmp_path / "own.safetensors"
    with TrajectoryRecorder(path, {"w": w}, steps=2, config={"lr": 0.1}) as rec:
        for _ in range(2):
            opt.zero_grad()
            (w**2).sum().backward()
            opt.step()
            rec.step(loss=0.5)
    assert cli.main(["info", str(path)]) == 0
    assert "engine custom" in capsys.readouterr().out
    code = cli.main(["oplog", str(path), "--step", "1", "-o", str(tmp_path / "log.json")])
    err = capsys.readouterr().err
    assert code == cli.EXIT_INPUT and "engine 'custom' (your own training) cannot be replayed" in err, err
    assert not (tmp_path / "log.json").exists()
