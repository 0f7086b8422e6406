"""Commands on run artifacts already on disk: info, export-notebook, divergence, report, digests, verify, prune."""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from flannel_repro.cli.common import (
    EXIT_NEGATIVE,
    EXIT_OK,
    csv_number,
    json_format,
    output_path,
    print_json,
    safetensors_format,
    verified_runs,
)


def cmd_info(args: argparse.Namespace) -> int:
    """One run at a glance: config, losses and the update statistics per step (the bf16 stall diagnostic).

    In pure bf16 most Adam updates late in training are below half a bf16 ulp of the weight and are
    lost: the share of W's entries that change falls towards 0 although the optimizer still runs (see
    docs/report.md, "The bf16 stall").
    """
    import numpy as np

    from flannel_repro.analysis.stall import stall_profile
    from flannel_repro.analysis.trajectory import Trajectory
    from flannel_repro.config import RunConfig

    traj = Trajectory(args.run)
    if not args.no_verify:
        traj.require_verified()
    c = traj.config
    profile = stall_profile(traj) if traj.has_W else None
    fraction = profile.changed if profile is not None else None
    steps = sorted({s for s in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, c.steps) if s <= c.steps})
    stalled = profile.stalled_at() if profile is not None else None
    if args.json:
        print_json(
            {
                "run": str(traj.path),
                "label": traj.label,
                "config": c.to_dict(),
                "fingerprint": c.fingerprint(),
                "threads": traj.metadata.get("threads"),
                "steps_per_s": traj.steps_per_s,
                "wall_time_s": traj.wall_time_s,
                "numerics_class": (traj.env.get("numerics") or {}).get("class"),
                "steps": [
                    {
                        "step": s,
                        "loss": float(traj.losses[s]),
                        "W_changed_fraction": None if fraction is None else float(fraction[s]),
                        "lost_fraction": None if profile is None else float(profile.lost[s]),
                        "second_moment_moved_fraction": None
                        if profile is None
                        else float(profile.second_moment_moved[s]),
                    }
                    for s in steps
                ],
                "mean_W_changed_fraction": None if fraction is None else float(np.nanmean(fraction)),
                "stalled_at": stalled,
                "digest_first": traj.digest_hex(0),
                "digest_last": traj.digest_hex(c.steps),
            }
        )
        return EXIT_OK
    trained = f"labels {c.label_mode}" if isinstance(c, RunConfig) else f"engine {c.engine}"
    print(f"{traj.path.name}: {traj.label}, {c.steps} steps, dtype {c.dtype}, {trained}")
    print(
        f"  config {c.fingerprint()}, threads {traj.metadata.get('threads', '?')}, "
        f"{traj.steps_per_s:.2f} steps/s, wall {traj.wall_time_s:.1f} s"
    )
    print(f"  {'step':>6} {'loss':>10} {'W entries changed':>18} {'updates lost':>13} {'Adam v moved':>13}")

    def pct(x: float | None) -> str:
        return "n/a" if x is None or math.isnan(x) else f"{100 * x:.3f}%"

    for s in steps:
        row = profile.at(s) if profile is not None else {}
        print(
            f"  {s:>6} {float(traj.losses[s]):>10.5f} {pct(row.get('changed')):>18} {pct(row.get('lost')):>13} "
            f"{pct(row.get('second_moment_moved')):>13}"
        )
    if fraction is not None:
        print(
            f"  mean over all steps: {100 * float(np.nanmean(fraction)):.3f}% of entries changed per step; "
            + (
                f"stalled at step {stalled} (under 1% changed per step, mean of 10 steps)"
                if stalled is not None
                else "no stall (never under 1% changed per step, mean of 10 steps)"
            )
        )
    print(f"  digest step 0: {traj.digest_hex(0)[:16]}  step {c.steps}: {traj.digest_hex(c.steps)[:16]}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from flannel_repro.storage.export import NOTEBOOK_FORMAT, export_notebook

    output_path(
        args,
        args.output,
        list(args.runs),
        "notebook-layout file (.safetensors)",
        lambda p: safetensors_format(p) == NOTEBOOK_FORMAT,
    )
    out = export_notebook(verified_runs(args, args.runs), Path(args.output))
    if args.json:
        print_json({"output": str(out), "runs": list(args.runs), "bytes": out.stat().st_size})
        return EXIT_OK
    print(out)
    return 0


def cmd_divergence(args: argparse.Namespace) -> int:
    from flannel_repro.analysis.divergence import all_pairs

    result = all_pairs(verified_runs(args, args.runs))
    if args.csv:
        import csv

        writer = csv.writer(sys.stdout, lineterminator="\n")
        fields = ("frobenius", "frobenius_live", "max_abs", "rows_differ", "rows_differ_live")
        writer.writerow(["a", "b", "step", *fields])
        for p, (i, j) in enumerate(result.pairs.tolist()):
            for k, step in enumerate(result.steps.tolist()):
                writer.writerow(
                    [args.runs[i], args.runs[j], step, *(csv_number(getattr(result, f)[p, k]) for f in fields)]
                )
        return EXIT_OK
    if args.json:
        print_json({"runs": list(args.runs), **result.summary()})
        return EXIT_OK
    for key, value in result.summary().items():
        print(f"{key}: {value}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Plots, a page (HTML and Markdown), a JSON document and CSV files for run artifacts (docs/report.md)."""
    from flannel_repro.report import write_report
    from flannel_repro.report.schema import FORMAT

    output_path(
        args,
        args.output,
        list(args.runs),
        "file of a report folder",
        lambda p: json_format(p.parent / "report.json") == FORMAT,
        files=("index.html", "report.md", "report.json", "divergence.csv", "steps.csv"),
    )
    result = write_report(args.runs, args.output, verify=not args.no_verify)
    summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary:  # on GitHub Actions: the tables in the job's summary page
        from flannel_repro.report import step_summary

        with open(summary, "a", encoding="utf-8") as f:
            f.write(step_summary(result))
    if args.json:
        print_json(result.document)
        return EXIT_OK
    doc = result.document
    print(
        f"report: {result.page} ({len(doc['figures'])} plots, {len(doc['runs'])} runs, "
        f"{sum(c['n_pairs'] for c in doc['pair_classes'])} pairs) in {result.seconds:.1f} s"
    )
    for f in doc["figures"]:
        print(f"  {f['file']}: {f['shows']}")
    return EXIT_OK


def cmd_digests(args: argparse.Namespace) -> int:
    """Write a run's per-step digest chain, or report where the run parts from a stored chain (exit 1)."""
    import json

    from flannel_repro.analysis.chain import CHAIN_FORMAT, DigestChain
    from flannel_repro.analysis.compare import compare_run_to_chain
    from flannel_repro.analysis.trajectory import Trajectory

    if args.output:
        output_path(args, args.output, [args.run], "digest chain (JSON)", lambda p: json_format(p) == CHAIN_FORMAT)
    traj = Trajectory(args.run)
    traj.require_verified()  # the stored digests are checked against W before anyone trusts them
    if args.compare:
        result, lines = compare_run_to_chain(traj, args.compare)
        if args.json:
            print_json(
                {
                    "run": args.run,
                    "chain": args.compare,
                    "identical": result.identical,
                    "first_step": result.first_step,
                    "report": lines,
                }
            )
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
        print_json({"runs": rows, "verified": len(args.runs) - failed, "total": len(args.runs)})
    else:
        print(f"{len(args.runs) - failed} of {len(args.runs)} verified")
    return EXIT_NEGATIVE if failed else EXIT_OK


def cmd_prune(args: argparse.Namespace) -> int:
    """Delete (or, with --dry-run, list) what no run of this installation can reuse, with sizes. Files the
    store did not write are listed as kept, never deleted."""
    from flannel_repro.runs.prune import prune, prune_store, scan_artifacts, scan_store
    from flannel_repro.runs.remote import RemoteStore, is_url
    from flannel_repro.runs.store import default_cache_dir

    if is_url(args.artifacts):  # the store, then this machine's cache of it
        remote = RemoteStore(args.artifacts)
        remote.check()
        store_found = scan_store(remote)
        store_orphans = prune_store(remote, dry_run=args.dry_run, found=store_found)
        if not args.json:
            verb = "would delete" if args.dry_run else "deleted"
            for o in store_orphans:
                print(f"{o.size / 1e6:>10.1f} MB  {o.path}: {o.reason}")
            total = sum(o.size for o in store_orphans)
            print(f"{verb} {len(store_orphans)} object(s), {total / 1e6:.1f} MB, in {remote.url}")
        cache = args.cache or default_cache_dir(args.artifacts, ".")
        if not Path(cache).is_dir():
            if args.json:
                print_json({"store": remote.url, "dry_run": args.dry_run, "files": _rows(store_orphans, remote.url)})
            return EXIT_OK
        args.artifacts = str(cache)
    else:
        store_orphans = None
    found = scan_artifacts(args.artifacts)
    orphans = prune(args.artifacts, dry_run=args.dry_run, found=found)
    kept = [o for o in found if not o.owned]
    if args.json:
        print_json(
            {
                "artifacts": str(args.artifacts),
                "dry_run": args.dry_run,
                "files": [{"path": str(o.path), "bytes": o.size, "reason": o.reason} for o in orphans],
                "total_bytes": sum(o.size for o in orphans),
                "kept": [{"path": str(o.path), "bytes": o.size, "reason": o.reason} for o in kept],
                **({"store": _rows(store_orphans, remote.url)} if store_orphans is not None else {}),
            }
        )
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


def _rows(orphans: list, url: str) -> list[dict[str, object]]:
    return [{"path": f"{url.rstrip('/')}/{o.path}", "bytes": o.size, "reason": o.reason} for o in orphans]
