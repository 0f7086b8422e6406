"""The built wheel, installed into a fresh virtual environment, runs a user's claims from outside the repository.

Every other test imports flannel_repro from this checkout (an editable install). This one checks what a user
gets from `pip install flannel-repro`: it builds the wheel from a copy of the source (so no build/ or
*.egg-info is left in the repository), creates a new venv, installs this session's torch version and the
wheel with its declared dependencies, writes a claim file and a pytest.ini into a temporary folder, and runs
pytest there with the venv's interpreter. The claims must all pass, none skipped, and the plugin must have
been loaded through its `pytest11` entry point from the venv's site-packages.

It builds and installs for real (about a minute with the torch wheel in pip's cache or find-links), so it
runs only when asked for: `FLANNEL_REPRO_WHEEL_TEST=1 pytest tests/test_wheel_install.py`. `.ci/run` runs it
as its own step and fails on a skip. Without the variable it skips, saying so.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
OPT_IN = "FLANNEL_REPRO_WHEEL_TEST"

pytestmark = pytest.mark.skipif(
    os.environ.get(OPT_IN) != "1",
    reason=f"builds the wheel and installs it with torch into a fresh venv (~1 min): set {OPT_IN}=1 (.ci/run does)",
)

# What a wheel is built from: pyproject.toml's package (flannel_repro*) and the files its metadata names.
SOURCE = ("pyproject.toml", "README.md", "LICENSE", "flannel_repro")

# A user's project: the tiny embedded data set at 2 steps, 2 seeds, cpu only.
PYTEST_INI = """\
[pytest]
flannel_config = flannel.toml
flannel_progress = 0
"""

FLANNEL_TOML = """\
dataset = "tiny"
vocab_size = 512
batch_size = 8
seq_len = 32
"""

CLAIMS = """\
import json
from pathlib import Path

import flannel_repro
from flannel_repro import assert_diverged, assert_identical


def test_same_seed_twice_is_identical(trajectory, train_seed, device):
    assert_identical(trajectory(train_seed), trajectory(train_seed, repeat=1))


def test_seeds_part_at_step_1(trajectory, flannel_config):
    a, b = flannel_config.train_seeds[:2]
    assert_diverged(trajectory(a), trajectory(b), by_step=1)
    assert trajectory(a).steps == 2


def test_where_the_plugin_came_from(request):
    plugin = request.config.pluginmanager.get_plugin("flannel_repro")  # the pytest11 entry point's name
    Path("imported.json").write_text(json.dumps({
        "package": flannel_repro.__file__,
        "plugin": getattr(plugin, "__file__", None),
    }))
"""


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (
        f"{' '.join(map(str, cmd))} exited {proc.returncode}\n"
        f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}"
    )
    return proc


def _clean_env(tmp_path: Path) -> dict[str, str]:
    """This process's environment without what would point the child at this checkout or this venv."""
    drop = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTEST_ADDOPTS", "PYTEST_PLUGINS", "FLANNEL_REPRO_ARTIFACTS")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("PYTEST_XDIST")}
    env["FLANNEL_REPRO_CACHE"] = str(tmp_path / "cache")  # the installed package generates the tiny data here
    env["PIP_NO_INPUT"] = "1"
    return env


def _outcomes(stdout: str) -> dict[str, int]:
    """The counts of pytest's closing line, e.g. '==== 4 passed in 3.21s ====' -> {'passed': 4}."""
    lines = [line for line in stdout.splitlines() if re.match(r"^=+ .* in [\d.]+s", line)]
    assert lines, f"no pytest summary line in:\n{stdout[-3000:]}"
    counts = re.findall(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed|deselected|warnings?)", lines[-1])
    return {kind.rstrip("s") if kind.startswith(("error", "warning")) else kind: int(n) for n, kind in counts}


def test_built_wheel_runs_a_users_claims_in_a_fresh_venv(tmp_path: Path, all_cpus) -> None:
    # this session's torch, as pip knows it (torch.__version__ may carry a suffix no index has, e.g. +cu132)
    torch_version = importlib.metadata.version("torch")
    env = _clean_env(tmp_path)
    timings: dict[str, float] = {}

    # 1. the wheel, built from a copy of the source
    start = time.monotonic()
    src = tmp_path / "src"
    src.mkdir()
    for name in SOURCE:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
        else:
            shutil.copy2(path, src / name)
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(dist), str(src)], tmp_path, env)
    wheels = sorted(dist.glob("flannel_repro-*.whl"))
    assert len(wheels) == 1, wheels
    timings["build"] = time.monotonic() - start

    # 2. a fresh venv (with its own pip), this session's torch, and the wheel with its dependencies
    start = time.monotonic()
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], tmp_path, env)
    python = venv / "bin" / "python"
    assert python.exists(), list(venv.iterdir())
    _run(
        [str(python), "-m", "pip", "install", "--quiet", "--no-compile", f"torch=={torch_version}", str(wheels[0])],
        tmp_path,
        env,
    )
    timings["install"] = time.monotonic() - start

    probe = _run(
        [
            str(python),
            "-c",
            (
                "import importlib.metadata as m, json, sysconfig; d = m.distribution('flannel-repro'); "
                "print(json.dumps({'purelib': sysconfig.get_paths()['purelib'], 'version': d.version, "
                "'direct_url': json.loads(d.read_text('direct_url.json') or '{}'), "
                "'torch': m.version('torch'), 'xdist': any(x.metadata['Name'] == 'pytest-xdist' for x in m.distributions())}))"
            ),
        ],
        tmp_path,
        env,
    )
    installed = json.loads(probe.stdout)
    site_packages = Path(installed["purelib"]).resolve()
    assert site_packages.is_relative_to(venv.resolve()), installed
    assert installed["direct_url"].get("url", "").endswith(wheels[0].name), installed  # the wheel, not a folder
    assert not installed["direct_url"].get("dir_info", {}).get("editable"), installed
    assert installed["torch"] == torch_version, installed
    from flannel_repro.version import __version__

    assert installed["version"] == __version__

    # 3. a user's claims, in a folder outside the repository, run with the venv's pytest
    start = time.monotonic()
    project = tmp_path / "user-project"
    project.mkdir()
    assert not project.resolve().is_relative_to(REPO)
    (project / "pytest.ini").write_text(PYTEST_INI)
    (project / "flannel.toml").write_text(FLANNEL_TOML)
    (project / "test_claims.py").write_text(CLAIMS)
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(venv)
    result = subprocess.run(
        [
            str(python),
            "-m",
            "pytest",
            "-rA",
            "-p",
            "no:cacheprovider",
            "--flannel-steps=2",
            "--flannel-runs=2",
            "--flannel-devices=cpu",
            "--flannel-threads=1",
            "--flannel-artifacts=" + str(tmp_path / "artifacts"),
        ],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    timings["claims"] = time.monotonic() - start
    report = f"--- stdout\n{result.stdout[-6000:]}\n--- stderr\n{result.stderr[-3000:]}"
    assert result.returncode == 0, report
    outcomes = _outcomes(result.stdout)
    assert outcomes.get("passed") == 4, (outcomes, report)  # 2 seeds x repeatable, seeds part, provenance
    assert set(outcomes) <= {"passed", "warning"}, (outcomes, report)  # nothing skipped, failed or deselected
    assert f"rootdir: {project}" in result.stdout, report

    imported = json.loads((project / "imported.json").read_text())
    for what in ("package", "plugin"):
        path = Path(imported[what]).resolve()
        assert path.is_relative_to(site_packages), (what, path, site_packages)
        assert not path.is_relative_to(REPO), (what, path)
    assert Path(imported["plugin"]).name == "hooks.py"  # flannel_repro.plugin.hooks, loaded as pytest11

    print(
        f"wheel install timings: {', '.join(f'{k} {v:.1f}s' for k, v in timings.items())}; "
        f"torch {installed['torch']}, pytest-xdist in venv: {installed['xdist']}"
    )
