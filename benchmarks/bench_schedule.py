"""--flannel-schedule=claims against --flannel-schedule=plan: the Flannel 6 suite under `pytest -n 2` on fresh
artifacts, interleaved (A B A B ...), at a scale where one run takes tens of seconds.

For each session: the wall time, the sum of its runs' training times (training.log: wall_time_s per run and the
xdist worker that trained it), that sum over the 2 workers, wall / (sum / 2), and the idle share
1 - sum / (2 x wall): the part of the two workers' time spent not training (waiting on a lock, or idle after
their claims ran out, plus the session's own overhead). The load average before each session is printed: the
machine may be shared.

The sessions run from a copy of the repository taken at start (PYTHONPATH), so edits made meanwhile change
neither the code under test nor its run keys.

    python benchmarks/bench_schedule.py --steps 300 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def snapshot(work: Path) -> Path:
    """A copy of the package and the suite: what every session runs."""
    root = work / "repo"
    root.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".flannel")
    for name in ("flannel_repro", "tests"):
        shutil.copytree(REPO / name, root / name, ignore=ignore)
    for name in ("pyproject.toml", "conftest.py"):
        shutil.copy2(REPO / name, root / name)
    return root


def session(root: Path, work: Path, schedule: str, label: str, args: argparse.Namespace) -> dict:
    artifacts = work / label
    argv = [
        sys.executable,
        "-m",
        "pytest",
        "tests/flannel6",
        "-n",
        "2",
        "-q",
        "-p",
        "no:cacheprovider",
        f"--flannel-steps={args.steps}",
        f"--flannel-runs={args.runs}",
        f"--flannel-derive-bounds={args.derive_bounds}",
        f"--flannel-artifacts={artifacts}",
        f"--flannel-schedule={schedule}",
        "--flannel-progress=0",
    ]
    env = {**os.environ, "PYTHONPATH": str(root), "FLANNEL_REPRO_CACHE": str(work / "cache")}
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.run(argv, cwd=root, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else "?"
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-2000:], file=sys.stderr)
    log = [json.loads(line) for line in (artifacts / "training.log").read_text().splitlines()]
    train = sum(r["wall_time_s"] for r in log)
    per_worker = {w: sum(r["wall_time_s"] for r in log if r["worker"] == w) for w in sorted({r["worker"] for r in log})}
    shutil.rmtree(artifacts, ignore_errors=True)
    return {
        "schedule": schedule,
        "load": load,
        "wall": wall,
        "train": train,
        "runs": len(log),
        "per_worker": per_worker,
        "result": last,
        "argv": argv,
    }


def row(r: dict) -> str:
    half = r["train"] / 2
    workers = ", ".join(f"{w} {s:.0f}" for w, s in r["per_worker"].items())
    return (
        f"| {r['schedule']} | {r['load']:.2f} | {r['wall']:.0f} | {r['runs']} | {r['train']:.0f} | {half:.0f} | "
        f"{r['wall'] / half:.2f} | {1 - r['train'] / (2 * r['wall']):.1%} | {workers} | {r['result']} |"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--runs", type=int, default=2, help="claim seeds (--flannel-runs)")
    p.add_argument("--derive-bounds", default="44-51", help="held-out seeds of the in-session bound")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-schedule-"))
    root = snapshot(work)
    print(
        "| schedule | load avg (1 min) before | wall s | runs | sum of training s | sum / 2 | wall / (sum / 2) "
        "| idle share | training s per worker | result |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|---|", flush=True)
    results = []
    for i in range(args.rounds):
        for schedule in ("claims", "plan"):
            r = session(root, work, schedule, f"{schedule}-{i}", args)
            results.append(r)
            print(row(r), flush=True)
    for schedule in ("claims", "plan"):
        mine = [r for r in results if r["schedule"] == schedule]
        walls = [r["wall"] for r in mine]
        idle = [1 - r["train"] / (2 * r["wall"]) for r in mine]
        print(
            f"{schedule}: wall {min(walls):.0f}-{max(walls):.0f} s (mean {sum(walls) / len(walls):.0f}), "
            f"idle share {min(idle):.1%}-{max(idle):.1%}"
        )
    print("command:", " ".join(results[0]["argv"][2:]).replace("claims-0", "<fresh dir>"))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
