"""Command line: derive divergence bounds, export to the notebook's file, compare runs.

    flannel-repro bounds [--preset ci|full|notebook | --config FILE] [--artifacts DIR] [--name NAME]
    flannel-repro export-notebook RUN.safetensors [RUN ...] -o OUT.safetensors
    flannel-repro divergence RUN.safetensors [RUN ...] [--csv]
    flannel-repro digests RUN.safetensors [-o CHAIN.json | --compare CHAIN.json]
    flannel-repro info RUN.safetensors
    flannel-repro numerics
    flannel-repro noise [--preset ci | --config FILE] [--seeds 42-45] [--variants PATH:THREADS,...] [-o FILE]
    flannel-repro prune [--artifacts DIR|URL] [--cache DIR] [--dry-run]
    flannel-repro verify RUN.safetensors [RUN ...]
    flannel-repro oplog RUN.safetensors --step K -o LOG.json
    flannel-repro why A B [--step K]     (A, B: two run artifacts, or two op logs)
    flannel-repro sources [--preset ci | --config FILE] [--seed 42 --other 43] [--sources a,b] [--json]
    flannel-repro report RUN_OR_DIR [...] [-o DIR] [--json]    (plots: needs the 'report' extra, matplotlib)
    flannel-repro train [TESTS ...] --store PATH|URL [--cluster local|auto|HOST:6379] [-- PYTEST ARGS]   (needs 'ray')
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

The commands live in `cli.artifacts` (runs on disk), `cli.measure` (training runs to measure), `cli.why` (where two
runs part) and `cli.common` (what they share); this module builds the parser and maps errors to exit codes.
"""

from __future__ import annotations

import argparse
import os
import sys

from flannel_repro.version import __version__
from flannel_repro.config import MAX_THREADS, NUMERICS, PRESETS
from flannel_repro.errors import FlannelError, UsageError
from flannel_repro.cli.common import (
    EXIT_INPUT,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_NEGATIVE,
    EXIT_OK,
    EXIT_USAGE,
    bounded_int,
    finite_float,
)
from flannel_repro.cli.artifacts import (
    cmd_digests,
    cmd_divergence,
    cmd_export,
    cmd_info,
    cmd_prune,
    cmd_report,
    cmd_verify,
)
from flannel_repro.cli.measure import cmd_bounds, cmd_noise, cmd_numerics, cmd_sources
from flannel_repro.cli.why import cmd_oplog, cmd_why
from flannel_repro.cli import train as train_command

__all__ = ["EXIT_INPUT", "EXIT_INTERNAL", "EXIT_INTERRUPTED", "EXIT_NEGATIVE", "EXIT_OK", "EXIT_USAGE", "main"]


def main(argv: list[str] | None = None) -> int:
    # the commands are looked up here, in this module, when main runs (a test may replace one: cli.cmd_info)
    parser = argparse.ArgumentParser(prog="flannel-repro", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"flannel-repro {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bounds", help="derive divergence bounds from measured runs (prints TOML)")
    b.add_argument(
        "--preset", choices=sorted(PRESETS), default="ci", help="the experiment's starting point (default: ci)"
    )
    b.add_argument("--config", help="TOML experiment config (instead of --preset)")
    b.add_argument(
        "--artifacts",
        default=".flannel/artifacts",
        help="run artifacts directory, shared with pytest (default: .flannel/artifacts)",
    )
    b.add_argument("--name", default="bound", help="name of the printed TOML table (default: bound)")
    b.add_argument(
        "--compare-seeds",
        help="seeds compared with the base seed, e.g. '46-61' (default: the experiment's "
        "other seeds). Held-out seeds make the bound a prediction rather than a restatement.",
    )
    b.add_argument(
        "--discard-compared",
        action="store_true",
        help="delete each held-out seed's two runs once measured (the base run is kept): a full-scale run is 1.3 GB",
    )
    b.add_argument(
        "--threads",
        type=bounded_int(0, MAX_THREADS),
        default=0,
        help="torch threads (0 = default); pin it like the suite does",
    )
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
    o = sub.add_parser(
        "oplog",
        help="replay a run to a step and write every operation of it (JSON), to compare on another machine with 'why'",
    )
    o.add_argument("run", help="a run artifact (.safetensors)")
    o.add_argument("--step", type=bounded_int(1, 10**9), required=True, help="the optimizer step to record (1-based)")
    o.add_argument("-o", "--output", required=True, help="the op log to write (JSON)")
    o.set_defaults(func=cmd_oplog)
    y = sub.add_parser("why", help="the first operation that made two runs part (exit 1 when they differ)")
    y.add_argument("a", help="a run artifact, or an op log (.json)")
    y.add_argument("b", help="the other run artifact, or op log")
    y.add_argument(
        "--step", type=bounded_int(1, 10**9), help="the step to examine (default: the first step the artifacts part at)"
    )
    y.set_defaults(func=cmd_why)
    c = sub.add_parser(
        "sources",
        help="divergence by source: data order, initialisation, numerics, none, each changed alone against a base run",
    )
    c.add_argument(
        "--preset", choices=sorted(PRESETS), default="ci", help="the experiment's starting point (default: ci)"
    )
    c.add_argument("--config", help="TOML experiment config (instead of --preset)")
    c.add_argument("--seed", type=bounded_int(0, 2**63 - 1), default=42, help="the base run's seed (default: 42)")
    c.add_argument(
        "--other", type=bounded_int(0, 2**63 - 1), default=43, help="the seed a source changes to (default: 43)"
    )
    c.add_argument(
        "--sources", help="comma-separated subset of data_order, model_init, threads, engine, none (default: all)"
    )
    c.add_argument("--threads", type=bounded_int(0, MAX_THREADS), default=1, help="the base run's threads (default: 1)")
    c.add_argument("--artifacts", default=".flannel/artifacts", help="run artifacts directory, shared with pytest")
    c.add_argument("--json", action="store_true", help="print the table as JSON")
    c.set_defaults(func=cmd_sources)
    for command in (e, i, d, p):
        command.add_argument(
            "--no-verify",
            action="store_true",
            help="trust the artifacts without rehashing them (they are verified by default)",
        )
    g = sub.add_parser(
        "digests", help="write a run's per-step digest chain, or find where a run parts from one (exit 1 when it does)"
    )
    g.add_argument("run", help="a run artifact (.safetensors)")
    out = g.add_mutually_exclusive_group()
    out.add_argument("-o", "--output", help="write the chain (JSON, a few kB) here instead of printing it")
    out.add_argument(
        "--compare",
        metavar="CHAIN",
        help="a chain written by -o on another machine or commit: report the first step whose digests differ",
    )
    g.set_defaults(func=cmd_digests)
    n = sub.add_parser(
        "numerics", help="this machine's numerics class on CPU (native, portable or avx512bf16) and the probe behind it"
    )
    n.add_argument("--mode", choices=NUMERICS, default="native", help="CPU numerics to probe (default: native)")
    n.add_argument(
        "--threads",
        type=bounded_int(1, MAX_THREADS),
        default=1,
        help="thread count the class is named for (default: 1)",
    )
    n.set_defaults(func=cmd_numerics)
    z = sub.add_parser("noise", help="measure a noise band for tolerant comparisons across numerics classes (JSON)")
    z.add_argument(
        "--preset", choices=sorted(PRESETS), default="ci", help="the experiment's starting point (default: ci)"
    )
    z.add_argument("--config", help="TOML experiment config (instead of --preset)")
    z.add_argument("--seeds", help="training seeds, e.g. '42-45' (default: the experiment's)")
    z.add_argument("--reference", default="portable:1", help="the variant others are measured against (PATH:THREADS)")
    z.add_argument(
        "--variants",
        default="portable:2,avx512bf16:1,native:1,avx512:1,avx2:1",
        help="arithmetic variants, PATH:THREADS with PATH one of native, portable, avx512bf16, avx512, avx2",
    )
    z.add_argument(
        "--margin", type=finite_float(1.0), default=2.0, help="band = margin x the largest measured deviation (>= 1)"
    )
    z.add_argument(
        "--artifacts",
        default=".flannel/noise-artifacts",
        help="where the variants' runs are kept (default: .flannel/noise-artifacts)",
    )
    z.add_argument("-o", "--output", help="bands file to write (merged: the entry of the same scale is replaced)")
    z.set_defaults(func=cmd_noise)
    r = sub.add_parser(
        "prune",
        help="delete artifacts no run can reuse any more (other code or package versions, "
        "unreadable, partial), with sizes",
    )
    r.add_argument(
        "--artifacts",
        default=".flannel/artifacts",
        help="the artifacts directory (default: .flannel/artifacts), or a URL store (s3://bucket/runs, ...): the "
        "store is pruned, then this machine's cache of it",
    )
    r.add_argument("--cache", help="with a URL store: its local cache (default: .flannel/cache/<store>)")
    r.add_argument("--dry-run", action="store_true", help="list what would be deleted, delete nothing")
    r.set_defaults(func=cmd_prune)
    t = train_command.add_parser(sub)
    t.add_argument("--json", action="store_true", help="print the results as one JSON document")
    t.set_defaults(func=train_command.cmd_train)
    for command in (e, g, o, z, p):
        command.add_argument(
            "--force",
            action="store_true",
            help="replace an existing output file of another kind (never an input or a run artifact)",
        )
    for command in (b, e, i, d, v, n, r, y, g, p, o, z):
        command.add_argument("--json", action="store_true", help="print the result as one JSON document")
    raw = list(sys.argv[1:] if argv is None else argv)
    head, pytest_args = train_command.split_pytest_args(raw)  # `train ... -- PYTEST ARGS`
    args = parser.parse_args(head)  # exits 2 on a usage error
    args.raw_argv = raw
    args.pytest_args = pytest_args
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
    except Exception as exc:
        if os.environ.get("FLANNEL_REPRO_TRACEBACK"):
            raise
        print(
            f"flannel-repro: internal error: {type(exc).__name__}: {exc} (a bug in flannel-repro {__version__}; set "
            "FLANNEL_REPRO_TRACEBACK=1 to see the traceback, and please report it)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL
