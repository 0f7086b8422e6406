"""A sweep of Flannel 6 runs on the Ray engine (issue 23): runs per hour on 2 cores against 1, and a projection.

    python benchmarks/bench_sweep.py [--runs 8] [--steps 120] [--num-cpus 2]

The sweep: N runs of the default config (`RunConfig(steps=S)`, the embedded default data, W recorded every step),
training seeds 100..100+N-1 (model_seed = data_seed = seed), 1 torch thread per run. Trained three ways, one after
another, each into a fresh store in a temp folder:

- serial: in this process, `RunStore(folder).obtain` one run after another (one core: the baseline);
- ray, folder: `runs.cluster.train_on_cluster` on a local Ray cluster of --num-cpus CPUs, a local folder store;
- ray, s3: the same into an S3 store: moto's server mode on localhost (`tests/s3server.py`, the server the
  URL-store tests use), its endpoint and credentials set in os.environ before Ray starts, so the raylet and the
  worker processes it forks inherit them (checked by a probe task before the sweep); a local cache folder.

For each: wall time (serial: first obtain to last; ray: `train_on_cluster` called, tasks submitted, to the last
result, the cluster already started), the per-run time in `obtain` (ClusterResult.wall_time_s, which for the S3 store
includes the upload), the training time alone (the store's training.log), and runs per hour = N / wall x 3600. Ray's
cluster start (`ray.init`) is timed apart: it is paid once per sweep, not per run.

Then a paper projection: runs per hour for M machines of C cores = M x C x 3600 / (t_run + t_store), from the
per-run time measured here and from a notebook-scale run (t_run = 244 s, benchmarks/RESULTS.md issue 5; t_store from
the issue-23 store section of RESULTS.md). The load average is printed before and after: the machine may be shared.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flannel_repro.config import RunConfig
from flannel_repro.runs.plan import RunRequest

# benchmarks/RESULTS.md, "Issue 5: performance", the `default` variant (1 thread) "1000-step run (s)"
NOTEBOOK_RUN_S = 244.0
# benchmarks/RESULTS.md, "Issue 23: the URL store's cost per notebook-scale run" (medians, 1.28 GB artifact)
NOTEBOOK_STORE_S = {
    "file:// publish": 4.2,
    "file:// publish + fetch + verify": 4.2 + 7.2,
    "s3:// moto publish": 45.8,
    "s3:// moto publish + fetch + verify": 45.8 + 46.2,
}
S3_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")


@dataclass
class Sweep:
    name: str
    cores: int
    wall_s: float = 0.0
    start_s: float = 0.0  # ray.init (cluster start), not in wall_s
    obtain_s: list[float] = field(default_factory=list)  # per run: time in obtain (training + storing)
    train_s: list[float] = field(default_factory=list)  # per run: training alone (training.log)
    trained: int = 0
    errors: list[str] = field(default_factory=list)
    load_before: str = ""

    def runs_per_hour(self, n: int) -> float:
        return n / self.wall_s * 3600 if self.wall_s else float("nan")


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().strip()


def sweep_requests(runs: int, steps: int, first_seed: int) -> list[RunRequest]:
    base = RunConfig(steps=steps, threads=1)
    return [RunRequest(base.replace(model_seed=s, data_seed=s)) for s in range(first_seed, first_seed + runs)]


def logged_training(root: Path) -> list[float]:
    log = root / "training.log"
    if not log.exists():
        return []
    return [json.loads(line)["wall_time_s"] for line in log.read_text().splitlines() if line.strip()]


def serial(requests: list[RunRequest], root: Path) -> Sweep:
    """One core: obtain each run in this process, one after another."""
    import torch

    from flannel_repro.runs.store import RunStore

    torch.set_num_threads(1)
    out = Sweep("serial, in-process (1 core)", 1, load_before=loadavg())
    store = RunStore(root, session="bench-sweep")
    t0 = time.perf_counter()
    for request in requests:
        t = time.perf_counter()
        got = store.obtain(request.config, repeat=request.repeat)
        out.obtain_s.append(time.perf_counter() - t)
        out.trained += got.trained
        got.trajectory.close()
        print(f"  serial seed {request.config.model_seed}: {out.obtain_s[-1]:.1f} s", file=sys.stderr)
    out.wall_s = time.perf_counter() - t0
    out.train_s = logged_training(root)
    return out


def probe_env() -> dict[str, str]:
    return {k: os.environ.get(k, "") for k in S3_ENV}


def on_ray(name: str, requests: list[RunRequest], location: str, cache: Path | None, num_cpus: int) -> Sweep:
    """Start a local Ray cluster, check that its workers see the S3 settings, then train the sweep on it."""
    import ray

    from flannel_repro.runs.cluster import train_on_cluster

    out = Sweep(name, num_cpus, load_before=loadavg())
    t = time.perf_counter()
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    out.start_s = time.perf_counter() - t
    try:
        seen = ray.get(ray.remote(probe_env).options(num_cpus=1).remote())
        missing = [k for k in S3_ENV if os.environ.get(k) and seen.get(k) != os.environ[k]]
        if missing:
            raise SystemExit(f"{name}: the Ray workers do not see {', '.join(missing)}")

        def report(r: object) -> None:
            print(f"  {name}: {r.run_name} {r.wall_time_s:.1f} s {r.error[:200]}", file=sys.stderr)  # type: ignore[attr-defined]

        t0 = time.perf_counter()
        results = train_on_cluster(
            requests,
            location=location,
            cache=None if cache is None else str(cache),
            address="local",  # the cluster started above: train_on_cluster uses it as it is
            threads=1,
            session="bench-sweep",
            checkpoint_every=0,
            on_result=report,
        )
        out.wall_s = time.perf_counter() - t0
    finally:
        ray.shutdown()
    out.obtain_s = [r.wall_time_s for r in results if r.ok]
    out.trained = sum(r.trained for r in results)
    out.errors = [f"{r.run_name}: {r.error}" for r in results if not r.ok]
    out.train_s = logged_training(Path(cache) if cache is not None else Path(location))
    return out


def med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=8, help="runs in the sweep (N)")
    parser.add_argument("--steps", type=int, default=120, help="steps per run (S)")
    parser.add_argument("--first-seed", type=int, default=100)
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    parser.add_argument("--no-s3", action="store_true", help="skip the S3 (moto) store")
    parser.add_argument("--no-serial", action="store_true", help="skip the 1-core baseline")
    parser.add_argument("--workdir", default=os.environ.get("FLANNEL_BENCH_TMP"), help="where the temp folder goes")
    args = parser.parse_args()

    before = loadavg()
    print(f"load average before: {before}")
    requests = sweep_requests(args.runs, args.steps, args.first_seed)
    sweeps: list[Sweep] = []
    server = None
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="bench-sweep-") as d:
        work = Path(d)
        try:
            if not args.no_s3:
                from tests.s3server import start_server

                # moto keeps objects in spooled temporary files: let them spill into the temp folder, not memory
                server = start_server({"TMPDIR": str(work)})
                os.environ.update(server.env())  # before ray.init: the raylet and its workers inherit it
                bucket = server.new_bucket()
            if not args.no_serial:
                sweeps.append(serial(requests, work / "serial"))
            sweeps.append(on_ray("ray, folder store", requests, str(work / "ray-folder"), None, args.num_cpus))
            if server is not None:
                sweeps.append(
                    on_ray("ray, s3:// (moto)", requests, f"s3://{bucket}/runs", work / "s3-cache", args.num_cpus)
                )
        finally:
            if server is not None:
                from tests.s3server import stop_server

                stop_server(server)
    total = time.perf_counter() - t_all
    after = loadavg()

    n = args.runs
    size_mb = (args.steps + 1) * 10_000 * 64 * 2 / 1e6
    print()
    print(
        f"Sweep: {n} runs x {args.steps} steps (default config, embedded default data, W every step, "
        f"~{size_mb:.0f} MB each), seeds {args.first_seed}..{args.first_seed + n - 1}, 1 thread per run."
    )
    print()
    base = next((s for s in sweeps if s.cores == 1), None)
    print(
        "| sweep | cores | cluster start (s) | wall (s) | runs trained | per-run obtain, median (min-max) s "
        "| per-run training, median s | runs/hour | x 1 core |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for s in sweeps:
        rph = s.runs_per_hour(n)
        speedup = f"{rph / base.runs_per_hour(n):.2f}" if base is not None else ""
        spread = f"{min(s.obtain_s):.1f}-{max(s.obtain_s):.1f}" if s.obtain_s else "-"
        start = f"{s.start_s:.1f}" if s.start_s else "-"
        print(
            f"| {s.name} | {s.cores} | {start} | {s.wall_s:.1f} | {s.trained}/{n} | {med(s.obtain_s):.1f} ({spread}) "
            f"| {med(s.train_s):.1f} | {rph:.0f} | {speedup} |"
        )
    for s in sweeps:
        for e in s.errors:
            print(f"  {s.name} FAILED {e[:300]}")
        print(f"  load average before {s.name}: {s.load_before}")

    # --- the projection ------------------------------------------------------------------------------------
    folder = next((s for s in sweeps if s.name == "ray, folder store"), None)
    s3 = next((s for s in sweeps if s.name.startswith("ray, s3")), None)
    rows: list[tuple[str, float, float]] = []
    if base is not None:
        rows.append((f"{args.steps} steps, 1 core alone (serial obtain, measured)", med(base.obtain_s), 0.0))
    if folder is not None:
        rows.append((f"{args.steps} steps, all cores busy (ray folder obtain, measured)", med(folder.obtain_s), 0.0))
    if s3 is not None and folder is not None:
        store = med(s3.obtain_s) - med(s3.train_s)
        rows.append((f"{args.steps} steps + moto publish (ray s3 obtain, measured)", med(s3.train_s), store))
    rows.append((f"notebook scale, no store ({NOTEBOOK_RUN_S:.0f} s)", NOTEBOOK_RUN_S, 0.0))
    for what, t_store in NOTEBOOK_STORE_S.items():
        rows.append((f"notebook scale + {what}", NOTEBOOK_RUN_S, t_store))
    grid = [(m, c) for c in (2, 16) for m in (1, 4, 16)]
    print()
    print("Projection: runs/hour = M x C x 3600 / (t_run + t_store), one 1-thread run per core.")
    print()
    print("| t_run + t_store | t_run (s) | t_store (s) | " + " | ".join(f"{m}x{c}" for m, c in grid) + " |")
    print("| --- | ---: | ---: | " + " | ".join("---:" for _ in grid) + " |")
    for what, t_run, t_store in rows:
        cells = " | ".join(f"{m * c * 3600 / (t_run + t_store):,.0f}" for m, c in grid)
        print(f"| {what} | {t_run:.1f} | {t_store:.1f} | {cells} |")
    print()
    print(f"total {total:.0f} s")
    print(f"load average after: {after}")
    return 1 if any(s.errors for s in sweeps) else 0


if __name__ == "__main__":
    raise SystemExit(main())
