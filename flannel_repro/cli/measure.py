"""Commands that train (or reuse) runs to measure something: bounds, sources, noise; and numerics, this machine's
numerics class."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flannel_repro.cli.common import EXIT_OK, experiment_config, json_format, output_path, print_json
from flannel_repro.errors import ConfigError, UsageError


def cmd_bounds(args: argparse.Namespace) -> int:
    """Train (or reuse) the runs the Flannel 6 claims compare and print a bounds.toml table."""
    from flannel_repro.analysis.bounds import measure_bound, to_toml
    from flannel_repro.runs.store import RunStore

    exp = experiment_config(args)
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
    bound = measure_bound(
        exp.run,
        base,
        others,
        obtain,
        log=lambda line: print("  " + line, file=sys.stderr),
        done_with=discard if args.discard_compared else None,
        comparisons=exp.n_runs,
    )
    if args.json:
        import dataclasses

        print_json({"name": args.name, **dataclasses.asdict(bound)})
        return EXIT_OK
    print(to_toml(args.name, bound))
    return EXIT_OK


def cmd_sources(args: argparse.Namespace) -> int:
    """Divergence by source: each thing a training seed drives, changed alone against a base run."""
    import json

    from flannel_repro.analysis.sources import SOURCES, divergence_by_source, source_configs
    from flannel_repro.runs.store import RunStore

    exp = experiment_config(args)
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


def cmd_noise(args: argparse.Namespace) -> int:
    """Measure a noise band: train the seeds under arithmetic variants and write how far each summary
    field moves (see flannel_repro.analysis.noise and flannel_repro.runs.variants)."""
    import json

    from flannel_repro.analysis.noise import BANDS_FORMAT, write_bands
    from flannel_repro.runs.variants import derive_from_training, parse_variants
    from flannel_repro.config import MAX_SEED, MAX_SEEDS, parse_seeds

    if args.output:
        output_path(
            args,
            args.output,
            [p for p in (args.config, args.artifacts) if p],
            "noise-bands file (JSON)",
            lambda p: json_format(p) == BANDS_FORMAT,
        )
    exp = experiment_config(args)
    try:
        seeds = parse_seeds(args.seeds) if args.seeds else None
    except ValueError:
        raise UsageError(
            f"--seeds: expected seeds like '42-45' or '42,43' (a range low-high with low <= high; at most "
            f"{MAX_SEEDS} distinct seeds in 0..{MAX_SEED}), got {args.seeds!r}."
        ) from None
    seeds = seeds or exp.train_seeds
    reference = parse_variants(args.reference)[0]
    variants = parse_variants(args.variants)
    command = "flannel-repro " + " ".join(args.raw_argv)  # raw_argv starts with the subcommand
    print(
        f"noise band: {len(seeds)} seed(s) x {1 + len(variants)} arithmetic variants, {exp.run.steps} steps",
        file=sys.stderr,
        flush=True,
    )
    band = derive_from_training(
        exp.run, seeds, variants, reference, Path(args.artifacts), margin=args.margin, command=command, log=sys.stderr
    )
    print(
        f"scale {band.scale}: digest chains exact through step {band.exact_through}; "
        f"{sum(len(v) for v in band.fields.values())} field(s) with a nonzero band",
        file=sys.stderr,
    )
    if args.output:
        write_bands(args.output, [band])
        if args.json:
            print_json({"output": str(args.output), "band": band.to_json()})
        else:
            print(f"{args.output}: band for scale {band.scale}")
    else:  # the band itself is JSON
        print(json.dumps(band.to_json(), indent=2, sort_keys=True))
    return 0


def cmd_numerics(args: argparse.Namespace) -> int:
    """This process's numerics class on CPU in a mode (native, portable, avx512bf16), and what the probe saw."""
    import json

    from flannel_repro.training.numerics import apply, machine_line, numerics_info

    apply(args.mode)
    info = numerics_info("cpu", threads=args.threads, deterministic=False, mode=args.mode)
    if args.json:
        print_json({"mode": args.mode, "threads": args.threads, "machine": machine_line(), **info})
        return EXIT_OK
    print(f"{info['class']}  ({args.mode}, {args.threads} thread(s), {machine_line()})")
    for key, value in info.get("probe", {}).items():
        print(f"  {key}: {value}")
    if info.get("env"):
        print(f"  environment: {json.dumps(info['env'], sort_keys=True)}")
    return 0
