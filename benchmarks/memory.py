"""Peak memory of one run versus its length, and a notebook-format export that loads.

    python benchmarks/memory.py [--steps 100 1000] [--engine hf] [--export-runs 10 --export-steps 100]

Each run trains in a fresh subprocess (so its peak RSS is its own) with the notebook preset on the
embedded data, W recorded every step. The table says whether peak RSS grows with the step count.
Then it trains `--export-runs` short runs, exports them to the notebook's single-file layout and
loads that file with `safetensors.torch.load_file`, checking keys, shapes and dtypes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = """
import json, resource, sys, time
from flannel_repro.config import notebook_config
from flannel_repro.training.harness import train
cfg = notebook_config(int(sys.argv[3])).replace(steps=int(sys.argv[1]), engine=sys.argv[4])
t0 = time.perf_counter()
r = train(cfg, sys.argv[2])
print(json.dumps({"steps_per_s": r.steps_per_s, "wall_s": time.perf_counter() - t0, "threads": r.threads,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run_child(steps: int, out: Path, seed: int, engine: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(steps), str(out), str(seed), engine],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, nargs="*", default=[100, 1000])
    ap.add_argument("--engine", default="hf", choices=["hf", "torch"])
    ap.add_argument("--export-runs", type=int, default=10)
    ap.add_argument("--export-steps", type=int, default=100)
    args = ap.parse_args()
    import torch
    from safetensors.torch import load_file

    from flannel_repro.storage.export import NOTEBOOK_KEYS, export_notebook

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__}; engine {args.engine}")
    with tempfile.TemporaryDirectory(dir=os.environ.get("FLANNEL_BENCH_TMP")) as tmp:
        tmp = Path(tmp)
        rows = []
        for steps in args.steps:
            info = run_child(steps, tmp / f"run{steps}.safetensors", 42, args.engine)
            size_mb = (tmp / f"run{steps}.safetensors").stat().st_size / 1e6
            rows.append((steps, info, size_mb))
        if rows:
            print("\n| steps | peak RSS (MB) | artifact (MB) | steps/s | wall (s) |\n|---:|---:|---:|---:|---:|")
        for steps, info, size_mb in rows:
            print(
                f"| {steps} | {info['peak_rss_mb']:.0f} | {size_mb:.0f} | {info['steps_per_s']:.2f} | {info['wall_s']:.1f} |"
            )
        if len(rows) > 1:
            lo, hi = rows[0][1]["peak_rss_mb"], rows[-1][1]["peak_rss_mb"]
            print(f"\npeak RSS {rows[-1][0]} steps / {rows[0][0]} steps = {hi / lo:.3f}")
        if args.export_runs:
            runs = []
            t0 = time.perf_counter()
            for i in range(args.export_runs):
                p = tmp / f"exp{i}.safetensors"
                run_child(args.export_steps, p, 42 + i, "torch")
                runs.append(p)
            train_s = time.perf_counter() - t0
            out = tmp / "1.20f_flannel_6.safetensors"
            t0 = time.perf_counter()
            export_notebook(runs, out)
            export_s = time.perf_counter() - t0
            loaded = load_file(str(out))
            print(
                f"\nexport: {args.export_runs} runs x {args.export_steps} steps trained in {train_s:.0f} s, "
                f"exported in {export_s:.1f} s, {out.stat().st_size / 1e6:.0f} MB; load_file keys/shapes/dtypes:"
            )
            for key in NOTEBOOK_KEYS:
                t = loaded[key]
                print(f"  {key:<16} {str(tuple(t.shape)):<24} {t.dtype}")
            assert set(loaded) == set(NOTEBOOK_KEYS), sorted(set(loaded) ^ set(NOTEBOOK_KEYS))
            assert loaded["W"].shape == (args.export_runs, args.export_steps + 1, 10000, 64)
            assert loaded["W"].dtype == torch.bfloat16 and loaded["losses"].dtype == torch.bfloat16
            print(
                f"  n_live={int(loaded['n_live'])} n_dead={int(loaded['n_dead'])} "
                f"W[:,0] equal across runs: {bool((loaded['W'][:, 0] == loaded['W_initial']).all())}"
            )
    print(f"\n(self peak RSS of this driver: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB)")


if __name__ == "__main__":
    main()
