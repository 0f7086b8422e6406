"""What verifying an artifact before reuse costs (issue 11), against reading the same bytes once.

    python benchmarks/verify.py [--ci-artifacts DIR] [--notebook-steps 1000] [--rounds 3]

Two scales:
- CI scale: every run artifact of a CI-scale session (`pytest tests/flannel6 -n auto` fills
  .flannel/artifacts; runs of other scales in that directory are skipped). The cost per session is the
  sum over its runs, since each process verifies a file once (remembered by its stat signature).
- notebook scale: one synthetic artifact of the notebook's shape (1001 steps of a 10,000 x 64 bf16 W,
  1.28 GB), written with the harness's own writer; its content does not change what verification costs.

Columns, per artifact (best of --rounds, page cache warm: the file was just written or read):
- open: RunFile(path) and its config (what reuse costs without verification);
- verify: RunFile.verify() (dtypes, shapes, config vs run key, checksums, every W step rehashed);
- read once: reading the file's bytes sequentially into a buffer, and blake2b in memory: hashing the
  same bytes already in memory (the floor any check of all the bytes by digest pays); both measured in
  the same run as the baselines.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flannel_repro.storage.layout import write_run
from flannel_repro.storage.run import RunFile


def best(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def read_once(path: Path) -> None:
    buf = bytearray(8 << 20)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(view):
            pass


def hash_in_memory(data: bytes) -> None:
    import hashlib

    view = memoryview(data)
    for i in range(0, len(view), 1 << 20):
        hashlib.blake2b(view[i : i + (1 << 20)], digest_size=32).digest()


def open_only(path: Path) -> None:
    run = RunFile(path)
    run.config  # noqa: B018
    run.close()


def verify(path: Path) -> None:
    run = RunFile(path)
    problems = run.verify()
    run.close()
    if problems:
        raise SystemExit(f"{path}: {problems}")


def measure(paths: list[Path], rounds: int) -> tuple[float, float, float, float, int]:
    t_open = sum(best(lambda p=p: open_only(p), rounds) for p in paths)
    t_verify = sum(best(lambda p=p: verify(p), rounds) for p in paths)
    t_read = sum(best(lambda p=p: read_once(p), rounds) for p in paths)
    t_hash = 0.0
    for p in paths:
        data = p.read_bytes()
        t_hash += best(lambda d=data: hash_in_memory(d), rounds)
        del data
    return t_open, t_verify, t_read, t_hash, sum(p.stat().st_size for p in paths)


def notebook_artifact(directory: Path, steps: int) -> Path:
    g = torch.Generator().manual_seed(0)
    base = (torch.randn(10000, 64, generator=g) * 0.02).to(torch.bfloat16)
    noise = (torch.randn(10000, 64, generator=g) * 1e-3).to(torch.bfloat16)
    rows = (base + (t % 7) * noise for t in range(steps + 1))
    live = torch.zeros(10000, dtype=torch.bool)
    live[:6301] = True
    from flannel_repro.config import RunConfig

    cfg = RunConfig(steps=steps)
    return write_run(
        directory / "notebook.safetensors",
        rows,
        steps=steps,
        live_mask=live,
        config=cfg.to_dict(),
        losses=torch.linspace(9.2, 4.0, steps + 1),
        batch_size=32,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ci-artifacts", default=".flannel/artifacts", help="artifacts of a CI-scale session")
    parser.add_argument("--ci-steps", type=int, default=20, help="steps of the CI-scale runs (default 20)")
    parser.add_argument("--notebook-steps", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rows = []
    ci = []
    for p in sorted(Path(args.ci_artifacts).glob("*.safetensors")):
        try:
            run = RunFile(p)
            if run.steps == args.ci_steps and run.config.vocab_size == 10000 and not run.verify():
                ci.append(p)
            run.close()
        except Exception:  # noqa: BLE001 -- other formats or damaged files are not part of the session
            continue
    if ci:
        rows.append((f"CI scale: {len(ci)} runs x {args.ci_steps} steps", *measure(ci, args.rounds)))
    else:
        print(
            f"no CI-scale artifacts in {args.ci_artifacts}: run `pytest tests/flannel6 -n auto` first", file=sys.stderr
        )
    with tempfile.TemporaryDirectory(dir=os.environ.get("FLANNEL_BENCH_TMP")) as d:
        t0 = time.perf_counter()
        path = notebook_artifact(Path(d), args.notebook_steps)
        written = time.perf_counter() - t0
        rows.append((f"notebook scale: 1 run x {args.notebook_steps} steps", *measure([path], args.rounds)))
    print(
        "| artifacts | size (MB) | open (s) | verify (s) | read once (s) | blake2b in memory (s) | verify / blake2b |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, t_open, t_verify, t_read, t_hash, size in rows:
        print(
            f"| {name} | {size / 1e6:.1f} | {t_open:.3f} | {t_verify:.3f} | {t_read:.3f} | {t_hash:.3f} | "
            f"{t_verify / t_hash:.2f}x |"
        )
    print(f"\n(notebook-scale artifact written in {written:.1f} s; best of {args.rounds} rounds, page cache warm)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
