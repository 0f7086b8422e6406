"""Settings that must be in place before a device starts are arranged by the plugin itself."""

from __future__ import annotations

import pytest

CHECK = """
import os

def test_env(trajectory):  # a session that trains runs (this test asks for the factory, trains nothing)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == {expected!r}
"""


def test_cublas_workspace_is_set_before_any_test_runs(pytester: pytest.Pytester, monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    pytester.makepyfile(CHECK.format(expected=":4096:8"))
    pytester.runpytest_subprocess("-p", "no:cacheprovider").assert_outcomes(passed=1)


def test_a_value_already_in_the_environment_wins(pytester: pytest.Pytester, monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    pytester.makepyfile(CHECK.format(expected=":16:8"))
    pytester.runpytest_subprocess("-p", "no:cacheprovider").assert_outcomes(passed=1)
