"""What recording the operations of step k costs, against training to step k (issue 12).

    python benchmarks/replay.py [--steps 1 5 20] [--threads 1] [--preset default]

For each k, in one process (after one warm-up replay):
- train k: `train()` of a k-step run (the artifact written, W recorded every step);
- replay k: `record_step(config, k)`: train k - 1 steps without recording, then step k under DebugMode
  with every input and output of every operation hashed;
- the recorded step alone: replay k minus training k - 1 steps (estimated as train(k) - train(1) + the
  replay at k = 1, which is one recorded step from scratch).
The claim to check: replay k <= train k + one recorded step, i.e. replaying costs no more than training.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flannel_repro.config import PRESETS
from flannel_repro.training.harness import train
from flannel_repro.runs.replay import record_step


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 5, 20])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="ci")
    args = parser.parse_args()
    base = PRESETS[args.preset]().run.replace(threads=args.threads, steps=max(args.steps))
    record_step(base.replace(steps=1), 1)  # warm-up: imports, DebugMode, the numerics probe
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for k in args.steps:
            cfg = base.replace(steps=k)
            t0 = time.perf_counter()
            train(cfg, Path(d) / f"k{k}.safetensors")
            t_train = time.perf_counter() - t0
            t0 = time.perf_counter()
            log, _ = record_step(cfg, k)
            t_replay = time.perf_counter() - t0
            rows.append((k, t_train, t_replay, len(log.ops)))
    one = next((r for r in rows if r[0] == 1), None)
    print(
        f"config: {args.preset} preset (vocab {base.vocab_size}, batch {base.batch_size}, seq {base.seq_len}), "
        f"{args.threads} thread(s)\n"
    )
    print("| k | train k steps (s) | replay to k, recording step k (s) | operations of step k | replay - train (s) |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for k, t_train, t_replay, n_ops in rows:
        print(f"| {k} | {t_train:.2f} | {t_replay:.2f} | {n_ops} | {t_replay - t_train:+.2f} |")
    if one is not None:
        print(f"\none recorded step (k = 1): {one[2]:.2f} s against {one[1]:.2f} s to train it")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
