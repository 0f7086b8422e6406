"""python -m tests.faults [--kills N] [-k SUBSTRING]: run every fault probe and print the table."""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from tests.faults.probes import PROBES, kill_trials, run_probe, table


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.faults", description=__doc__)
    parser.add_argument("--kills", type=int, default=20, help="kill -9 trials (default 20)")
    parser.add_argument("-k", default="", help="only probes whose id contains this")
    args = parser.parse_args()
    results = []
    t0 = time.perf_counter()
    for p in PROBES:
        if args.k not in p.id:
            continue
        with tempfile.TemporaryDirectory(prefix="flannel-fault-") as d:
            outcome = run_probe(p, Path(d))
        results.append((p, outcome))
        print(
            f"{outcome.kind.upper():<8} {p.id}: {outcome.detail.splitlines()[0][:160] if outcome.detail else ''}",
            flush=True,
        )
    print()
    print(table(results))
    print(f"\n{len(results)} probes in {time.perf_counter() - t0:.0f} s")
    if args.kills:
        with tempfile.TemporaryDirectory(prefix="flannel-kill-") as d:
            r = kill_trials(Path(d), args.kills, seed=20)
        print(f"\nkill -9 x {r['trials']}: " + json.dumps(r))
    return 0 if all(o.ok for _, o in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
