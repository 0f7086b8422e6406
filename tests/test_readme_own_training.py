"""README, "Your own training": its three snippets run as written (the loop, the Trainer, the engine)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path


README = Path(__file__).resolve().parents[1] / "README.md"


def snippet(name: str) -> str:
    """The fenced python block right after `<!-- own-training:NAME -->` in the README."""
    match = re.search(rf"<!-- own-training:{name} -->\n```python\n(.*?)\n```", README.read_text(encoding="utf-8"), re.S)
    assert match, f"README has no snippet own-training:{name}"
    return match.group(1) + "\n"


def run_python(code: str, cwd: Path) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_plain_loop_snippet(tmp_path):
    out = run_python(snippet("loop"), tmp_path)
    steps, shape, loss = re.fullmatch(r"(\d+) (torch\.Size\(\[16, 8\]\)) (\S+)\n", out).groups()
    assert steps == "50" and float(loss) > 0
    from flannel_repro import Trajectory

    run = Trajectory(tmp_path / "my-run.safetensors")
    assert run.verify() == []  # digests of every step, checksums, layout
    assert run.config.params == {"lr": 0.01} and run.config.engine == "custom"
    starts = run.batch_starts  # (S, B): the recorded data order
    assert tuple(starts.shape) == (50, 32) and starts[0, 0].item() == 32


def test_trainer_snippet(tmp_path):
    out = run_python(snippet("trainer"), tmp_path)
    from flannel_repro import Trajectory

    run = Trajectory(tmp_path / "trainer-run.safetensors")
    losses = run.losses
    assert run.steps == 5 and tuple(run.W_at(5).shape) == (100, 32)
    assert str(losses[0].item()) == "nan" and bool((losses[1:] > 0).all()), out
    assert run.verify() == []
    assert not (run.W_at(0) == run.W_at(5)).all()  # the embedding moved


def test_engine_snippets(pytester, monkeypatch):
    for name in ("PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT", "PYTEST_XDIST_TESTRUNUID"):
        monkeypatch.delenv(name, raising=False)  # the inner session is not a worker of this one
    pytester.makeconftest(snippet("engine-conftest").replace("# conftest.py\n", ""))
    pytester.makepyfile(test_tiny=snippet("engine-test").replace("# test_tiny.py\n", ""))
    first = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--snapshot-update", "--flannel-threads=1")
    first.assert_outcomes(passed=4)
    again = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-n", "2", "--flannel-threads=1")
    again.assert_outcomes(passed=4)
    again.stdout.fnmatch_lines(["*1 snapshot passed*"])
