"""Commands that find why two runs part: oplog (one step's operations, to compare elsewhere) and why."""

from __future__ import annotations

import argparse
from pathlib import Path

from flannel_repro.cli.common import EXIT_NEGATIVE, EXIT_OK, json_format, output_path, print_json
from flannel_repro.errors import ConfigError


def cmd_oplog(args: argparse.Namespace) -> int:
    """Replay a run to a step and write every operation of that step (a few hundred kB of JSON)."""
    from flannel_repro.analysis.oplog import OPLOG_FORMAT
    from flannel_repro.storage.run import RunFile
    from flannel_repro.runs.replay import record_step, replayable

    output_path(args, args.output, [args.run], "op log (JSON)", lambda p: json_format(p) == OPLOG_FORMAT)
    run = RunFile(args.run).require_verified()
    config = run.config
    if not 1 <= args.step <= config.steps:
        run.close()
        raise ConfigError(f"--step must be in 1..{config.steps} (the run's steps), got {args.step}.")
    before = run.digest_hex(args.step - 1)
    run.close()
    log, _ = record_step(
        replayable(config, str(args.run)), args.step, expect_W_before=before, label=Path(args.run).name
    )
    log.write(args.output)
    if args.json:
        print_json(
            {
                "output": str(args.output),
                "operations": len(log.ops),
                "step": args.step,
                "label": log.label,
                "numerics_class": log.env["numerics_class"],
            }
        )
        return EXIT_OK
    print(f"{args.output}: {len(log.ops)} operations of step {args.step} of {log.label} ({log.env['numerics_class']})")
    return EXIT_OK


def cmd_why(args: argparse.Namespace) -> int:
    """Why two runs part: the first divergent operation (exit 1 when they differ)."""
    from flannel_repro.analysis.oplog import OpLog, compare_logs
    from flannel_repro.runs.replay import first_divergent_operation

    logs = [p.endswith(".json") for p in (args.a, args.b)]
    if all(logs):
        diff = compare_logs(OpLog.read(args.a), OpLog.read(args.b))
    elif any(logs):
        raise ConfigError(f"why: give two run artifacts or two op logs, got {args.a!r} and {args.b!r}.")
    else:
        diff = first_divergent_operation(args.a, args.b, step=args.step)
    if args.json:
        print_json(diff.to_json())
    else:
        for line in diff.lines():
            print(line)
    return EXIT_OK if diff.identical else EXIT_NEGATIVE
