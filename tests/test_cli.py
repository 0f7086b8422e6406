"""The command line: bounds from held-out seeds, info, divergence, notebook export, errors."""

from __future__ import annotations

import tomllib

import pytest
import torch
from safetensors.torch import load_file

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
    return [train(tiny_config.replace(steps=3).with_train_seed(s), tmp_path / f"r{s}.safetensors").path
            for s in (42, 43, 44)]


def test_bounds_prints_a_loadable_table(tmp_path, capsys):
    cfg = tmp_path / "exp.toml"
    cfg.write_text(TOML)
    assert main(["bounds", "--config", str(cfg), "--artifacts", str(tmp_path / "art"), "--name", "tiny",
                 "--compare-seeds", "44-45", "--threads", "1"]) == 0
    table = tomllib.loads(capsys.readouterr().out)["tiny"]
    assert table["max_frobenius"] > 0 and 0 < table["order_share_min"] <= table["order_share_max"]
    assert "2 pairs (seed 42 vs 44..45), 3 steps" in table["measured"]


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
