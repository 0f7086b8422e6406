"""Native against portable CPU numerics: training speed of the same run, measured in one session.

Each measurement is a fresh process (oneDNN and MKL fix their code paths at their first call), training
the CI-scale config (seed 42, one thread) for --steps steps; the modes alternate (native, portable,
native, ...) so that load on this shared machine falls on both alike. It prints one row per process and
a summary with the median steps/s of each mode and portable's cost relative to native.

    python benchmarks/numerics.py --steps 40 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

CHILD = """
import json, sys, time
from flannel_repro.config import PRESETS
from flannel_repro.training.harness import train
from flannel_repro.analysis.trajectory import Trajectory
mode, steps, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
cfg = PRESETS["ci"]().run.replace(steps=steps, threads=1, numerics=mode)
result = train(cfg, out)
traj = Trajectory(result.path)
print(json.dumps({"mode": mode, "class": traj.env["numerics"]["class"], "steps_per_s": result.steps_per_s,
                  "wall_s": result.wall_time_s, "last_digest": traj.digest_hex(steps)[:16]}))
"""


def measure(mode: str, steps: int, tmp: str, index: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_MAX_CPU_ISA", "MKL_CBWR")}
    out = os.path.join(tmp, f"{mode}-{index}.safetensors")
    proc = subprocess.run([sys.executable, "-c", CHILD, mode, str(steps), out], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{mode}: the training process failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    from flannel_repro.training.numerics import machine_line

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for mode in ("native", "portable"):
                rows.append(measure(mode, args.steps, tmp, r))
                row = rows[-1]
                print(f"{mode:<9} {row['class']:<36} {row['steps_per_s']:>8.3f} steps/s  {row['wall_s']:>7.1f} s  "
                      f"last digest {row['last_digest']}", flush=True)
    print(f"\nmachine: {machine_line()}; CI-scale config, seed 42, 1 thread, {args.steps} steps, {args.rounds} rounds")
    print(f"{'mode':<9} {'class':<36} {'median steps/s':>15} {'min':>7} {'max':>7}")
    med = {}
    for mode in ("native", "portable"):
        rates = [r["steps_per_s"] for r in rows if r["mode"] == mode]
        med[mode] = statistics.median(rates)
        klass = next(r["class"] for r in rows if r["mode"] == mode)
        print(f"{mode:<9} {klass:<36} {med[mode]:>15.3f} {min(rates):>7.3f} {max(rates):>7.3f}")
    print(f"portable / native: {med['portable'] / med['native']:.3f} (steps/s)")
    same = {m: len({r["last_digest"] for r in rows if r["mode"] == m}) == 1 for m in med}
    print(f"each mode bitwise repeatable across its processes: {same}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
