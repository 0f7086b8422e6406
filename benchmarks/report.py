"""What the report costs (issue 13), against the divergence analysis of the same runs, in the same run.

    python benchmarks/report.py --runs DIR [--counts 2,5,10] [--verify]

DIR holds run artifacts (e.g. a notebook-scale session's --flannel-artifacts). For each count n, the
first n single-seed runs (repeat 0, lowest seeds first) are taken, and in a fresh process each:

- report: `write_report(runs, tmp)`: every pair computed, every plot drawn, page, JSON and CSV written;
- divergence: `all_pairs(runs)`: the pairwise analysis alone (what `flannel-repro divergence` does), the
  baseline; the report computes at least these pairs.

Columns: wall seconds and the process's peak RSS (MB, getrusage). Files are read through the page
cache; run the script twice and read the second table for warm figures. Verification is off unless
--verify (it is measured in benchmarks/verify.py).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, {root!r})
kind, verify, out, paths = sys.argv[1], sys.argv[2] == "1", sys.argv[3], sys.argv[4:]
t0 = time.perf_counter()
if kind == "report":
    from flannel_repro.report import write_report
    result = write_report(paths, out, verify=verify)
    extra = {{"plots": len(result.document["figures"]), "pairs": sum(c["n_pairs"] for c in result.document["pair_classes"])}}
else:
    from flannel_repro.analysis.divergence import all_pairs
    pw = all_pairs(paths)
    extra = {{"plots": 0, "pairs": int(pw.pairs.shape[0])}}
wall = time.perf_counter() - t0
print(json.dumps({{"wall_s": wall, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, **extra}}))
"""


def single_seed_runs(folder: Path) -> list[Path]:
    from flannel_repro.storage.run import RunFile

    found = []
    for p in sorted(folder.glob("*.safetensors")):
        r = RunFile(p)
        try:
            c = r.config
            if c.train_seed is not None and r.repeat == 0 and c.dtype == "bfloat16" and c.engine == "torch":
                found.append((c.steps, c.threads, c.train_seed, -p.stat().st_mtime, p))
        finally:
            r.close()
    if not found:
        raise SystemExit(f"{folder}: no single-seed run artifacts found")
    found.sort()
    groups: dict[tuple[int, int], dict[int, Path]] = {}
    for s, t, seed, _, p in found:  # newest first within a seed
        groups.setdefault((s, t), {}).setdefault(seed, p)
    _, newest = max(groups.items(), key=lambda kv: (len(kv[1]), kv[0][0]))  # most seeds, then longest
    return [newest[seed] for seed in sorted(newest)]


def measure(kind: str, paths: list[Path], verify: bool) -> dict:
    root = str(Path(__file__).resolve().parents[1])
    with tempfile.TemporaryDirectory() as tmp:
        got = subprocess.run(
            [
                sys.executable,
                "-c",
                CHILD.format(root=root),
                kind,
                "1" if verify else "0",
                str(Path(tmp) / "report"),
                *map(str, paths),
            ],
            capture_output=True,
            text=True,
        )
    if got.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{got.stderr[-3000:]}")
    return json.loads(got.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=Path, required=True, help="folder of run artifacts")
    ap.add_argument("--counts", default="2,5,10", help="numbers of runs to report on (default 2,5,10)")
    ap.add_argument("--verify", action="store_true", help="verify the artifacts first (off: see benchmarks/verify.py)")
    args = ap.parse_args()
    runs = single_seed_runs(args.runs)
    counts = [n for n in (int(x) for x in args.counts.split(",")) if n <= len(runs)]
    from flannel_repro.storage.run import RunFile

    first = RunFile(runs[0])
    steps, shape = first.steps, tuple(first.reader.spec("W").shape[1:])
    first.close()
    print(f"runs: {len(runs)} single-seed artifacts of {steps} steps, W {shape}, in {args.runs}")
    print("| runs | pairs | plots | report s | report peak RSS MB | divergence s | divergence peak RSS MB |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for n in counts:
        rep = measure("report", runs[:n], args.verify)
        div = measure("divergence", runs[:n], args.verify)
        print(
            f"| {n} | {rep['pairs']} | {rep['plots']} | {rep['wall_s']:.1f} | {rep['peak_rss_mb']:.0f} | "
            f"{div['wall_s']:.1f} | {div['peak_rss_mb']:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
