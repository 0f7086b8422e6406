"""What recording costs per optimizer step on the notebook's model (issue 14), against training without it,
in the same process and the same run.

    python benchmarks/recorder.py [--steps 40] [--rounds 3] [--threads 1] [--out DIR]

One torch-engine loop (`TorchLoop`: the notebook's GPT-2, vocab 10,000, hidden 64, seq 128, batch 32, bf16)
is stepped in blocks of `--steps` optimizer steps, the variants interleaved round by round so that a
noisy machine disturbs them alike:

- bare: `loop.step()` alone, the baseline;
- flannel6 recorder: the harness's `RunRecorder` (W, its digest, the loss, the batch, the update statistics)
  after every step, into a pre-sized artifact, as every Flannel 6 run records;
- public recorder: `TrajectoryRecorder` recording `transformer.wte.weight` with the optimizer handed
  over (the same W, digest, loss, batch and update statistics) into its artifact;
- public + checkpoint: the same with a checkpoint of the full state every 10 steps.

Each block is timed per step (perf_counter around the step and its recording); the table gives the
median ms per step over all blocks' steps and the overhead against bare in the same round.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=40, help="optimizer steps per block (default 40)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of the four variants (default 3)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--out", default=None, help="folder for the artifacts (default: a temporary folder)")
    args = ap.parse_args()

    import torch

    from flannel_repro.config import RunConfig
    from flannel_repro.data.corpus import load_data
    from flannel_repro.training.harness import TorchLoop
    from flannel_repro.training.model import embedding, shared_init_W
    from flannel_repro.training.own_training import TrajectoryRecorder
    from flannel_repro.training.run_recorder import RunRecorder

    torch.set_num_threads(args.threads)
    n = 4 * args.steps * args.rounds
    config = RunConfig(steps=n)  # the notebook's model; the schedule spans every block of every variant
    data = load_data(config)
    loop = TorchLoop(config, data, shared_init_W(config))
    out = Path(args.out or tempfile.mkdtemp(prefix="flannel-recorder-bench-"))
    times: dict[str, list[float]] = {
        "bare": [],
        "flannel6 recorder": [],
        "public recorder": [],
        "public + checkpoint/10": [],
    }
    per_round: dict[str, list[float]] = {k: [] for k in times}
    step = 0

    def block(record) -> list[float]:
        nonlocal step
        got = []
        for _ in range(args.steps):
            step += 1
            t0 = time.perf_counter()
            loss, starts = loop.step(step)
            record(loss, starts)
            got.append((time.perf_counter() - t0) * 1e3)
        return got

    # each recording variant writes its own artifact of n steps: the first row, then a block per round
    f6 = RunRecorder(config.replace(steps=args.steps * args.rounds), out / "f6.safetensors", data, {})
    f6.__enter__()
    f6.record(0, loop.model)
    f6_step = [0]

    def rec_f6(loss, starts):
        f6_step[0] += 1
        f6.capture_grads(loop.model, loop.optimizer)  # after the step here: only the lost-update share is off
        f6.record(f6_step[0], loop.model, loss=loss, batch_starts=starts, optimizer=loop.optimizer)

    publics = {}
    for name, every in (("public recorder", 0), ("public + checkpoint/10", 10)):
        rec = TrajectoryRecorder(
            out / f"{name.split()[0]}-{every}.safetensors",
            {"wte": embedding(loop.model)},
            steps=args.steps * args.rounds,
            optimizer=loop.optimizer,
            batch_size=config.batch_size,
            checkpoint_every=every,
            state={"model": loop.model, "optimizer": loop.optimizer, "scheduler": loop.scheduler} if every else None,
        )
        rec.__enter__()
        publics[name] = rec

    for _ in range(args.rounds):
        got = block(lambda loss, starts: None)
        times["bare"] += got
        per_round["bare"].append(statistics.median(got))
        got = block(rec_f6)
        times["flannel6 recorder"] += got
        per_round["flannel6 recorder"].append(statistics.median(got))
        for name, rec in publics.items():
            got = block(lambda loss, starts, rec=rec: rec.step(loss=loss, batch=starts))
            times[name] += got
            per_round[name].append(statistics.median(got))
    f6.finish()
    f6.__exit__(None, None, None)
    for rec in publics.values():
        rec.__exit__(None, None, None)

    base = statistics.median(times["bare"])
    print(f"torch {torch.__version__}, threads {args.threads}, {args.rounds} rounds x {args.steps} steps per variant")
    print(f"{'variant':<24} {'ms/step':>9} {'overhead ms':>12} {'overhead %':>11}  per-round medians (ms)")
    for name, got in times.items():
        med = statistics.median(got)
        rounds = ", ".join(f"{m:.1f}" for m in per_round[name])
        print(f"{name:<24} {med:>9.1f} {med - base:>12.2f} {100 * (med - base) / base:>10.1f}%  {rounds}")


if __name__ == "__main__":
    main()
