"""Divergence by source on a tiny config: the API, the claim helper and the CLI."""

from __future__ import annotations

import json

import pytest

from flannel_repro import cli
from flannel_repro.analysis.sources import assert_source_parts, checkpoints, divergence_by_source, source_configs
from flannel_repro.errors import ConfigError
from flannel_repro.runs.store import RunStore
from tests.conftest import TINY

BASE = TINY.replace(steps=3, threads=1).with_train_seed(42)


def test_each_source_changed_alone(tmp_path):
    store = RunStore(tmp_path / "artifacts")
    variants = source_configs(BASE, other_seed=43)
    assert variants["data_order"][0].model_seed == 42 and variants["data_order"][0].data_seed == 43
    assert variants["model_init"][0].model_seed == 43 and variants["model_init"][0].data_seed == 42
    assert variants["none"] == (BASE, 1)
    runs = {s: store.obtain(cfg, repeat=r).trajectory for s, (cfg, r) in variants.items()}
    table = divergence_by_source(store.obtain(BASE).trajectory, runs)
    assert [r.steps for r in table.rows][0] == [1, 3]
    assert table.row("data_order").first_step == 1 and table.row("model_init").first_step == 1
    assert table.row("none").first_step is None and table.row("none").frobenius == [0.0, 0.0]
    assert table.row("engine").first_step is None  # hf and torch are bitwise equal on CPU
    assert_source_parts(table, "data_order", parts=True, by_step=1)
    assert_source_parts(table, "none", parts=False)
    with pytest.raises(AssertionError, match="expected the runs never to part, they parted at step 1"):
        assert_source_parts(table, "data_order", parts=False)
    with pytest.raises(AssertionError, match="expected the runs to part, they never did"):
        assert_source_parts(table, "none", parts=True)
    text = "\n".join(table.lines())
    assert "data order (data_seed changed alone)" in text and "never" in text


def test_bad_requests_are_named():
    with pytest.raises(ConfigError, match="unknown"):
        source_configs(BASE, other_seed=43, sources=["weather"])
    with pytest.raises(ConfigError, match="must differ from the base's seeds"):
        source_configs(BASE, other_seed=42)
    assert checkpoints(1000) == [1, 10, 100, 1000] and checkpoints(20) == [1, 10, 20]


def test_the_command_line(tmp_path, capsys):
    cfg = tmp_path / "exp.toml"
    cfg.write_text('dataset = "tiny"\nvocab_size = 512\nsteps = 3\nbatch_size = 8\nseq_len = 32\n')
    assert (
        cli.main(
            [
                "sources",
                "--config",
                str(cfg),
                "--sources",
                "data_order,none",
                "--artifacts",
                str(tmp_path / "a"),
                "--json",
            ]
        )
        == 0
    )
    table = json.loads(capsys.readouterr().out)
    assert [r["source"] for r in table["rows"]] == ["data_order", "none"]
    assert table["rows"][1]["first_step"] is None
