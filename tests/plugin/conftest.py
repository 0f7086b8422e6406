"""Helpers for testing the plugin with pytester.

torch, transformers and our heavy modules are imported here, before any in-process
`pytester.runpytest`: pytester snapshots sys.modules and restores it after each inner run, and
neither torch nor transformers' lazy modules survive being imported a second time in one process.
"""

from __future__ import annotations

import pytest
import torch  # noqa: F401  (see module docstring)
from transformers import GPT2LMHeadModel, Trainer  # noqa: F401

import flannel_repro.analysis.assertions
import flannel_repro.training.harness
import flannel_repro.runs.store  # noqa: F401

# A tiny experiment: 512-token vocabulary, 4 steps, 2 seeds. One run trains in about a second.
TINY_TOML = """
dataset = "tiny"
vocab_size = 512
steps = 4
batch_size = 8
seq_len = 32

[experiment]
n_runs = 2
base_train_seed = 42
"""


def cpu_class(threads: int = 1) -> str:
    """This process's numerics class on CPU at `threads` (inner runs, and their subprocesses, which
    inherit this process's oneDNN/MKL environment, get the same)."""
    from flannel_repro.training.numerics import numerics_info

    return numerics_info("cpu", threads=threads, deterministic=False)["class"]


@pytest.fixture(autouse=True)
def _no_outer_xdist_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inner pytest runs must not see the outer run's xdist variables.

    Under `pytest -n auto` this test process is an xdist worker with PYTEST_XDIST_WORKER set; an inner
    run (in-process, or a subprocess inheriting os.environ) would then believe it is a worker too:
    syrupy prints no report and the plugin divides the cores by the outer worker count.
    """
    for name in ("PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT", "PYTEST_XDIST_TESTRUNUID"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(autouse=True)
def _all_cpus_for_inner_runs(all_cpus):
    """Inner runs and their subprocesses get the whole machine (tests/conftest.py's all_cpus)."""
    yield


@pytest.fixture
def tiny_experiment(pytester: pytest.Pytester):
    """Writes flannel.toml (the tiny experiment) and points the plugin at it through pytest.ini."""
    pytester.makefile(".toml", flannel=TINY_TOML)
    pytester.makeini("[pytest]\nflannel_config = flannel.toml\nflannel_progress = 0\n")
    return pytester
