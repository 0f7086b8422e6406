"""Speed and memory of `divergence.all_pairs` against the previous implementation, same run.

    python benchmarks/divergence.py [--runs R] [--steps S] [--vocab V] [--hidden H]
                                    [--workdir DIR] [--keep] [--order old,new]
    python benchmarks/divergence.py --paths a.safetensors b.safetensors ...   # existing artifacts

Without --paths it synthesizes R artifacts of S steps (default 10 x 1000, V=10000, H=64, bf16:
1.28 GB each) with `ArtifactWriter` in --workdir (deleted at the end unless --keep): a shared
random start W_0, then per run a bf16 random walk (every live token row moves by ~1e-3 per step,
dead rows never move). Run r follows run 0's walk exactly up to step r*S/(2R) and then its own,
so first divergent steps differ between pairs and some pairs agree for a while.

Each implementation runs in its own subprocess, so peak RSS (`ru_maxrss`) is its own:

* old: a frozen copy of the kernel `all_pairs` used before the positional-read rewrite
  (`_OldAllPairsKernel` below, reading rows through the memory-mapped view as `row()` then did),
  with torch's default intra-op threads;
* old-1t: the same with `torch.set_num_threads(1)` (its many small ops stall on the per-op
  barrier of the intra-op threads when another process holds a core: this is the baseline
  without that effect);
* new: `flannel_repro.analysis.divergence.all_pairs` (default threads).

Reported per implementation: wall seconds, seconds per step, CPU seconds of the process (user +
system: > wall means both cores were used), peak RSS, the share of the run files in the page
cache before the pass (mincore; pages there are not part of RSS unless mapped), CPU seconds used
by *other* processes on the machine during the pass (/proc/stat; it is shared), and whether the
results agree with the old implementation: bitwise for max_abs, rows_differ(_live) and
first_step, maximum relative difference for frobenius (its float64 sums are added in another
order). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GB = 1e9
MiB = 1 << 20
IMPLS = ("old", "old-1t", "new")


# --- the frozen baseline: the kernel as it was before the positional-read rewrite ---------------


def _old_all_pairs(readers: Sequence[Any]) -> dict[str, np.ndarray]:
    """`all_pairs` over all steps as before (per-step stack of mapped rows, per-i broadcast
    chunks, copy-to-float64 + square + sum); returns the arrays in combinations order."""
    import torch

    from flannel_repro.storage.layout import KEY_LIVE_MASK, KEY_W
    from flannel_repro.analysis.divergence import NEVER

    bits_of = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}

    def work_dtype(dtype: torch.dtype) -> torch.dtype:
        return torch.float32 if dtype.itemsize <= 2 else torch.float64

    def word_dtype(row_bytes: int) -> torch.dtype:
        for size in (8, 4, 2):
            if row_bytes % size == 0:
                return bits_of[size]
        return torch.uint8

    def read_step(t: int, out: torch.Tensor) -> torch.Tensor:
        rows = [r[KEY_W][t] for r in readers]  # what reader.row() returned then: a view of the map
        return torch.stack(rows, out=out)

    class _OldAllPairsKernel:
        _CHUNK_ELEMS = 1 << 17

        def __init__(self, R: int, vocab: int, hidden: int, dtype: torch.dtype, live: torch.Tensor) -> None:
            self.R, self.V, self.H = R, vocab, hidden
            self.work = work_dtype(dtype)
            self.word = word_dtype(hidden * dtype.itemsize)
            self.live = live
            self.cv = max(1, min(vocab, self._CHUNK_ELEMS // max(1, hidden)))
            self.step = torch.empty((R, vocab, hidden), dtype=dtype)
            self.x = torch.empty((R, vocab, hidden), dtype=self.work)
            self.d = torch.empty((R - 1, self.cv, hidden), dtype=self.work)
            self.d64 = torch.empty((R - 1, self.cv, hidden), dtype=torch.float64)
            words = (hidden * dtype.itemsize) // self.word.itemsize
            self.ne = torch.empty((R - 1, self.cv, words), dtype=torch.bool)
            self.starts = [i * (2 * R - i - 1) // 2 for i in range(R)]
            P = R * (R - 1) // 2
            self.max_abs = torch.empty(P, dtype=torch.float64)
            self.sumsq = torch.empty(P, dtype=torch.float64)
            self.rows = torch.empty(P, dtype=torch.int64)
            self.rows_live = torch.empty(P, dtype=torch.int64)

        def __call__(self, t: int) -> tuple[np.ndarray, ...]:
            w = read_step(t, self.step)
            self.x.copy_(w)
            bits = w.view(torch.uint8).view(self.word)
            for acc in (self.max_abs, self.sumsq, self.rows, self.rows_live):
                acc.zero_()
            for v0 in range(0, self.V, self.cv):
                v1 = min(self.V, v0 + self.cv)
                n = v1 - v0
                xc, bc, live = self.x[:, v0:v1], bits[:, v0:v1], self.live[v0:v1]
                for i in range(self.R - 1):
                    m, p = self.R - 1 - i, self.starts[i]
                    d = torch.sub(xc[i + 1 :], xc[i], out=self.d[:m, :n])
                    if n * self.H:
                        big = torch.maximum(d.amax(dim=(1, 2)), d.amin(dim=(1, 2)).neg_()).to(torch.float64)
                        cur = self.max_abs[p : p + m]
                        torch.maximum(cur, big, out=cur)
                        d64 = self.d64[:m, :n]
                        d64.copy_(d)
                        self.sumsq[p : p + m] += d64.square_().sum(dim=(1, 2))
                    ne = torch.ne(bc[i + 1 :], bc[i], out=self.ne[:m, :n])
                    differ = ne.any(dim=2)
                    self.rows[p : p + m] += differ.sum(dim=1)
                    self.rows_live[p : p + m] += (differ & live).sum(dim=1)
            return (
                self.max_abs.numpy().copy(),
                self.sumsq.sqrt().numpy(),
                self.rows.numpy().copy(),
                self.rows_live.numpy().copy(),
            )

    n, vocab, hidden = readers[0].spec(KEY_W).shape
    dtype = readers[0].spec(KEY_W).dtype
    live = readers[0].read(KEY_LIVE_MASK).clone()
    R = len(readers)
    P = R * (R - 1) // 2
    out = {
        k: np.zeros((P, n), dtype=np.float64 if k in ("max_abs", "frobenius") else np.int64)
        for k in ("max_abs", "frobenius", "rows_differ", "rows_differ_live")
    }
    kernel = _OldAllPairsKernel(R, vocab, hidden, dtype, live)
    for t in range(n):
        (out["max_abs"][:, t], out["frobenius"][:, t], out["rows_differ"][:, t], out["rows_differ_live"][:, t]) = (
            kernel(t)
        )
    first = np.full(P, NEVER, dtype=np.int64)
    for p in range(P):
        hits = np.flatnonzero(out["rows_differ"][p])
        if hits.size:
            first[p] = hits[0]
    out["first_step"] = first
    return out


# --- measurements --------------------------------------------------------------------------------


def _proc_bytes(path: str, key: str) -> int | None:
    """A 'Key:   N kB' field of a /proc file (status, meminfo), in bytes; None if absent."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _status_bytes(key: str) -> int | None:
    return _proc_bytes("/proc/self/status", key)


def _meminfo(key: str) -> int | None:
    return _proc_bytes("/proc/meminfo", key)


def _cpu_jiffies() -> tuple[int, int] | None:
    """(busy, total) jiffies of the whole machine."""
    try:
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return None
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    return sum(vals) - idle, sum(vals)


def resident_fraction(paths: Sequence[Path]) -> float | None:
    """Share of the files' pages in the page cache (mincore on a map that touches nothing)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        mincore = libc.mincore
    except (OSError, AttributeError):
        return None
    mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    resident = total = 0
    for p in paths:
        size = os.path.getsize(p)
        if not size:
            continue
        with open(p, "rb") as f:
            mm = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)
        try:
            anchor = ctypes.c_char.from_buffer(mm)
            pages = -(-size // mmap.PAGESIZE)
            vec = np.zeros(pages, dtype=np.uint8)
            rc = mincore(ctypes.addressof(anchor), size, vec.ctypes.data)
            del anchor
            if rc != 0:
                return None
            resident += int((vec & 1).sum())
            total += pages
        finally:
            mm.close()
    return resident / total if total else 1.0


def warm_page_cache(paths: Sequence[Path]) -> float:
    """Read the files once (positional reads into one buffer), so both passes start cached."""
    t0 = time.perf_counter()
    buf = bytearray(16 * MiB)
    view = memoryview(buf)
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            off = 0
            while True:
                got = os.preadv(fd, [view], off)
                if not got:
                    break
                off += got
        finally:
            os.close(fd)
    return time.perf_counter() - t0


# --- synthetic runs ------------------------------------------------------------------------------


def synthesize(workdir: Path, R: int, S: int, V: int, H: int, seed: int = 0) -> list[Path]:
    import torch

    from flannel_repro.storage.layout import write_run

    g = torch.Generator().manual_seed(seed)
    live = torch.rand(V, generator=g) < 0.8
    w0 = (0.02 * torch.randn(V, H, generator=g)).to(torch.bfloat16)
    # A bank of update directions (dead rows never move); each step adds one, scaled and signed by
    # the run's generator: a cheap random walk whose bf16 rounding differs from run to run.
    bank = [1e-3 * torch.randn(V, H, generator=g) * live[:, None] for _ in range(16)]
    paths = []
    B = 4
    for r in range(R):
        part = r * S // (2 * R) if r else S + 1  # run r follows run 0 exactly up to this step
        shared = torch.Generator().manual_seed(seed + 1)
        own = torch.Generator().manual_seed(seed + 1000 + r)
        config = {"vocab_size": V, "hidden_dim": H, "steps": S, "synthetic": True, "run": r}
        path = workdir / f"run{r:02d}.safetensors"

        def walk(part: int = part, shared: torch.Generator = shared, own: torch.Generator = own):
            cur = w0.clone()
            for t in range(S + 1):
                if t:
                    gen = shared if t <= part else own
                    k = int(torch.randint(0, len(bank), (1,), generator=gen))
                    scale = float(torch.rand(1, generator=gen)) * (1 if torch.rand(1, generator=gen) < 0.5 else -1)
                    cur = (cur.float() + scale * bank[k]).to(torch.bfloat16)
                yield cur

        write_run(path, walk(), steps=S, live_mask=live, config=config, batch_size=B)
        paths.append(path)
        print(
            f"  wrote {path.name} ({path.stat().st_size / GB:.2f} GB, parts from run 0 after step {min(part, S)})",
            file=sys.stderr,
            flush=True,
        )
    return paths


# --- child: one implementation, one process ------------------------------------------------------


def child(impl: str, paths: list[str], out: str) -> None:
    import torch

    from flannel_repro.storage.reader import ArtifactReader
    from flannel_repro.analysis.divergence import all_pairs

    readers = [ArtifactReader(p) for p in paths]
    rss0 = _status_bytes("VmRSS")
    jiff0 = _cpu_jiffies()
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    if impl.startswith("old"):
        if impl == "old-1t":
            torch.set_num_threads(1)  # the baseline without intra-op threads (no per-op barriers)
        res = _old_all_pairs(readers)
    else:
        ap = all_pairs(readers)
        res = {k: getattr(ap, k) for k in ("max_abs", "frobenius", "rows_differ", "rows_differ_live", "first_step")}
    wall = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    jiff1 = _cpu_jiffies()
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    hz = os.sysconf("SC_CLK_TCK")
    other = None if jiff0 is None or jiff1 is None else max(0.0, (jiff1[0] - jiff0[0]) / hz - cpu)
    np.savez(out, **res)
    print(
        json.dumps(
            {
                "wall_s": wall,
                "cpu_s": cpu,
                "other_cpu_s": other,
                "threads": torch.get_num_threads(),
                "maxrss_bytes": ru1.ru_maxrss * (1 if sys.platform == "darwin" else 1024),
                "rss_before_bytes": rss0,
                "hwm_bytes": _status_bytes("VmHWM"),
                "rss_file_bytes": _status_bytes("RssFile"),
                "rss_anon_bytes": _status_bytes("RssAnon"),
            }
        )
    )


def run_child(impl: str, paths: Sequence[Path], out: Path) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, "--child", impl, "--out", str(out), "--paths", *map(str, paths)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise SystemExit(f"{impl} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _same_float(a: np.ndarray, b: np.ndarray) -> bool:
    """Bitwise equal, except that any NaN equals any NaN (payloads carry no meaning here)."""
    nan = np.isnan(a)
    return bool(np.array_equal(nan, np.isnan(b)) and np.array_equal(a[~nan].view(np.uint64), b[~nan].view(np.uint64)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--vocab", type=int, default=10_000)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--paths", nargs="+", type=Path, help="existing run artifacts (skips synthesis)")
    ap.add_argument("--workdir", type=Path, default=None, help="where synthetic runs go (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic runs")
    ap.add_argument(
        "--order", default="old,old-1t,new", help=f"which implementations, in which order, from {', '.join(IMPLS)}"
    )
    ap.add_argument("--no-warm", action="store_true", help="do not read the files into the page cache first")
    ap.add_argument("--child", choices=IMPLS, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, [str(p) for p in args.paths], args.out)
        return

    import torch

    impls = [s.strip() for s in args.order.split(",") if s.strip()]
    cleanup: Path | None = None
    if args.paths:
        paths = list(args.paths)
    else:
        need = args.runs * (args.steps + 1) * args.vocab * args.hidden * 2
        base = args.workdir or Path(tempfile.gettempdir())
        base.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(base).free
        if free < need * 1.05:
            raise SystemExit(f"{base}: need {need / GB:.1f} GB for the runs, {free / GB:.1f} GB free.")
        workdir = Path(tempfile.mkdtemp(prefix="divbench-", dir=base))
        cleanup = None if args.keep else workdir
        print(f"synthesizing {args.runs} runs x {args.steps} steps ({need / GB:.1f} GB) in {workdir}", file=sys.stderr)
        t0 = time.perf_counter()
        paths = synthesize(workdir, args.runs, args.steps, args.vocab, args.hidden)
        print(f"  synthesis took {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    try:
        from flannel_repro.storage.layout import KEY_W
        from flannel_repro.storage.reader import ArtifactReader

        with ArtifactReader(paths[0]) as r:
            n, V, H = r.spec(KEY_W).shape
            dtype = r.spec(KEY_W).dtype
        R = len(paths)
        total = sum(p.stat().st_size for p in paths)
        lines = [
            f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
            f"MemTotal {(_meminfo('MemTotal') or 0) / GB:.1f} GB; torch {torch.__version__}, "
            f"{torch.get_num_threads()} intra-op threads",
            f"runs: {R} x {n} steps (0..{n - 1}) of W {V} x {H} {str(dtype).split('.')[-1]}, "
            f"{total / GB:.2f} GB in all; {R * (R - 1) // 2} pairs",
        ]
        cached0 = resident_fraction(paths)
        if not args.no_warm:
            avail = _meminfo("MemAvailable")
            if avail is None or avail > 1.2 * total:
                secs = warm_page_cache(paths)
                lines.append(
                    f"page cache: {100 * (cached0 or 0):.0f}% of the files cached at the start; "
                    f"read once to warm it ({secs:.1f} s)"
                )
            else:
                lines.append(
                    f"page cache: {100 * (cached0 or 0):.0f}% cached; files larger than available "
                    "memory, not warmed (passes read from disk)"
                )
        results: dict[str, dict] = {}
        arrays: dict[str, Any] = {}
        with tempfile.TemporaryDirectory() as tmp:
            for impl in impls:
                cached = resident_fraction(paths)
                cache_before = _meminfo("Cached")
                info = run_child(impl, paths, Path(tmp) / f"{impl}.npz")
                info["cached_before"] = cached
                info["page_cache_gb"] = None if cache_before is None else cache_before / GB
                results[impl] = info
                arrays[impl] = dict(np.load(Path(tmp) / f"{impl}.npz"))
                print(f"  {impl}: {info['wall_s']:.1f} s", file=sys.stderr, flush=True)

        agree: dict[str, str] = {}
        base = next((b for b in ("old", "old-1t") if b in arrays), None)
        for other_impl in [i for i in impls if i != base and base is not None]:
            o, nw = arrays[base], arrays[other_impl]
            ok = [f for f in ("rows_differ", "rows_differ_live", "first_step") if np.array_equal(o[f], nw[f])]
            bad = [f for f in ("rows_differ", "rows_differ_live", "first_step") if f not in ok]
            (ok if _same_float(o["max_abs"], nw["max_abs"]) else bad).append("max_abs")
            fin = np.isfinite(o["frobenius"]) & (o["frobenius"] != 0)
            rel = np.abs(nw["frobenius"][fin] - o["frobenius"][fin]) / o["frobenius"][fin]
            same_special = np.array_equal(np.isfinite(o["frobenius"]), np.isfinite(nw["frobenius"])) and np.array_equal(
                o["frobenius"][~fin & np.isfinite(o["frobenius"])], nw["frobenius"][~fin & np.isfinite(o["frobenius"])]
            )
            eps = np.finfo(np.float64).eps
            fields = "max_abs, rows_differ, rows_differ_live, first_step"
            worst = float(rel.max()) if rel.size else 0.0
            agree[other_impl] = (
                (f"bitwise equal: {fields}" if not bad else f"DIFFER: {', '.join(bad)}")
                + f"; frobenius max rel. diff {worst:.1e} ({worst / eps:.1f} eps)"
                + ("" if same_special else "; frobenius zeros/NaN/inf DIFFER")
            )
            agree[base] = "(baseline)"
        head = (
            "| implementation | wall (s) | s/step | CPU user+sys (s) | other processes' CPU (s) "
            "| peak RSS ru_maxrss (GB) | RSS before (GB) | files in page cache before | agreement |"
        )
        lines += ["", head, "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        for impl in impls:
            i = results[impl]
            cached = "?" if i["cached_before"] is None else f"{100 * i['cached_before']:.0f}%"
            other = "?" if i["other_cpu_s"] is None else f"{i['other_cpu_s']:.1f}"
            lines.append(
                f"| {impl} | {i['wall_s']:.1f} | {i['wall_s'] / n:.4f} | {i['cpu_s']:.1f} | {other} | "
                f"{i['maxrss_bytes'] / GB:.2f} | {(i['rss_before_bytes'] or 0) / GB:.2f} | {cached} | "
                f"{agree.get(impl, '')} |"
            )
        lines.append("")
        lines.append(
            "Peak RSS counts mapped file pages (the old path maps every step it reads) but not the page "
            "cache; the page cache held "
            + ", ".join(
                f"{results[i]['page_cache_gb']:.1f} GB before {i}"
                for i in impls
                if results[i]['page_cache_gb'] is not None
            )
            + " (system-wide 'Cached')."
        )
        print("\n".join(lines))
    finally:
        if cleanup is not None:
            shutil.rmtree(cleanup, ignore_errors=True)


if __name__ == "__main__":
    main()
