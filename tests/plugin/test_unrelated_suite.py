"""Installed next to anything: a suite that does not use flannel-repro is collected and run exactly as
without the plugin, even when it has fixtures of the same names (device, tokenizer, corpus,
train_seed, the last one parametrized), and its environment is left alone."""

from __future__ import annotations

import json

import pytest

CONFTEST = """
import pytest

@pytest.fixture
def device():
    return "their-device"

@pytest.fixture
def tokenizer():
    return "their-tokenizer"

@pytest.fixture
def corpus():
    return ["their", "corpus"]

@pytest.fixture(params=[1, 2, 3])
def train_seed(request):
    return request.param
"""

TESTS = """
import json, os

WATCHED = ("CUBLAS_WORKSPACE_CONFIG", "ONEDNN_MAX_CPU_ISA", "MKL_CBWR")

def test_uses_device(device):
    assert device == "their-device"

def test_uses_data(tokenizer, corpus):
    assert tokenizer == "their-tokenizer" and corpus == ["their", "corpus"]

def test_uses_their_seed(train_seed, device):
    assert train_seed in (1, 2, 3)

def test_environment_untouched():
    seen = {k: os.environ.get(k) for k in WATCHED}
    assert seen == json.loads(os.environ["EXPECTED_ENV"]), seen
"""

MODES = {"no-xdist": [], "n2": ["-p", "xdist", "-n", "2"]}


def _ids(result: pytest.RunResult) -> list[str]:
    return sorted(line.strip() for line in result.stdout.lines if "::" in line and not line.startswith(" "))


@pytest.mark.parametrize("mode", list(MODES))
def test_unrelated_suite_is_collected_and_run_identically(pytester: pytest.Pytester, monkeypatch, mode):
    for key in ("CUBLAS_WORKSPACE_CONFIG", "ONEDNN_MAX_CPU_ISA", "MKL_CBWR"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv(
        "EXPECTED_ENV", json.dumps({"CUBLAS_WORKSPACE_CONFIG": None, "ONEDNN_MAX_CPU_ISA": None, "MKL_CBWR": None})
    )
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_theirs=TESTS)
    without = pytester.runpytest_subprocess("-p", "no:flannel_repro", "--collect-only", "-q")
    with_plugin = pytester.runpytest_subprocess("--collect-only", "-q")
    assert _ids(without) == _ids(with_plugin)
    assert len(_ids(with_plugin)) == 6  # 3 plain tests + their own 3 seeds, no [cpu] and no [seed42]

    ran = pytester.runpytest_subprocess(*MODES[mode], "-p", "no:cacheprovider")
    ran.assert_outcomes(passed=6)
    assert "= flannel-repro =" not in ran.stdout.str()  # no terminal summary section either
