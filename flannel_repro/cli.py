"""Command line: derive divergence bounds, export to the notebook's file, compare runs.

    flannel-repro bounds [--preset ci|full|notebook | --config FILE] [--artifacts DIR] [--name NAME]
    flannel-repro export-notebook RUN.safetensors [RUN ...] -o OUT.safetensors
    flannel-repro divergence RUN.safetensors [RUN ...] [--csv]
    flannel-repro digests RUN.safetensors [-o CHAIN.json | --compare CHAIN.json]
    flannel-repro info RUN.safetensors
    flannel-repro numerics
    flannel-repro noise [--preset ci | --config FILE] [--seeds 42-45] [--variants PATH:THREADS,...] [-o FILE]
    flannel-repro prune [--artifacts DIR] [--dry-run]
    flannel-repro verify RUN.safetensors [RUN ...]
    flannel-repro oplog RUN.safetensors --step K -o LOG.json
    flannel-repro why A B [--step K]     (A, B: two run artifacts, or two op logs)
    flannel-repro sources [--preset ci | --config FILE] [--seed 42 --other 43] [--sources a,b] [--json]
    flannel-repro report RUN_OR_DIR [...] [-o DIR] [--json]    (plots: needs the 'report' extra, matplotlib)
    flannel-repro --version

Exit codes: 0 done (or: identical, all verified); 1 the result is negative (`digests --compare`: the
run parts from the chain; `verify`: an artifact failed; `why`: the runs differ); 2 usage error (an option or argument);
3 input error (a file that is missing, unreadable, corrupt or inconsistent: the message names it, what
was expected and what was got); 4 internal error (a bug: set FLANNEL_REPRO_TRACEBACK=1 to see the
traceback, and please report it); 130 interrupted. Every error is one line on stderr, never a traceback.

Commands that write a file (-o) refuse one of their inputs or a run artifact as the output, and an existing
file of another kind unless --force (exit 2).

Commands that read run artifacts verify them first (`RunFile.verify`: tensor dtypes and shapes against
the config, the config against the run key, every step's W rehashed against its digest) and refuse one
that fails; `--no-verify` skips that (a notebook-scale run rehashes 1.28 GB: see benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Callable

from flannel_repro.version import __version__
from flannel_repro.config import MAX_THREADS, NUMERICS, PRESETS, ExperimentConfig
from flannel_repro.errors import ConfigError, FlannelError, UsageError

EXIT_OK, EXIT_NEGATIVE, EXIT_USAGE, EXIT_INPUT, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130


def _print_json(value: object) -> None:
    """Machine-readable output of a command (--json): one JSON document on stdout; NaN becomes null."""
    import json

    def clean(x: object) -> object:
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {str(k): clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    print(json.dumps(clean(value), indent=2, sort_keys=True, allow_nan=False))


def _runs(args: argparse.Namespace, paths: list[str]) -> list[Path]:
    """The run artifacts named on the command line, verified unless --no-verify (ArtifactError on the first
    that fails)."""
    from flannel_repro.storage.run import RunFile

    out = [Path(p) for p in paths]
    if not getattr(args, "no_verify", False):
        for path in out:
            run = RunFile(path)
            try:
                run.require_verified()
            finally:
                run.close()
    return out


def _experiment(args: argparse.Namespace) -> ExperimentConfig:
    if args.config:
        return ExperimentConfig.from_toml(args.config)
    return PRESETS[args.preset]()


def _same_file(a: Path, b: str | Path) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)  # hard links
    except OSError:
        return False


def _json_format(path: Path) -> object:
    """The "format" field of a JSON file (None when it is no JSON object, or over 256 MB)."""
    import json

    try:
        if path.stat().st_size > 256 * 2**20:
            return None
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    return data.get("format") if isinstance(data, dict) else None


def _safetensors_format(path: Path) -> object:
    from flannel_repro.storage.layout import header_metadata

    meta = header_metadata(path)
    return meta.get("format") if isinstance(meta, dict) else None


def _output(args: argparse.Namespace, raw: str, inputs: list[str], kind: str, is_kind: Callable[[Path], bool], *,
            option: str = "-o", files: tuple[str, ...] = ()) -> Path:
    """The path a command writes (`files` in it when it is a folder), refused with a UsageError (exit 2) when
    it is one of the command's inputs or a run artifact, or an existing file that is not a `kind` (unless
    --force). Every command that writes a file checks its output here, before any work."""
    from flannel_repro.storage.layout import RUN_FORMAT

    out = Path(raw)
    targets = [out / name for name in files] or [out]
    for item in inputs:
        for target in {out, *targets}:
            if _same_file(target, item):
                raise UsageError(f"{option} {raw}: expected an output path that is none of the command's inputs, "
                                 f"got the input {item}; write it elsewhere.")
    for target in [out, *targets] if files else targets:
        if not target.exists() or target.is_dir():
            continue  # a folder in the way is the writer's to report
        if not target.is_file():
            raise UsageError(f"{option} {raw}: expected a new file or a {kind} to replace, got {target}, which is "
                             "not a regular file (a FIFO or a device).")
        if _safetensors_format(target) == RUN_FORMAT:
            raise UsageError(f"{option} {raw}: expected a new file or a {kind} to replace, got the run artifact "
                             f"{target}; a run artifact is never overwritten.")
        if target in targets and not getattr(args, "force", False) and not is_kind(target):
            raise UsageError(f"{option} {raw}: expected a new file or a {kind} to replace, got {target}, a file of "
                             "another kind; pass --force to replace it.")
    return out


def cmd_bounds(args: argparse.Namespace) -> int:
    """Train (or reuse) the runs the Flannel 6 claims compare and print a bounds.toml table."""
    from flannel_repro.analysis.bounds import measure_bound, to_toml
    from flannel_repro.training.store import RunStore

    exp = _experiment(args)
    if args.threads:
        exp = exp.replace(run=exp.run.replace(threads=args.threads))
    store = RunStore(args.artifacts)
    seeds = exp.train_seeds
    if len(seeds) < 2 and not args.compare_seeds:
        raise ConfigError(f"bounds: expected at least two training seeds or --compare-seeds, got seeds {list(seeds)}.")
    base = seeds[0]
    others: tuple[int, ...] = seeds[1:]
    if args.compare_seeds:
        from flannel_repro.config import parse_seeds

        try:
            others = parse_seeds(args.compare_seeds)
        except ValueError as exc:
            raise ConfigError(f"--compare-seeds: {exc}") from None

    def obtain(cfg):  # noqa: ANN001, ANN202
        print(f"  run model_seed={cfg.model_seed} data_seed={cfg.data_seed} ...", file=sys.stderr, flush=True)
        return store.obtain(cfg).trajectory

    def discard(traj):  # noqa: ANN001, ANN202
        path = Path(traj.path)
        traj.close()
        for p in (path, Path(str(path) + ".lock")):
            p.unlink(missing_ok=True)

    # limits at the nominal false-alarm rate per claim and clean session, split over the experiment's claim seeds
    bound = measure_bound(exp.run, base, others, obtain, log=lambda line: print("  " + line, file=sys.stderr),
                          done_with=discard if args.discard_compared else None, comparisons=exp.n_runs)
    if args.json:
        import dataclasses

        _print_json({"name": args.name, **dataclasses.asdict(bound)})
        return EXIT_OK
    print(to_toml(args.name, bound))
    return EXIT_OK


def cmd_info(args: argparse.Namespace) -> int:
    """One run at a glance: config, losses and the update statistics per step (the bf16 stall diagnostic).

    In pure bf16 most Adam updates late in training are below half a bf16 ulp of the weight and are
    lost: the share of W's entries that change falls towards 0 although the optimizer still runs (see
    README, "The bf16 stall").
    """
    import numpy as np

    from flannel_repro.analysis.stall import stall_profile
    from flannel_repro.analysis.trajectory import Trajectory

    traj = Trajectory(args.run)
    if not args.no_verify:
        traj.require_verified()
    c = traj.config
    profile = stall_profile(traj) if traj.has_W else None
    fraction = profile.changed if profile is not None else None
    steps = sorted({s for s in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, c.steps) if s <= c.steps})
    stalled = profile.stalled_at() if profile is not None else None
    if args.json:
        _print_json({"run": str(traj.path), "label": traj.label, "config": c.to_dict(), "fingerprint": c.fingerprint(),
                     "threads": traj.metadata.get("threads"), "steps_per_s": traj.steps_per_s,
                     "wall_time_s": traj.wall_time_s, "numerics_class": (traj.env.get("numerics") or {}).get("class"),
                     "steps": [{"step": s, "loss": float(traj.losses[s]),
                                "W_changed_fraction": None if fraction is None else float(fraction[s]),
                                "lost_fraction": None if profile is None else float(profile.lost[s]),
                                "second_moment_moved_fraction": None if profile is None
                                else float(profile.second_moment_moved[s])} for s in steps],
                     "mean_W_changed_fraction": None if fraction is None else float(np.nanmean(fraction)),
                     "stalled_at": stalled,
                     "digest_first": traj.digest_hex(0), "digest_last": traj.digest_hex(c.steps)})
        return EXIT_OK
    print(f"{traj.path.name}: {traj.label}, {c.steps} steps, dtype {c.dtype}, labels {c.label_mode}")
    print(f"  config {c.fingerprint()}, threads {traj.metadata.get('threads', '?')}, "
          f"{traj.steps_per_s:.2f} steps/s, wall {traj.wall_time_s:.1f} s")
    print(f"  {'step':>6} {'loss':>10} {'W entries changed':>18} {'updates lost':>13} {'Adam v moved':>13}")

    def pct(x: float | None) -> str:
        return "n/a" if x is None or math.isnan(x) else f"{100 * x:.3f}%"

    for s in steps:
        row = profile.at(s) if profile is not None else {}
        print(f"  {s:>6} {float(traj.losses[s]):>10.5f} {pct(row.get('changed')):>18} {pct(row.get('lost')):>13} "
              f"{pct(row.get('second_moment_moved')):>13}")
    if fraction is not None:
        print(f"  mean over all steps: {100 * float(np.nanmean(fraction)):.3f}% of entries changed per step; "
              + (f"stalled at step {stalled} (under 1% changed per step, mean of 10 steps)" if stalled is not None
                 else "no stall (never under 1% changed per step, mean of 10 steps)"))
    print(f"  digest step 0: {traj.digest_hex(0)[:16]}  step {c.steps}: {traj.digest_hex(c.steps)[:16]}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from flannel_repro.storage.export import NOTEBOOK_FORMAT, export_notebook

    _output(args, args.output, list(args.runs), "notebook-layout file (.safetensors)",
            lambda p: _safetensors_format(p) == NOTEBOOK_FORMAT)
    out = export_notebook(_runs(args, args.runs), Path(args.output))
    if args.json:
        _print_json({"output": str(out), "runs": list(args.runs), "bytes": out.stat().st_size})
        return EXIT_OK
    print(out)
    return 0


def cmd_divergence(args: argparse.Namespace) -> int:
    from flannel_repro.analysis.divergence import all_pairs

    result = all_pairs(_runs(args, args.runs))
    if args.csv:
        import csv

        writer = csv.writer(sys.stdout, lineterminator="\n")
        fields = ("frobenius", "frobenius_live", "max_abs", "rows_differ", "rows_differ_live")
        writer.writerow(["a", "b", "step", *fields])
        for p, (i, j) in enumerate(result.pairs.tolist()):
            for k, step in enumerate(result.steps.tolist()):
                writer.writerow([args.runs[i], args.runs[j], step,
                                 *(_csv_number(getattr(result, f)[p, k]) for f in fields)])
        return EXIT_OK
    if args.json:
        _print_json({"runs": list(args.runs), **result.summary()})
        return EXIT_OK
    for key, value in result.summary().items():
        print(f"{key}: {value}")
    return 0


def _csv_number(x: object) -> object:
    """A CSV cell: integers as they are, floats by repr (round-trips exactly), NaN and inf empty."""
    import numpy as np

    if isinstance(x, (int, np.integer)):
        return int(x)
    v = float(x)  # type: ignore[arg-type]
    return repr(v) if math.isfinite(v) else ""


def cmd_report(args: argparse.Namespace) -> int:
    """Plots, a page (HTML and Markdown), a JSON document and CSV files for run artifacts (see README, "See it")."""
    from flannel_repro.report import write_report
    from flannel_repro.report.schema import FORMAT

    _output(args, args.output, list(args.runs), "file of a report folder",
            lambda p: _json_format(p.parent / "report.json") == FORMAT,
            files=("index.html", "report.md", "report.json", "divergence.csv", "steps.csv"))
    result = write_report(args.runs, args.output, verify=not args.no_verify)
    summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary:  # on GitHub Actions: the tables in the job's summary page
        from flannel_repro.report import step_summary

        with open(summary, "a", encoding="utf-8") as f:
            f.write(step_summary(result))
    if args.json:
        _print_json(result.document)
        return EXIT_OK
    doc = result.document
    print(f"report: {result.page} ({len(doc['figures'])} plots, {len(doc['runs'])} runs, "
          f"{sum(c['n_pairs'] for c in doc['pair_classes'])} pairs) in {result.seconds:.1f} s")
    for f in doc["figures"]:
        print(f"  {f['file']}: {f['shows']}")
    return EXIT_OK


def cmd_digests(args: argparse.Namespace) -> int:
    """Write a run's per-step digest chain, or report where the run parts from a stored chain (exit 1)."""
    import json

    from flannel_repro.analysis.summary import CHAIN_FORMAT, DigestChain, compare_run_to_chain
    from flannel_repro.analysis.trajectory import Trajectory

    if args.output:
        _output(args, args.output, [args.run], "digest chain (JSON)", lambda p: _json_format(p) == CHAIN_FORMAT)
    traj = Trajectory(args.run)
    traj.require_verified()  # the stored digests are checked against W before anyone trusts them
    if args.compare:
        result, lines = compare_run_to_chain(traj, args.compare)
        if args.json:
            _print_json({"run": args.run, "chain": args.compare, "identical": result.identical,
                         "first_step": result.first_step, "report": lines})
            return 0 if result.identical else 1
        print(f"{args.run} vs {args.compare}: {lines[0]}")
        for line in lines[1:]:
            print(line)
        return 0 if result.identical else 1
    chain = DigestChain.from_run(traj)
    if args.output:
        chain.write(args.output)
        print(f"{args.output}: {len(chain)} digests (steps 0..{chain.steps}) of {traj.label}")
    else:
        print(json.dumps(chain.to_json(), indent=2, sort_keys=True))
    return 0


def cmd_numerics(args: argparse.Namespace) -> int:
    """This process's numerics class on CPU in a mode (native, portable, avx512bf16), and what the probe saw."""
    import json

    from flannel_repro.training.numerics import apply, machine_line, numerics_info

    apply(args.mode)
    info = numerics_info("cpu", threads=args.threads, deterministic=False, mode=args.mode)
    if args.json:
        _print_json({"mode": args.mode, "threads": args.threads, "machine": machine_line(), **info})
        return EXIT_OK
    print(f"{info['class']}  ({args.mode}, {args.threads} thread(s), {machine_line()})")
    for key, value in info.get("probe", {}).items():
        print(f"  {key}: {value}")
    if info.get("env"):
        print(f"  environment: {json.dumps(info['env'], sort_keys=True)}")
    return 0


def cmd_noise(args: argparse.Namespace) -> int:
    """Measure a noise band: train the seeds under arithmetic variants and write how far each summary
    field moves (see flannel_repro.analysis.noise and flannel_repro.training.variants)."""
    import json

    from flannel_repro.analysis.noise import BANDS_FORMAT, write_bands
    from flannel_repro.training.variants import derive_from_training, parse_variants
    from flannel_repro.config import MAX_SEED, MAX_SEEDS, parse_seeds

    if args.output:
        _output(args, args.output, [p for p in (args.config, args.artifacts) if p], "noise-bands file (JSON)",
                lambda p: _json_format(p) == BANDS_FORMAT)
    exp = _experiment(args)
    try:
        seeds = parse_seeds(args.seeds) if args.seeds else None
    except ValueError:
        raise UsageError(f"--seeds: expected seeds like '42-45' or '42,43' (a range low-high with low <= high; at most "
                         f"{MAX_SEEDS} distinct seeds in 0..{MAX_SEED}), got {args.seeds!r}.") from None
    seeds = seeds or exp.train_seeds
    reference = parse_variants(args.reference)[0]
    variants = parse_variants(args.variants)
    command = "flannel-repro " + " ".join(args.raw_argv)  # raw_argv starts with the subcommand
    print(f"noise band: {len(seeds)} seed(s) x {1 + len(variants)} arithmetic variants, {exp.run.steps} steps",
          file=sys.stderr, flush=True)
    band = derive_from_training(exp.run, seeds, variants, reference, Path(args.artifacts), margin=args.margin,
                                command=command, log=sys.stderr)
    print(f"scale {band.scale}: digest chains exact through step {band.exact_through}; "
          f"{sum(len(v) for v in band.fields.values())} field(s) with a nonzero band", file=sys.stderr)
    if args.output:
        write_bands(args.output, [band])
        if args.json:
            _print_json({"output": str(args.output), "band": band.to_json()})
        else:
            print(f"{args.output}: band for scale {band.scale}")
    else:  # the band itself is JSON
        print(json.dumps(band.to_json(), indent=2, sort_keys=True))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Verify run artifacts from their bytes; one line per run, exit 1 when any fails."""
    from flannel_repro.errors import ArtifactError
    from flannel_repro.storage.run import RunFile

    failed = 0
    rows = []
    for path in args.runs:
        try:
            run = RunFile(path)
        except ArtifactError as exc:
            problems = [str(exc).removeprefix(f"{path}: ")]
        else:
            try:
                problems = run.verify()
            finally:
                run.close()
        failed += bool(problems)
        rows.append({"run": path, "ok": not problems, "problems": problems})
        if not args.json:
            print(f"{path}: {'FAILED: ' + '; '.join(problems) if problems else 'ok'}")
    if args.json:
        _print_json({"runs": rows, "verified": len(args.runs) - failed, "total": len(args.runs)})
    else:
        print(f"{len(args.runs) - failed} of {len(args.runs)} verified")
    return EXIT_NEGATIVE if failed else EXIT_OK


def cmd_oplog(args: argparse.Namespace) -> int:
    """Replay a run to a step and write every operation of that step (a few hundred kB of JSON)."""
    from flannel_repro.analysis.oplog import OPLOG_FORMAT
    from flannel_repro.storage.run import RunFile
    from flannel_repro.training.replay import record_step

    _output(args, args.output, [args.run], "op log (JSON)", lambda p: _json_format(p) == OPLOG_FORMAT)
    run = RunFile(args.run).require_verified()
    config = run.config
    if not 1 <= args.step <= config.steps:
        run.close()
        raise ConfigError(f"--step must be in 1..{config.steps} (the run's steps), got {args.step}.")
    before = run.digest_hex(args.step - 1)
    run.close()
    log, _ = record_step(config, args.step, expect_W_before=before, label=Path(args.run).name)
    log.write(args.output)
    if args.json:
        _print_json({"output": str(args.output), "operations": len(log.ops), "step": args.step, "label": log.label,
                     "numerics_class": log.env["numerics_class"]})
        return EXIT_OK
    print(f"{args.output}: {len(log.ops)} operations of step {args.step} of {log.label} ({log.env['numerics_class']})")
    return EXIT_OK


def cmd_why(args: argparse.Namespace) -> int:
    """Why two runs part: the first divergent operation (exit 1 when they differ)."""
    from flannel_repro.analysis.oplog import OpLog, compare_logs
    from flannel_repro.training.replay import first_divergent_operation

    logs = [p.endswith(".json") for p in (args.a, args.b)]
    if all(logs):
        diff = compare_logs(OpLog.read(args.a), OpLog.read(args.b))
    elif any(logs):
        raise ConfigError(f"why: give two run artifacts or two op logs, got {args.a!r} and {args.b!r}.")
    else:
        diff = first_divergent_operation(args.a, args.b, step=args.step)
    if args.json:
        _print_json(diff.to_json())
    else:
        for line in diff.lines():
            print(line)
    return EXIT_OK if diff.identical else EXIT_NEGATIVE


def cmd_sources(args: argparse.Namespace) -> int:
    """Divergence by source: each thing a training seed drives, changed alone against a base run."""
    import json

    from flannel_repro.analysis.sources import SOURCES, divergence_by_source, source_configs
    from flannel_repro.training.store import RunStore

    exp = _experiment(args)
    base = exp.run.with_train_seed(args.seed)
    if args.threads:
        base = base.replace(threads=args.threads)
    sources = [s.strip() for s in args.sources.split(",") if s.strip()] if args.sources else list(SOURCES)
    variants = source_configs(base, other_seed=args.other, sources=sources)
    store = RunStore(args.artifacts)
    print(f"  run base seed={args.seed} ...", file=sys.stderr, flush=True)
    ref = store.obtain(base).trajectory
    others = {}
    for source, (config, repeat) in variants.items():
        print(f"  run {source} ...", file=sys.stderr, flush=True)
        others[source] = store.obtain(config, repeat=repeat).trajectory
    table = divergence_by_source(ref, others)
    if args.json:
        print(json.dumps(table.to_json(), indent=2))
    else:
        for line in table.lines():
            print(line)
    return EXIT_OK


def cmd_prune(args: argparse.Namespace) -> int:
    """Delete (or, with --dry-run, list) what no run of this installation can reuse, with sizes. Files the
    store did not write are listed as kept, never deleted."""
    from flannel_repro.training.store import prune, scan_artifacts

    found = scan_artifacts(args.artifacts)
    orphans = prune(args.artifacts, dry_run=args.dry_run, found=found)
    kept = [o for o in found if not o.owned]
    if args.json:
        _print_json({"artifacts": str(args.artifacts), "dry_run": args.dry_run,
                     "files": [{"path": str(o.path), "bytes": o.size, "reason": o.reason} for o in orphans],
                     "total_bytes": sum(o.size for o in orphans),
                     "kept": [{"path": str(o.path), "bytes": o.size, "reason": o.reason} for o in kept]})
        return EXIT_OK
    verb = "would delete" if args.dry_run else "deleted"
    for o in orphans:
        print(f"{o.size / 1e6:>10.1f} MB  {o.path.name}: {o.reason}")
    total = sum(o.size for o in orphans)
    print(f"{verb} {len(orphans)} file(s), {total / 1e6:.1f} MB, in {args.artifacts}")
    for o in kept:
        print(f"{o.size / 1e6:>10.1f} MB  {o.path.name}: {o.reason}")
    if kept:
        print(f"kept {len(kept)} file(s) the run store did not write, {sum(o.size for o in kept) / 1e6:.1f} MB")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flannel-repro", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"flannel-repro {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bounds", help="derive divergence bounds from measured runs (prints TOML)")
    b.add_argument("--preset", choices=sorted(PRESETS), default="ci", help="the experiment's starting point (default: ci)")
    b.add_argument("--config", help="TOML experiment config (instead of --preset)")
    b.add_argument("--artifacts", default=".flannel/artifacts", help="run artifacts directory, shared with pytest "
                   "(default: .flannel/artifacts)")
    b.add_argument("--name", default="bound", help="name of the printed TOML table (default: bound)")
    b.add_argument("--compare-seeds", help="seeds compared with the base seed, e.g. '46-61' (default: the experiment's "
                   "other seeds). Held-out seeds make the bound a prediction rather than a restatement.")
    b.add_argument("--discard-compared", action="store_true", help="delete each held-out seed's two runs once "
                   "measured (the base run is kept): a full-scale run is 1.3 GB")
    b.add_argument("--threads", type=_bounded_int(0, MAX_THREADS), default=0,
                   help="torch threads (0 = default); pin it like the suite does")
    b.set_defaults(func=cmd_bounds)
    e = sub.add_parser("export-notebook", help="write the notebook's single-file layout from run artifacts")
    e.add_argument("runs", nargs="+", help="run artifacts (.safetensors), one per notebook run, in order")
    e.add_argument("-o", "--output", required=True, help="the notebook-layout file to write")
    e.set_defaults(func=cmd_export)
    i = sub.add_parser("info", help="one run: losses and fraction of W entries updated per step")
    i.add_argument("run", help="a run artifact (.safetensors)")
    i.set_defaults(func=cmd_info)
    d = sub.add_parser("divergence", help="all-pairs divergence summary of run artifacts")
    d.add_argument("runs", nargs="+", help="run artifacts (.safetensors) of the same length")
    d.add_argument("--csv", action="store_true", help="print every pair's divergence at every step as CSV")
    d.set_defaults(func=cmd_divergence)
    p = sub.add_parser("report", help="plots, an HTML/Markdown page, JSON and CSV for run artifacts (needs matplotlib)")
    p.add_argument("runs", nargs="+", help="run artifacts (.safetensors), or folders of them")
    p.add_argument("-o", "--output", default="flannel-report", help="the folder to write (default: flannel-report)")
    p.set_defaults(func=cmd_report)
    v = sub.add_parser("verify", help="check run artifacts from their bytes (exit 1 when one fails)")
    v.add_argument("runs", nargs="+", help="run artifacts (.safetensors)")
    v.set_defaults(func=cmd_verify)
    o = sub.add_parser("oplog", help="replay a run to a step and write every operation of it (JSON), to compare "
                       "on another machine with 'why'")
    o.add_argument("run", help="a run artifact (.safetensors)")
    o.add_argument("--step", type=_bounded_int(1, 10**9), required=True, help="the optimizer step to record (1-based)")
    o.add_argument("-o", "--output", required=True, help="the op log to write (JSON)")
    o.set_defaults(func=cmd_oplog)
    y = sub.add_parser("why", help="the first operation that made two runs part (exit 1 when they differ)")
    y.add_argument("a", help="a run artifact, or an op log (.json)")
    y.add_argument("b", help="the other run artifact, or op log")
    y.add_argument("--step", type=_bounded_int(1, 10**9), help="the step to examine (default: the first step the "
                   "artifacts part at)")
    y.set_defaults(func=cmd_why)
    c = sub.add_parser("sources", help="divergence by source: data order, initialisation, numerics, none, each "
                       "changed alone against a base run")
    c.add_argument("--preset", choices=sorted(PRESETS), default="ci", help="the experiment's starting point (default: ci)")
    c.add_argument("--config", help="TOML experiment config (instead of --preset)")
    c.add_argument("--seed", type=_bounded_int(0, 2**63 - 1), default=42, help="the base run's seed (default: 42)")
    c.add_argument("--other", type=_bounded_int(0, 2**63 - 1), default=43, help="the seed a source changes to (default: 43)")
    c.add_argument("--sources", help="comma-separated subset of data_order, model_init, threads, engine, none (default: all)")
    c.add_argument("--threads", type=_bounded_int(0, MAX_THREADS), default=1, help="the base run's threads (default: 1)")
    c.add_argument("--artifacts", default=".flannel/artifacts", help="run artifacts directory, shared with pytest")
    c.add_argument("--json", action="store_true", help="print the table as JSON")
    c.set_defaults(func=cmd_sources)
    for command in (e, i, d, p):
        command.add_argument("--no-verify", action="store_true", help="trust the artifacts without rehashing them "
                             "(they are verified by default)")
    g = sub.add_parser("digests", help="write a run's per-step digest chain, or find where a run parts from one "
                       "(exit 1 when it does)")
    g.add_argument("run", help="a run artifact (.safetensors)")
    out = g.add_mutually_exclusive_group()
    out.add_argument("-o", "--output", help="write the chain (JSON, a few kB) here instead of printing it")
    out.add_argument("--compare", metavar="CHAIN", help="a chain written by -o on another machine or commit: report the "
                     "first step whose digests differ")
    g.set_defaults(func=cmd_digests)
    n = sub.add_parser("numerics", help="this machine's numerics class on CPU (native, portable or avx512bf16) and the probe behind it")
    n.add_argument("--mode", choices=NUMERICS, default="native", help="CPU numerics to probe (default: native)")
    n.add_argument("--threads", type=_bounded_int(1, MAX_THREADS), default=1,
                   help="thread count the class is named for (default: 1)")
    n.set_defaults(func=cmd_numerics)
    z = sub.add_parser("noise", help="measure a noise band for tolerant comparisons across numerics classes (JSON)")
    z.add_argument("--preset", choices=sorted(PRESETS), default="ci", help="the experiment's starting point (default: ci)")
    z.add_argument("--config", help="TOML experiment config (instead of --preset)")
    z.add_argument("--seeds", help="training seeds, e.g. '42-45' (default: the experiment's)")
    z.add_argument("--reference", default="portable:1", help="the variant others are measured against (PATH:THREADS)")
    z.add_argument("--variants", default="portable:2,avx512bf16:1,native:1,avx512:1,avx2:1",
                   help="arithmetic variants, PATH:THREADS with PATH one of native, portable, avx512bf16, avx512, avx2")
    z.add_argument("--margin", type=_finite_float(1.0), default=2.0,
                   help="band = margin x the largest measured deviation (>= 1)")
    z.add_argument("--artifacts", default=".flannel/noise-artifacts", help="where the variants' runs are kept "
                   "(default: .flannel/noise-artifacts)")
    z.add_argument("-o", "--output", help="bands file to write (merged: the entry of the same scale is replaced)")
    z.set_defaults(func=cmd_noise)
    r = sub.add_parser("prune", help="delete artifacts no run can reuse any more (other code or package versions, "
                       "unreadable, partial), with sizes")
    r.add_argument("--artifacts", default=".flannel/artifacts", help="the artifacts directory (default: "
                   ".flannel/artifacts)")
    r.add_argument("--dry-run", action="store_true", help="list what would be deleted, delete nothing")
    r.set_defaults(func=cmd_prune)
    for command in (e, g, o, z, p):
        command.add_argument("--force", action="store_true", help="replace an existing output file of another kind "
                             "(never an input or a run artifact)")
    for command in (b, e, i, d, v, n, r, y, g, p, o, z):
        command.add_argument("--json", action="store_true", help="print the result as one JSON document")
    raw = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(raw)  # exits 2 on a usage error
    args.raw_argv = raw
    try:
        return args.func(args)
    except UsageError as exc:
        print(f"flannel-repro: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except FlannelError as exc:
        print(f"flannel-repro: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_INPUT
    except OSError as exc:  # a path given on the command line that cannot be read or written
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"flannel-repro: {where}{exc.strerror or exc}", file=sys.stderr)
        return EXIT_INPUT
    except KeyboardInterrupt:
        print("flannel-repro: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, like other command-line tools
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except Exception as exc:  # noqa: BLE001 -- a bug: one line, the traceback on request
        if os.environ.get("FLANNEL_REPRO_TRACEBACK"):
            raise
        print(f"flannel-repro: internal error: {type(exc).__name__}: {exc} (a bug in flannel-repro {__version__}; set "
              "FLANNEL_REPRO_TRACEBACK=1 to see the traceback, and please report it)", file=sys.stderr)
        return EXIT_INTERNAL


def _bounded_int(low: int, high: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer in {low}..{high}, got {raw!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"expected an integer in {low}..{high}, got {value}")
        return value

    return parse


def _finite_float(low: float) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and value >= low):
            raise argparse.ArgumentTypeError(f"expected a finite number >= {low:g}, got {raw!r}")
        return value

    return parse


if __name__ == "__main__":
    raise SystemExit(main())
