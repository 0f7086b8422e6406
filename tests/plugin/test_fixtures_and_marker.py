"""Fixtures (documented, correct on the embedded data), devices, and the override marker."""

from __future__ import annotations

import re

import pytest

from tests.plugin.conftest import TINY_TOML


def test_fixtures_are_documented(pytester):
    result = pytester.runpytest("--fixtures")
    for name in (
        "flannel_config",
        "tokenizer",
        "corpus",
        "token_mask",
        "shared_init_W",
        "device",
        "trajectory",
        "train_seed",
    ):
        result.stdout.fnmatch_lines([f"{name}*"])
    result.stdout.fnmatch_lines(
        ["*Factory: `trajectory(train_seed=None, [*], device=None, repeat=0, resume_at=None, [*][*]overrides)*"]
    )


def test_data_fixtures_on_embedded_data(tiny_experiment):
    tiny_experiment.makepyfile("""
        import torch

        def test_data(tokenizer, corpus, token_mask, shared_init_W, flannel_config):
            assert tokenizer.get_vocab_size() == 512
            assert corpus.n_tokens == 40000
            assert token_mask.n_live + token_mask.n_dead == 512
            assert shared_init_W.shape == (512, 64) and shared_init_W.dtype == torch.bfloat16
            # the notebook's recipe, written out: global seed, randn in float32, scale, cast to bf16
            torch.manual_seed(flannel_config.run.init_seed)
            notebook = (torch.randn(512, 64, dtype=torch.float32) * 0.02).to(torch.bfloat16)
            assert torch.equal(shared_init_W, notebook)
    """)
    tiny_experiment.runpytest().assert_outcomes(passed=1)


def test_user_data_options(tiny_experiment):
    from flannel_repro.data.embedded import embedded_paths

    p = embedded_paths("tiny")
    tiny_experiment.makepyfile("""
        def test_user(corpus, flannel_config):
            assert flannel_config.run.corpus_path.endswith("corpus.txt")
            assert corpus.files.origin == "user"
    """)
    # "--opt=value": pytest takes a separate existing-path argument into account when it looks for the rootdir
    result = tiny_experiment.runpytest(
        f"--flannel-tokenizer={p.tokenizer}", f"--flannel-corpus={p.corpus}", f"--flannel-token-mask={p.token_mask}"
    )
    result.assert_outcomes(passed=1)


def test_device_parametrization_default_and_requested_absent(tiny_experiment):
    tiny_experiment.makepyfile("""
        def test_dev(device):
            assert device == "cpu"
    """)
    result = tiny_experiment.runpytest("-v")
    result.stdout.fnmatch_lines(["*test_dev[[]cpu[]] PASSED*"])
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA present: the absent-device skip cannot be shown here")
    result = tiny_experiment.runpytest("-rs", "--flannel-devices", "cpu,cuda")
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(["*device 'cuda' requested but absent: CUDA is not available*"])


def test_requested_devices_are_what_flannel_config_says(tiny_experiment):
    tiny_experiment.makepyfile("""
        import json, os

        def test_devices(flannel_config):
            print("DEVICES", json.dumps(flannel_config.devices))
    """)
    default = tiny_experiment.runpytest("-s")
    default.stdout.fnmatch_lines(["*DEVICES null*"])  # none requested: cpu, plus cuda and mps where present
    option = tiny_experiment.runpytest("-s", "--flannel-devices=cpu")
    option.stdout.fnmatch_lines(['*DEVICES [[]"cpu"[]]*'])
    # A config file that asks for cpu alone is a request like the option (it used to mean "cpu plus GPUs").
    tiny_experiment.makefile(".toml", flannel=TINY_TOML + 'devices = ["cpu"]\n')
    from_file = tiny_experiment.runpytest("-s")
    from_file.stdout.fnmatch_lines(['*DEVICES [[]"cpu"[]]*'])


def test_marker_overrides_config_for_one_test(tiny_experiment):
    tiny_experiment.makepyfile("""
        import pytest

        @pytest.mark.flannel(steps=2)
        def test_short(trajectory):
            assert trajectory(42).steps == 2

        def test_default(trajectory):
            assert trajectory(42).steps == 4

        def test_call_overrides(trajectory):
            t = trajectory(model_seed=1, data_seed=2, lr=2e-3)
            assert (t.config.model_seed, t.config.data_seed, t.config.lr) == (1, 2, 2e-3)
    """)
    tiny_experiment.runpytest().assert_outcomes(passed=3)


def test_bad_marker_is_a_usage_error(tiny_experiment):
    tiny_experiment.makepyfile("""
        import pytest

        @pytest.mark.flannel(stpes=2)
        def test_bad(trajectory):
            pass
    """)
    result = tiny_experiment.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert (
        "test_bad: @pytest.mark.flannel: RunConfig: unknown key(s) 'stpes' (did you mean 'steps'?)"
        in result.stderr.str()
    )


def test_progress_lines_while_training(tiny_experiment):
    """Without xdist the training loop writes progress lines through pytest's terminal (capture suspended)."""
    tiny_experiment.makepyfile("""
        def test_train(trajectory):
            assert trajectory(42).steps == 4
    """)
    result = tiny_experiment.runpytest("--flannel-progress=0.000001")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        [
            "flannel: run 1 of >= 2: training seed42-cpu-torch-r0-* ...",
            "flannel: run 1 of >= 2 (0 done) seed42-cpu-torch-r0-*: step 4/4 (100%), loss *, * steps/s, ETA 0s",
        ]
    )


def test_progress_lines_under_xdist(tiny_experiment):
    """Under xdist the controller prints the workers' progress, numbering the runs and giving an ETA."""
    tiny_experiment.makepyfile("""
        import pytest

        @pytest.mark.flannel(steps=20)
        @pytest.mark.parametrize("seed", [42, 43])
        def test_train(trajectory, seed):
            assert trajectory(seed).steps == 20
    """)
    # 20 steps print the same lines as 200 did; a short interval so that a fast machine still shows some
    result = tiny_experiment.runpytest_subprocess("-n", "2", "--flannel-progress=0.02")
    result.assert_outcomes(passed=2)
    lines = [line for line in result.stdout.lines if line.startswith("flannel: run ")]
    assert lines, result.stdout.str()
    for line in lines:
        assert re.fullmatch(
            r"flannel: run [12] of >= 2 \([012] done\) seed4[23]-cpu-torch-r0-\w+: step \d+/20 "
            r"\(\d+%\), loss [\d.]+, [\d.]+ steps/s, ETA (\d+s|\d+m\d\ds|\?)",
            line,
        ), line
