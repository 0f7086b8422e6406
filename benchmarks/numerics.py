"""CPU numerics modes side by side: training speed and bits of the same run, measured in one session.

Each measurement is a fresh process (ATen, oneDNN and MKL fix their code paths at their first call),
training the CI-scale config (seed 42, one thread) for --steps steps. The variants alternate within each
round (native, portable, avx512bf16, avx2-native, ...) so that load on this shared machine falls on all
alike. `avx2-native` is how a CPU without AVX-512 runs natively, emulated on this one (ATen and oneDNN
capped at AVX2): the cost portable mode avoids there. It prints one row per process and a summary with
the median steps/s of each variant, relative to native, and whether each variant's processes agreed
bitwise.

    python benchmarks/numerics.py --steps 10 --rounds 2
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
import json, sys
from flannel_repro.config import PRESETS
from flannel_repro.training.harness import train
from flannel_repro.analysis.trajectory import Trajectory
mode, steps, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
cfg = PRESETS["ci"]().run.replace(steps=steps, threads=1, numerics=mode)
result = train(cfg, out)
traj = Trajectory(result.path)
print(json.dumps({"class": traj.env["numerics"]["class"], "steps_per_s": result.steps_per_s,
                  "wall_s": result.wall_time_s, "last_digest": traj.digest_hex(steps)[:16]}))
"""

# variant -> (numerics mode, environment overrides)
VARIANTS = {
    "native": ("native", {}),
    "portable": ("portable", {}),
    "avx512bf16": ("avx512bf16", {}),
    "avx2-native": ("native", {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2,STRICT"}),
}


def measure(variant: str, steps: int, tmp: str, index: int) -> dict:
    from flannel_repro.training.numerics import NUMERICS_ENV

    mode, extra = VARIANTS[variant]
    env = {k: v for k, v in os.environ.items() if k not in NUMERICS_ENV}
    env.update(extra)
    out = os.path.join(tmp, f"{variant}-{index}.safetensors")
    proc = subprocess.run([sys.executable, "-c", CHILD, mode, str(steps), out], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{variant}: the training process failed:\n{proc.stderr[-2000:]}")
    return {"variant": variant, **json.loads(proc.stdout.strip().splitlines()[-1])}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    args = parser.parse_args()
    from flannel_repro.training.numerics import machine_line

    chosen = [v.strip() for v in args.variants.split(",") if v.strip()]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for variant in chosen:
                rows.append(measure(variant, args.steps, tmp, r))
                row = rows[-1]
                print(
                    f"{variant:<12} {row['class']:<36} {row['steps_per_s']:>8.3f} steps/s  {row['wall_s']:>7.1f} s  "
                    f"last digest {row['last_digest']}",
                    flush=True,
                )
    print(f"\nmachine: {machine_line()}; CI-scale config, seed 42, 1 thread, {args.steps} steps, {args.rounds} rounds")
    print("| variant | class | median steps/s | min | max | / native | bitwise repeatable |")
    print("|---|---|---:|---:|---:|---:|---|")
    med = {v: statistics.median(r["steps_per_s"] for r in rows if r["variant"] == v) for v in chosen}
    base = med.get("native")
    for v in chosen:
        rates = [r["steps_per_s"] for r in rows if r["variant"] == v]
        klass = next(r["class"] for r in rows if r["variant"] == v)
        same = len({r["last_digest"] for r in rows if r["variant"] == v}) == 1
        rel = f"{med[v] / base:.2f}" if base else "-"
        print(f"| {v} | {klass} | {med[v]:.3f} | {min(rates):.3f} | {max(rates):.3f} | {rel} | {same} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
