"""Training speed, side by side in one run: the notebook-faithful Trainer, the project's default
path and the faster variants, each on the same data and seed, each in its own subprocess.

    python benchmarks/speed.py [--steps 100] [--seed 42] [--variants ...] [--pair]
                               [--experiment] [--experiment-runs 10] [--experiment-steps 1000]
                               [--overhead] [--results benchmarks/RESULTS.md]

Per variant: train-loop steps/s, the wall time of a 1000-step run extrapolated from it, process
wall, user and system CPU seconds, minor page faults and peak RSS (from wait4's rusage of that
subprocess), and whether its W trajectory (every step's digest) and its losses are bitwise equal
to the notebook-faithful reference with the same thread count (threads change the arithmetic of
the BLAS and reduction kernels, so 1-thread and 2-thread runs are compared with their own
reference).

--pair       two default-path runs at once (seeds s, s+1), as the two xdist workers of `pytest -n 2`
             train them: with and without pinning each to its own CPU. Aggregate steps/s.
--experiment the real thing: `pytest tests/flannel6 -n auto --flannel-preset=full -k shared_W`
             (10 runs x 1000 steps, W recorded every step), fresh artifacts; wall, CPU, largest
             process's peak RSS; then seed s of it is compared bitwise with the Trainer trained at the
             same scale and thread count, and the pairwise divergence of all its runs is timed.
--overhead   the plugin's own cost on the CI-scale suite with every artifact already trained:
             collection, fixture setup and teardown (locking, artifact lookup) versus test bodies.

Everything printed is also appended, with the machine and the command, to --results.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# name: (RunConfig overrides, env, threads, what it is). 'notebook' is the notebook's own setup:
# the HF Trainer, glibc's malloc defaults, torch's default thread count (every core).
VARIANTS: dict[str, tuple[dict, dict, int, str]] = {
    "notebook": (
        {"engine": "hf"},
        {"FLANNEL_REPRO_MALLOC": "0"},
        0,
        "(a) HF Trainer as the notebook runs it: glibc defaults, all cores",
    ),
    "notebook-1t": (
        {"engine": "hf"},
        {"FLANNEL_REPRO_MALLOC": "0"},
        1,
        "(a') the same, 1 thread: reference for the 1-thread variants",
    ),
    "default": (
        {},
        {},
        1,
        "(b) default path of one `pytest -n auto` worker: lean loop, fused head, malloc tuned, 1 thread",
    ),
    "default-all-cores": ({}, {}, 0, "(b') default path in a single process (`pytest` without -n): all cores"),
    "hf-tuned": ({"engine": "hf"}, {}, 0, "(c) HF Trainer with the malloc tuning, all cores"),
    "reference-head": ({"head": "reference"}, {}, 1, "(c) lean loop with the model's own head, 1 thread"),
    "glibc-defaults": ({}, {"FLANNEL_REPRO_MALLOC": "0"}, 1, "(c) default path without the malloc tuning, 1 thread"),
    "compile": ({"compile": "default"}, {}, 1, "(c) torch.compile, 1 thread (not bitwise; opt-in)"),
}
DEFAULT_VARIANTS = list(VARIANTS)

CHILD = r"""
import json, sys, time
from flannel_repro.config import RunConfig
from flannel_repro.training.harness import train
spec = json.loads(sys.argv[1])
cfg = RunConfig.from_dict(spec["config"])
stamps = []
r = train(cfg, spec["out"], progress=lambda step, steps, loss: stamps.append(time.perf_counter()))
warm = min(10, len(stamps) // 2)  # steady state: after the first steps (compilation, warm-up, the head check)
steady = (len(stamps) - 1 - warm) / (stamps[-1] - stamps[warm]) if len(stamps) - 1 > warm else r.steps_per_s
print("RESULT " + json.dumps({"steps_per_s": steady, "overall_steps_per_s": r.steps_per_s, "train_s": r.wall_time_s,
                              "threads": r.threads, "final_loss": r.final_loss}))
"""


def machine() -> str:
    import torch
    import transformers

    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    isa = ", ".join(f for f in ("avx512_bf16", "amx_bf16") if f in flags) or "no bf16 ISA flags"
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{os.cpu_count()} x {cpu} ({isa}), {mem:.0f} GiB, Python {platform.python_version()}, "
        f"torch {torch.__version__}, transformers {transformers.__version__}"
    )


def spawn(argv: list[str], env: dict[str, str]) -> tuple[subprocess.Popen, float]:
    return subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO
    ), time.perf_counter()


def reap(proc: subprocess.Popen, t0: float) -> dict:
    """Wait for proc with wait4 (its rusage alone); parse its RESULT line."""
    _, status, ru = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    out, err = proc.stdout.read(), proc.stderr.read()
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f"{shlex.join(proc.args)} exited {code}:\n{err[-3000:]}")
    result = {}
    for line in out.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT ") :])
    result.update(
        wall_s=wall, user_s=ru.ru_utime, sys_s=ru.ru_stime, minflt=ru.ru_minflt, peak_rss_mb=ru.ru_maxrss / 1024
    )
    return result


def child_argv(config: dict, out: Path) -> list[str]:
    return [sys.executable, "-c", CHILD, json.dumps({"config": config, "out": str(out)})]


def child_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.update(extra)
    return env


def run_config(seed: int, steps: int, overrides: dict, threads: int) -> dict:
    from flannel_repro.config import RunConfig

    cfg = RunConfig().with_train_seed(seed).replace(steps=steps, threads=threads, **overrides)
    return cfg.to_dict()


def same_trajectory(a: Path, b: Path) -> str:
    """'yes' when every step's W digest and every loss are bitwise equal, else where they part."""
    import torch

    from flannel_repro.analysis.trajectory import Trajectory

    ta, tb = Trajectory(a), Trajectory(b)
    try:
        da, db = ta.digests, tb.digests
        if da.shape != db.shape:
            return f"no (shapes {tuple(da.shape)} vs {tuple(db.shape)})"
        differ = (da != db).any(dim=1).nonzero().flatten()
        if differ.numel():
            return f"no (W parts at step {int(differ[0])})"
        la, lb = ta.losses[1:].view(torch.int32), tb.losses[1:].view(torch.int32)
        if not torch.equal(la, lb):
            return f"no (losses part at step {int((la != lb).nonzero()[0]) + 1})"
        return "yes"
    finally:
        ta.close()
        tb.close()


def side_by_side(args: argparse.Namespace, work: Path, lines: list[str]) -> None:
    results: dict[str, dict] = {}
    for name in args.variants:
        overrides, env, threads, _ = VARIANTS[name]
        out = work / f"{name}.safetensors"
        proc, t0 = spawn(child_argv(run_config(args.seed, args.steps, overrides, threads), out), child_env(env))
        results[name] = reap(proc, t0) | {"path": out, "threads_asked": threads}
        print(f"  {name}: {results[name]['steps_per_s']:.2f} steps/s", flush=True)
    base = results.get("notebook")
    lines += [
        f"Command: `python benchmarks/speed.py {' '.join(args.argv)}`",
        "",
        f"{args.steps} steps of the default config (10,000-token vocabulary, batch 32, seq 128, bf16, correct labels), "
        f"training seed {args.seed}, embedded data, W recorded every step, one subprocess per variant, run one after another.",
        "",
        "| variant | threads | steps/s (steady) | steps/s (whole run) | x notebook | 1000-step run (s) | 10-run experiment (min) | wall (s) | user (s) | sys (s) | "
        "minor faults | peak RSS (MB) | bitwise = reference |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, r in results.items():
        threads = r["threads"]
        ref_name = "notebook" if threads == results.get("notebook", {}).get("threads") else "notebook-1t"
        ref = results.get(ref_name)
        same = (
            "(reference)"
            if name == ref_name
            else (same_trajectory(r["path"], ref["path"]) + f" vs {ref_name}" if ref is not None else "n/a")
        )
        per_run = 1000 / r["steps_per_s"]
        parallel = max(1, (os.cpu_count() or 1) // threads)  # runs that fit side by side on the cores
        experiment_min = 10 * per_run / parallel / 60
        speedup = f"{r['steps_per_s'] * parallel / base['steps_per_s']:.2f}" if base else "n/a"
        lines.append(
            f"| {name} | {threads} | {r['steps_per_s']:.2f} | {r['overall_steps_per_s']:.2f} | {speedup} | {per_run:.0f} | {experiment_min:.1f} | "
            f"{r['wall_s']:.1f} | {r['user_s']:.1f} | {r['sys_s']:.1f} | {r['minflt']:,} | {r['peak_rss_mb']:.0f} | {same} |"
        )
    lines += [
        "",
        "Variants: " + "; ".join(f"`{n}` {VARIANTS[n][3]}" for n in results) + ".",
        "Steady steps/s times the train loop after its first 10 steps (compilation, warm-up and the fused head's one-time check fall before); whole-run steps/s includes them. 'x notebook' is aggregate throughput on this machine: steps/s times the runs that fit side by side "
        "(cores / threads), over the notebook's steps/s. The 1000-step and 10-run columns extrapolate the "
        "measured rate (train loop only) and assume that perfect side-by-side scaling; `--pair` and "
        "`--experiment` measure it.",
        "",
    ]


def pair(args: argparse.Namespace, work: Path, lines: list[str]) -> None:
    rows = []
    for pinned in (False, True):
        procs = []
        for i in range(2):
            seed = args.seed + i
            out = work / f"pair-{int(pinned)}-{seed}.safetensors"
            argv = child_argv(run_config(seed, args.steps, {}, 1), out)
            if pinned:
                argv = ["taskset", "-c", str(sorted(os.sched_getaffinity(0))[i])] + argv
            procs.append(spawn(argv, child_env({})))
        t0 = time.perf_counter()
        res = [reap(p, t) for p, t in procs]
        wall = time.perf_counter() - t0
        rows.append((pinned, res, wall))
    lines += [
        f"Two default-path runs at once ({args.steps} steps, seeds {args.seed} and {args.seed + 1}, 1 thread each), "
        "as the two workers of `pytest -n 2`:",
        "",
        "| placement | steps/s run 1 | steps/s run 2 | aggregate steps/s | peak RSS (MB) |",
        "|---|---:|---:|---:|---:|",
    ]
    for pinned, res, _ in rows:
        agg = sum(r["steps_per_s"] for r in res)
        lines.append(
            f"| {'each pinned to its own CPU (what the plugin does)' if pinned else 'unpinned'} | "
            f"{res[0]['steps_per_s']:.2f} | {res[1]['steps_per_s']:.2f} | {agg:.2f} | "
            f"{max(r['peak_rss_mb'] for r in res):.0f} |"
        )
    lines.append("")


def experiment(args: argparse.Namespace, work: Path, lines: list[str]) -> None:
    import resource

    artifacts = work / "experiment"
    argv = [
        sys.executable,
        "-m",
        "pytest",
        "tests/flannel6/test_determinism.py",
        "-n",
        "auto",
        "-q",
        "-p",
        "no:cacheprovider",
        "--flannel-preset=full",
        f"--flannel-runs={args.experiment_runs}",
        f"--flannel-steps={args.experiment_steps}",
        f"--flannel-artifacts={artifacts}",
        "--flannel-fresh",
        "--flannel-progress=60",
        "-k",
        "shared_W",
    ]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(argv, cwd=REPO, env=child_env({}), capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    tail = "\n".join(proc.stdout.strip().splitlines()[-3:])
    print(proc.stdout[-4000:], proc.stderr[-2000:], flush=True)
    if proc.returncode != 0:
        raise RuntimeError(f"experiment failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    runs = sorted(artifacts.glob("seed*-r0-*.safetensors"))
    total_steps = args.experiment_runs * args.experiment_steps
    lines += [
        f"Command: `{shlex.join(argv[2:])}` (`python -m pytest` run by `benchmarks/speed.py --experiment`)",
        "",
        "| runs x steps | wall (min) | aggregate steps/s | user (s) | sys (s) | largest process's peak RSS (MB) | result |",
        "|---|---:|---:|---:|---:|---:|---|",
        f"| {args.experiment_runs} x {args.experiment_steps} | {wall / 60:.1f} | {total_steps / wall:.2f} | "
        f"{after.ru_utime - before.ru_utime:.0f} | {after.ru_stime - before.ru_stime:.0f} | {after.ru_maxrss / 1024:.0f} | "
        f"{tail.splitlines()[-1] if tail else '?'} |",
        "",
    ]
    seed_run = next((p for p in runs if p.name.startswith(f"seed{args.seed}-")), None)
    if seed_run is not None and args.experiment_reference:
        ref = work / "experiment-reference-hf.safetensors"
        from flannel_repro.analysis.trajectory import Trajectory

        cfg = Trajectory(seed_run).config.replace(engine="hf", threads=1, head="auto").to_dict()
        proc_ref, t_ref = spawn(child_argv(cfg, ref), child_env({"FLANNEL_REPRO_MALLOC": "0"}))
        r = reap(proc_ref, t_ref)
        lines += [
            f"Seed {args.seed} of the experiment against the notebook-faithful Trainer (engine hf, glibc defaults, "
            f"1 thread like each worker) trained at the same scale: bitwise equal: **{same_trajectory(seed_run, ref)}** "
            f"(the Trainer took {r['train_s']:.0f} s, {r['steps_per_s']:.2f} steps/s, peak RSS {r['peak_rss_mb']:.0f} MB).",
            "",
        ]
    if len(runs) >= 2:
        from flannel_repro.analysis.divergence import all_pairs

        t0 = time.perf_counter()
        res = all_pairs(runs)
        took = time.perf_counter() - t0
        size = sum(p.stat().st_size for p in runs) / 1e9
        lines += [
            f"Pairwise divergence of the experiment (`all_pairs`, {len(runs)} runs, {len(res.pairs)} pairs x "
            f"{len(res.steps)} steps, {size:.1f} GB of artifacts): {took:.1f} s; final ‖ΔW‖_F from "
            f"{res.frobenius[:, -1].min():.2f} to {res.frobenius[:, -1].max():.2f}.",
            "",
        ]


def overhead(args: argparse.Namespace, work: Path, lines: list[str]) -> None:
    artifacts = work / "overhead"
    plugin_dir = Path(__file__).resolve().parent
    base = [
        sys.executable,
        "-m",
        "pytest",
        "tests/flannel6",
        "-p",
        "no:xdist",
        "-p",
        "no:cacheprovider",
        "-q",
        "-p",
        "_phase_timer",
        f"--flannel-artifacts={artifacts}",
    ]
    env = child_env({"PYTHONPATH": os.pathsep.join([str(plugin_dir), os.environ.get("PYTHONPATH", "")])})
    phases = []
    for label in ("first session (trains)", "second session (all reused)"):
        report = work / f"phases-{len(phases)}.json"
        env["FLANNEL_PHASE_REPORT"] = str(report)
        proc = subprocess.run(base, cwd=REPO, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"overhead run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        phases.append((label, json.loads(report.read_text())))
    imports = subprocess.run(
        [
            sys.executable,
            "-c",
            "import time; t=time.perf_counter(); import torch, transformers, "
            "flannel_repro.training.harness; from transformers import GPT2LMHeadModel, Trainer; print(time.perf_counter()-t)",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    lines += [
        f"Command: `{shlex.join(base[2:-1])}` twice, timed by `benchmarks/_phase_timer.py` (the CI-scale suite: "
        "4 seeds x 20 steps).",
        "",
        "| session | total (s) | collection (s) | fixture setup (s) | test bodies (s) | of which run lookup/training: `obtain` (s, calls) | teardown (s) | plugin overhead (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, p in phases:
        plugin_s = p["collect"] + p["setup"] + p["teardown"] + (p["obtain"] if "reused" in label else 0.0)
        lines.append(
            f"| {label} | {p['total']:.2f} | {p['collect']:.2f} | {p['setup']:.2f} | {p['call']:.2f} | "
            f"{p['obtain']:.2f} ({p['obtain_calls']}) | {p['teardown']:.2f} | "
            f"{plugin_s:.2f}{'' if 'reused' in label else ' + training'} |"
        )
    lines += [
        "",
        f"For scale: importing torch, transformers and the harness takes {float(imports.stdout):.2f} s in a "
        "fresh interpreter (paid during collection, by any test suite that uses torch). Plugin overhead = collection "
        "+ fixture setup + teardown + (in the reused session) every `obtain` call: run keys, locks, store lookups, "
        "opening artifacts. The rest of the test bodies is the claims' own divergence arithmetic.",
        "",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--variants", nargs="*", default=DEFAULT_VARIANTS, choices=list(VARIANTS))
    ap.add_argument("--pair", action="store_true")
    ap.add_argument("--experiment", action="store_true")
    ap.add_argument("--experiment-runs", type=int, default=10)
    ap.add_argument("--experiment-steps", type=int, default=1000)
    ap.add_argument(
        "--no-experiment-reference",
        dest="experiment_reference",
        action="store_false",
        help="skip training the Trainer at experiment scale for the bitwise check",
    )
    ap.add_argument("--overhead", action="store_true")
    ap.add_argument("--workdir", type=Path, default=None, help="where artifacts go (default: a temp dir, removed)")
    ap.add_argument("--results", type=Path, default=None, help="append the tables to this markdown file")
    args = ap.parse_args()
    args.argv = sys.argv[1:]
    work_ctx = tempfile.TemporaryDirectory(prefix="flannel-speed-") if args.workdir is None else None
    work = Path(work_ctx.name) if work_ctx else args.workdir
    work.mkdir(parents=True, exist_ok=True)
    lines = [f"### benchmarks/speed.py, {time.strftime('%Y-%m-%d %H:%M')}", "", f"Machine: {machine()}.", ""]
    try:
        if args.variants:
            side_by_side(args, work, lines)
        if args.pair:
            pair(args, work, lines)
        if args.experiment:
            experiment(args, work, lines)
        if args.overhead:
            overhead(args, work, lines)
    finally:
        text = "\n".join(lines) + "\n"
        print(text)
        if args.results is not None:
            with open(args.results, "a", encoding="utf-8") as f:
                f.write("\n" + text)
        if work_ctx is not None:
            work_ctx.cleanup()


if __name__ == "__main__":
    main()
