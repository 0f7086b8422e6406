"""Options, ini keys and the config file: values reach the session; bad values are usage errors."""

from __future__ import annotations

import pytest

SHOW_CONFIG = """
def test_show(flannel_config):
    r = flannel_config.run
    print("CFG", r.steps, r.engine, r.label_mode, flannel_config.train_seeds, r.dataset)
"""


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--flannel-steps", "0"], "--flannel-steps (ini: flannel_steps) accepts an integer >= 1; got '0'."),
        (["--flannel-steps", "ten"], "--flannel-steps (ini: flannel_steps) accepts an integer >= 1; got 'ten'."),
        (["--flannel-engine", "jax"], "--flannel-engine (ini: flannel_engine) accepts torch or hf; got 'jax'."),
        (["--flannel-label-mode", "prev"], "accepts next_token or notebook; got 'prev'"),
        (["--flannel-seeds", "50-42"], "--flannel-seeds (ini: flannel_seeds) accepts a range '42-51'"),
        (["--flannel-seeds", "42,47"], "accepts consecutive seeds"),
        (
            ["--flannel-runs", "3", "--flannel-seeds", "42-43"],
            "--flannel-runs=3 disagrees with --flannel-seeds='42-43'",
        ),
        (["--flannel-devices", "tpu"], "--flannel-devices (ini: flannel_devices) accepts a comma-separated list"),
        (
            ["--flannel-devices", "cuda:x"],
            "accepts a comma-separated list of distinct devices: cpu, cuda, cuda:N, mps; got 'cuda:x'.",
        ),
        (
            ["--flannel-devices", "cpu:1"],
            "accepts a comma-separated list of distinct devices: cpu, cuda, cuda:N, mps; got 'cpu:1'.",
        ),
        (
            ["--flannel-devices", "cpu,cpu"],
            "accepts a comma-separated list of distinct devices: cpu, cuda, cuda:N, mps; got 'cpu,cpu'.",
        ),
        (
            ["--flannel-preset", "huge"],
            "--flannel-preset (ini: flannel_preset) accepts default or ci or full or notebook; got 'huge'.",
        ),
        (["--flannel-config", "missing.toml"], "--flannel-config: config file"),
        (
            ["--flannel-tokenizer", "tok.json"],
            "--flannel-tokenizer (ini: flannel_tokenizer) accepts the path of an existing file",
        ),
        (
            ["--flannel-threads", "-1"],
            "--flannel-threads (ini: flannel_threads) accepts an integer in 1..256; got '-1'.",
        ),
        (
            ["--flannel-threads", "100000"],
            "--flannel-threads (ini: flannel_threads) accepts an integer in 1..256; got '100000'.",
        ),
        (["--flannel-progress", "nan"], "--flannel-progress (ini: flannel_progress) accepts a number of seconds >= 0"),
        (["--flannel-progress", "inf"], "--flannel-progress (ini: flannel_progress) accepts a number of seconds >= 0"),
        (
            ["--flannel-seeds", "9223372036854775808"],
            "--flannel-seeds (ini: flannel_seeds) accepts a range '42-51' or a list",
        ),
        (
            ["--flannel-seeds", "42-4200000000"],
            "--flannel-seeds (ini: flannel_seeds) accepts a range '42-51' or a list",
        ),
        (["--flannel-progress", "soon"], "--flannel-progress (ini: flannel_progress) accepts a number of seconds >= 0"),
        (
            ["--flannel-derive-bounds", "46-x"],
            "--flannel-derive-bounds (ini: flannel_derive_bounds) accepts 'none', 'auto', or held-out seeds",
        ),
    ],
)
def test_bad_option_is_a_usage_error(pytester, args, needle):
    pytester.makepyfile(SHOW_CONFIG)
    result = pytester.runpytest(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert needle in result.stderr.str()


def test_tokenizer_without_corpus(pytester):
    pytester.makefile(".json", tok="{}")
    pytester.makepyfile(SHOW_CONFIG)
    result = pytester.runpytest("--flannel-tokenizer", "tok.json")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "--flannel-tokenizer and --flannel-corpus go together" in result.stderr.str()


def test_defaults_are_the_ci_scale(pytester):
    pytester.makepyfile(SHOW_CONFIG)
    result = pytester.runpytest("-s")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*CFG 20 torch next_token (42, 43, 44, 45) default"])


def test_command_line_overrides(pytester):
    pytester.makepyfile(SHOW_CONFIG)
    result = pytester.runpytest(
        "-s",
        "--flannel-steps",
        "7",
        "--flannel-engine",
        "hf",
        "--flannel-seeds",
        "10-12",
        "--flannel-label-mode",
        "notebook",
    )
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*CFG 7 hf notebook (10, 11, 12) default"])


def test_ini_keys_in_pyproject_and_cli_wins(pytester):
    pytester.makepyprojecttoml(
        '[tool.pytest.ini_options]\nflannel_steps = "9"\nflannel_runs = "2"\nflannel_engine = "hf"\n'
    )
    pytester.makepyfile(SHOW_CONFIG)
    result = pytester.runpytest("-s")
    result.stdout.fnmatch_lines(["*CFG 9 hf next_token (42, 43) default"])
    result = pytester.runpytest("-s", "--flannel-steps", "3")
    result.stdout.fnmatch_lines(["*CFG 3 hf next_token (42, 43) default"])


def test_config_file_and_preset(tiny_experiment):
    tiny_experiment.makepyfile(SHOW_CONFIG)
    result = tiny_experiment.runpytest("-s")
    result.stdout.fnmatch_lines(["*CFG 4 torch next_token (42, 43) tiny"])
    result = tiny_experiment.runpytest("-s", "-o", "flannel_config=", "--flannel-preset", "full")
    result.stdout.fnmatch_lines(["*CFG 1000 torch next_token (42, 43, 44, 45, 46, 47, 48, 49, 50, 51) default"])


def test_bad_config_file_names_the_key(pytester):
    pytester.makefile(".toml", bad="stepz = 3\n")
    pytester.makepyfile(SHOW_CONFIG)
    result = pytester.runpytest("--flannel-config", "bad.toml")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "unknown key(s) 'stepz' (did you mean 'steps'?)" in result.stderr.str()


def test_help_lists_the_group_and_does_not_import_torch(pytester):
    result = pytester.runpytest_subprocess("--help", "-p", "no:xdist")
    result.stdout.fnmatch_lines(["flannel-repro: training-determinism claims:", "*--flannel-config=CONFIG*"])
    check = pytester.run(
        __import__("sys").executable,
        "-c",
        "import sys, flannel_repro.plugin.hooks; print('TORCH', 'torch' in sys.modules)",
    )
    check.stdout.fnmatch_lines(["TORCH False"])


def test_artifacts_path_under_a_file_is_a_usage_error_at_start(pytester):
    pytester.makepyfile(SHOW_CONFIG)
    pytester.makefile(".txt", afile="not a directory")
    result = pytester.runpytest("--flannel-artifacts=afile.txt/runs")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert (
        "--flannel-artifacts (ini: flannel_artifacts) accepts a directory (it is created if missing); this path "
        "lies under a file"
    ) in result.stderr.str()


def test_an_artifacts_directory_that_cannot_be_written_is_a_usage_error_at_start(pytester):
    """/sys refuses new entries even to root (the test machine runs as root, so a chmod would prove nothing)."""
    pytester.makepyfile(SHOW_CONFIG)
    result = pytester.runpytest("--flannel-artifacts=/sys/flannel-artifacts")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert (
        "--flannel-artifacts (ini: flannel_artifacts) accepts a directory run artifacts can be written to; /sys, "
        "where it would be created, is not writable (Permission denied)"
    ) in result.stderr.str()
