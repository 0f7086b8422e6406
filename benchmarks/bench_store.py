"""What the URL artifact store costs per notebook-scale run (issue 23), against training that run.

    python benchmarks/bench_store.py [--steps 1000] [--repeats 3] [--train-s 244]

One synthetic artifact of the notebook's shape (W after every step: 1001 x 10,000 x 64 bf16 = 1.28 GB, plus
losses, digests, batch starts, live mask), written with the harness's own writer (`layout.write_run`, which
drives `ArtifactWriter` row by row and records a real blake2b digest per step), so `RunFile.verify()` has real
digests to check. Its content does not change what storing it costs. Then, against two stores:

- `s3://`: a real S3-compatible HTTP server on localhost (moto's server mode, `tests/s3server.py`, the server
  the URL-store tests use) reached through s3fs, the endpoint and credentials in the environment;
- `file://`: a folder on the same disk, through the same `RemoteStore` code (copy, rename, hard link).

Timed, each --repeats times, interleaved round by round (the machine may be shared):

- file_digest: blake2b of the local artifact (part of both publish and fetch);
- publish: `RemoteStore.publish` (digest, upload the object, conditional-create the manifest), a new run name
  each round so every round uploads and wins; the previous round's object is removed first (untimed);
- fetch: `RemoteStore.lookup` + `RemoteStore.fetch` into a fresh path (download, then the blake2b check);
- verify: `RunFile(path).verify()` on the downloaded file (every W step rehashed against its stored digest);
- check: `RemoteStore.check()`, the session-start probe, once per store.

The page cache is warm throughout (the artifact was just written, a download was just written). The cost per run
is then set against the training time of one notebook-scale run, passed as --train-s (from benchmarks/RESULTS.md;
this script trains nothing).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flannel_repro.runs.remote import Manifest, RemoteStore, file_digest
from flannel_repro.storage.run import RunFile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from verify import notebook_artifact  # the notebook's shape from cheap rows, as the verify benchmark builds it


@dataclass
class Timing:
    what: str
    store: str
    nbytes: int
    seconds: list[float] = field(default_factory=list)
    error: str = ""

    def row(self) -> str:
        if not self.seconds:
            return f"| {self.what} | {self.store} | 0 | failed: {self.error} | | |"
        med = statistics.median(self.seconds)
        rate = f"{self.nbytes / 1e6 / med:.0f}" if self.nbytes and med > 0 else ""
        spread = f"{min(self.seconds):.2f}–{max(self.seconds):.2f}"
        note = f" (then failed: {self.error})" if self.error else ""
        return f"| {self.what} | {self.store} | {len(self.seconds)}{note} | {med:.2f} | {spread} | {rate} |"


def timed(timing: Timing, fn: Callable[..., object], *args: object, **kwargs: object) -> object:
    t0 = time.perf_counter()
    try:
        out = fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 -- a store that fails is reported in the table, not a traceback
        timing.error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
        print(f"  {timing.what} ({timing.store}) failed: {timing.error}", file=sys.stderr)
        return None
    timing.seconds.append(time.perf_counter() - t0)
    return out


def verify(path: Path) -> None:
    run = RunFile(path)
    try:
        problems = run.verify()
    finally:
        run.close()
    if problems:
        raise RuntimeError(f"{path}: {problems}")


def fetch(store: RemoteStore, run: str, dest: Path) -> Manifest:
    manifest = store.lookup(run)
    if manifest is None:
        raise RuntimeError(f"{store.url}: {run} is not published")
    store.fetch(manifest, dest)
    return manifest


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().strip()


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1000, help="steps of the synthetic run (1000: notebook scale)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--train-s",
        type=float,
        default=244.0,
        help="training time of one notebook-scale run, seconds (default 244: benchmarks/RESULTS.md, issue 5, "
        "`default` variant, 1 thread, '1000-step run (s)')",
    )
    parser.add_argument("--no-s3", action="store_true", help="only the file:// store")
    parser.add_argument("--workdir", default=os.environ.get("FLANNEL_BENCH_TMP"), help="where the temp folder goes")
    args = parser.parse_args()

    print(f"load average before: {loadavg()}")
    need = 4.5e9 if not args.no_s3 else 3e9
    free = shutil.disk_usage(args.workdir or tempfile.gettempdir()).free
    if free < need:
        raise SystemExit(f"needs about {need / 1e9:.1f} GB free in the temp folder, has {free / 1e9:.1f} GB")

    server = None
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="bench-store-") as d:
        work = Path(d)
        t0 = time.perf_counter()
        artifact = notebook_artifact(work, args.steps)
        size = artifact.stat().st_size
        print(f"artifact: {size / 1e6:.1f} MB written in {time.perf_counter() - t0:.1f} s")

        stores: dict[str, RemoteStore] = {"file://": RemoteStore(f"file://{work / 'filestore'}")}
        if not args.no_s3:
            from tests.s3server import start_server

            # moto keeps objects in spooled temporary files: let them spill into the temp folder, not memory
            server = start_server({"TMPDIR": str(work)})
            os.environ.update(server.env())
            bucket = server.new_bucket()
            stores = {"s3:// (moto, localhost)": RemoteStore(f"s3://{bucket}/runs"), **stores}

        timings: list[Timing] = []
        checks: dict[str, Timing] = {}
        for name, store in stores.items():
            checks[name] = Timing("check (session start)", name, 0)
            timed(checks[name], store.check)
        digest = Timing("file_digest (blake2b)", "local", size)
        per_store = {
            name: (Timing("publish", name, size), Timing("lookup + fetch", name, size), Timing("verify", name, size))
            for name in stores
        }
        published: dict[str, str] = {}
        try:
            for r in range(args.repeats):
                print(f"round {r + 1}/{args.repeats}: load {loadavg()}", file=sys.stderr)
                timed(digest, file_digest, artifact)
                for name, store in stores.items():
                    t_pub, t_fetch, t_verify = per_store[name]
                    if t_pub.error and not t_pub.seconds:
                        continue  # this store cannot take the object: nothing to fetch either
                    old = published.pop(name, None)
                    if old is not None:  # keep one object in the store at a time (untimed)
                        m = store.lookup(old)
                        store.remove(m.object) if m is not None else None
                        store.remove(store.manifest_path(old)[len(store.root) + 1 :])
                    run = f"bench-{r}-{hashlib.sha256(os.urandom(8)).hexdigest()[:8]}"
                    out = timed(
                        t_pub,
                        store.publish,
                        run,
                        "bench-key",
                        artifact,
                        session="bench",
                        material={},
                        numerics_class="bench",
                    )
                    if out is None:
                        continue
                    if not out[0]:  # type: ignore[index]
                        raise RuntimeError(f"{name}: {run} was not published by this round")
                    published[name] = run
                    dest = work / "downloads" / f"{run}.safetensors"
                    if timed(t_fetch, fetch, store, run, dest) is None:
                        continue
                    timed(t_verify, verify, dest)
                    dest.unlink(missing_ok=True)
        finally:
            moto_rss = peak_rss_mb(server.process.pid) if server is not None else None
            if server is not None:
                from tests.s3server import stop_server

                stop_server(server)
        timings = [digest, *checks.values()]
        for name in stores:
            timings.extend(per_store[name])
        after = loadavg()

    print()
    print(f"Artifact: {size / 1e6:.1f} MB ({args.steps + 1} steps of a 10,000 x 64 bf16 W); {args.repeats} repeats.")
    print()
    print("| step | store | repeats | median (s) | min–max (s) | MB/s (median) |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for t in timings:
        print(t.row())
    print()
    print(f"Per run, against training it ({args.train_s:.0f} s):")
    print()
    print("| store | publish (s) | publish / training | lookup + fetch + verify (s) | obtain / training |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name in stores:
        t_pub, t_fetch, t_verify = per_store[name]
        if not (t_pub.seconds and t_fetch.seconds and t_verify.seconds):
            print(f"| {name} | incomplete: see the table above | | | |")
            continue
        pub = statistics.median(t_pub.seconds)
        obtain = statistics.median(t_fetch.seconds) + statistics.median(t_verify.seconds)
        print(
            f"| {name} | {pub:.1f} | {100 * pub / args.train_s:.1f} % | {obtain:.1f} | "
            f"{100 * obtain / args.train_s:.1f} % |"
        )
    print()
    if moto_rss is not None:
        print(f"moto server peak RSS: {moto_rss:.0f} MB")
    print(f"load average after: {after}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
