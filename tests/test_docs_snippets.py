"""The user guide's code runs as written: README.md and docs/*.md.

Every python block there is marked on the line before it: `<!-- run:NAME -->` (a test below runs it as
written) or `<!-- fragment -->` (not a program on its own). A block of another language marked `run:` is run
too (the config file). An unmarked python block, a run name no test here runs, or a name whose block is gone
fails `test_every_python_block_is_run_or_a_fragment`.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")))
FENCE = re.compile(r"^```(\w*)\n(.*?)^```[ \t]*$", re.S | re.M)
MARK = re.compile(r"<!-- (run:[\w-]+|fragment)\b[^>]*-->[ \t]*$")

# Every run: name in the guide, and the test that runs it.
RUN = {
    "readme-claims": "test_claim_and_gate_snippets",
    "claims": "test_claim_and_gate_snippets",
    "gate": "test_claim_and_gate_snippets",
    "own-training-loop": "test_plain_loop_snippet",
    "own-training-trainer": "test_trainer_snippet",
    "engine-conftest": "test_engine_snippets",
    "engine-test": "test_engine_snippets",
    "config-toml": "test_config_file_snippet",
}

# The experiment the claim snippets run at, given as options around them: the tiny embedded data set.
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


def blocks() -> list[tuple[str, str, str | None, str]]:
    """(page, language, mark, code) of every fenced block of the guide."""
    found = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for m in FENCE.finditer(text):
            before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
            mark = MARK.search(before)
            found.append((page.relative_to(ROOT).as_posix(), m.group(1), mark.group(1) if mark else None, m.group(2)))
    return found


def snippet(name: str) -> str:
    """The block marked `<!-- run:NAME -->` (exactly one in the guide)."""
    code = [c for _, _, mark, c in blocks() if mark == f"run:{name}"]
    assert len(code) == 1, f"the guide has {len(code)} blocks marked run:{name}, expected 1"
    return code[0]


def run_python(code: str, cwd: Path) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _no_outer_xdist(monkeypatch) -> None:
    for name in ("PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT", "PYTEST_XDIST_TESTRUNUID"):
        monkeypatch.delenv(name, raising=False)  # the inner session is not a worker of this one


def test_every_python_block_is_run_or_a_fragment():
    found = blocks()
    assert len(found) > 20, "no fenced blocks found: has the guide moved?"
    unmarked = [
        f"{page}: {code.splitlines()[0] if code else ''}"
        for page, lang, mark, code in found
        if lang == "python" and mark is None
    ]
    assert not unmarked, "python blocks marked neither <!-- run:NAME --> nor <!-- fragment -->:\n  " + "\n  ".join(
        unmarked
    )
    names = [mark.removeprefix("run:") for _, _, mark, _ in found if mark and mark.startswith("run:")]
    assert len(names) == len(set(names)), f"a run name is used twice: {sorted(names)}"
    assert set(names) == set(RUN), (
        f"run blocks with no test here: {sorted(set(names) - set(RUN))}; "
        f"tests whose block is gone: {sorted(set(RUN) - set(names))}"
    )


def test_plain_loop_snippet(tmp_path):
    out = run_python(snippet("own-training-loop"), tmp_path)
    steps, shape, loss = re.fullmatch(r"(\d+) (torch\.Size\(\[16, 8\]\)) (\S+)\n", out).groups()
    assert steps == "50" and float(loss) > 0
    from flannel_repro import Trajectory

    run = Trajectory(tmp_path / "my-run.safetensors")
    assert run.verify() == []  # digests of every step, checksums, layout
    assert run.config.params == {"lr": 0.01} and run.config.engine == "custom"
    starts = run.batch_starts  # (S, B): the recorded data order
    assert tuple(starts.shape) == (50, 32) and starts[0, 0].item() == 32


def test_trainer_snippet(tmp_path):
    out = run_python(snippet("own-training-trainer"), tmp_path)
    from flannel_repro import Trajectory

    run = Trajectory(tmp_path / "trainer-run.safetensors")
    losses = run.losses
    assert run.steps == 5 and tuple(run.W_at(5).shape) == (100, 32)
    assert str(losses[0].item()) == "nan" and bool((losses[1:] > 0).all()), out
    assert run.verify() == []
    assert not (run.W_at(0) == run.W_at(5)).all()  # the embedding moved


def test_engine_snippets(pytester, monkeypatch):
    _no_outer_xdist(monkeypatch)
    pytester.makeconftest(snippet("engine-conftest").replace("# conftest.py\n", ""))
    pytester.makepyfile(test_tiny=snippet("engine-test").replace("# test_tiny.py\n", ""))
    first = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--snapshot-update", "--flannel-threads=1")
    first.assert_outcomes(passed=4)
    again = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-n", "2", "--flannel-threads=1")
    again.assert_outcomes(passed=4)
    again.stdout.fnmatch_lines(["*1 snapshot passed*"])


def test_claim_and_gate_snippets(pytester, monkeypatch):
    """The claim files of the README and of "Writing claims", and the gate's, on the tiny data set: the snapshots
    are written once, then compared in a second session under xdist."""
    _no_outer_xdist(monkeypatch)
    pytester.makefile(".toml", flannel=TINY_TOML)
    pytester.makepyfile(
        test_readme_claims=snippet("readme-claims").replace("# test_claims.py\n", ""),
        test_claims=snippet("claims").replace("# test_claims.py\n", ""),
        test_gate=snippet("gate").replace("# test_gate.py\n", ""),
    )
    options = (
        "-p",
        "no:cacheprovider",
        "--flannel-config=flannel.toml",
        "--flannel-threads=1",
        "--flannel-devices=cpu",
    )
    first = pytester.runpytest_subprocess(*options, "--snapshot-update")
    # README: 1 + 2 + 1; Writing claims: 1 + 3 + 1; the gate: 2 seeds + 1 pair
    first.assert_outcomes(passed=12)
    again = pytester.runpytest_subprocess(*options, "-n", "2")
    again.assert_outcomes(passed=12)
    again.stdout.fnmatch_lines(["*4 snapshots passed*"])


def test_config_file_snippet(tmp_path):
    from flannel_repro import ExperimentConfig

    path = tmp_path / "flannel.toml"
    path.write_text(snippet("config-toml"), encoding="utf-8")
    exp = ExperimentConfig.from_toml(path)
    assert (exp.run.steps, exp.run.lr, exp.run.label_mode) == (200, 0.002, "next_token")
    assert (exp.n_runs, exp.base_train_seed, tuple(exp.devices)) == (6, 42, ("cpu", "cuda"))
