"""What the commands share: exit codes, JSON output, the checks on inputs (verified run artifacts) and on outputs
(never an input, never a run artifact), and argument types."""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Callable

from flannel_repro.config import PRESETS, ExperimentConfig
from flannel_repro.errors import UsageError

EXIT_OK, EXIT_NEGATIVE, EXIT_USAGE, EXIT_INPUT, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130


def print_json(value: object) -> None:
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


def verified_runs(args: argparse.Namespace, paths: list[str]) -> list[Path]:
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


def experiment_config(args: argparse.Namespace) -> ExperimentConfig:
    if args.config:
        return ExperimentConfig.from_toml(args.config)
    return PRESETS[args.preset]()


def same_file(a: Path, b: str | Path) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)  # hard links
    except OSError:
        return False


def json_format(path: Path) -> object:
    """The "format" field of a JSON file (None when it is no JSON object, or over 256 MB)."""
    import json

    try:
        if path.stat().st_size > 256 * 2**20:
            return None
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    return data.get("format") if isinstance(data, dict) else None


def safetensors_format(path: Path) -> object:
    from flannel_repro.storage.layout import header_metadata

    meta = header_metadata(path)
    return meta.get("format") if isinstance(meta, dict) else None


def output_path(
    args: argparse.Namespace,
    raw: str,
    inputs: list[str],
    kind: str,
    is_kind: Callable[[Path], bool],
    *,
    option: str = "-o",
    files: tuple[str, ...] = (),
) -> Path:
    """The path a command writes (`files` in it when it is a folder), refused with a UsageError (exit 2) when
    it is one of the command's inputs or a run artifact, or an existing file that is not a `kind` (unless
    --force). Every command that writes a file checks its output here, before any work."""
    from flannel_repro.storage.layout import RUN_FORMAT

    out = Path(raw)
    targets = [out / name for name in files] or [out]
    for item in inputs:
        for target in {out, *targets}:
            if same_file(target, item):
                raise UsageError(
                    f"{option} {raw}: expected an output path that is none of the command's inputs, "
                    f"got the input {item}; write it elsewhere."
                )
    for target in [out, *targets] if files else targets:
        if not target.exists() or target.is_dir():
            continue  # a folder in the way is the writer's to report
        if not target.is_file():
            raise UsageError(
                f"{option} {raw}: expected a new file or a {kind} to replace, got {target}, which is "
                "not a regular file (a FIFO or a device)."
            )
        if safetensors_format(target) == RUN_FORMAT:
            raise UsageError(
                f"{option} {raw}: expected a new file or a {kind} to replace, got the run artifact "
                f"{target}; a run artifact is never overwritten."
            )
        if target in targets and not getattr(args, "force", False) and not is_kind(target):
            raise UsageError(
                f"{option} {raw}: expected a new file or a {kind} to replace, got {target}, a file of "
                "another kind; pass --force to replace it."
            )
    return out


def csv_number(x: object) -> object:
    """A CSV cell: integers as they are, floats by repr (round-trips exactly), NaN and inf empty."""
    import numpy as np

    if isinstance(x, (int, np.integer)):
        return int(x)
    v = float(x)  # type: ignore[arg-type]
    return repr(v) if math.isfinite(v) else ""


def bounded_int(low: int, high: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer in {low}..{high}, got {raw!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"expected an integer in {low}..{high}, got {value}")
        return value

    return parse


def finite_float(low: float) -> Callable[[str], float]:
    def parse(raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and value >= low):
            raise argparse.ArgumentTypeError(f"expected a finite number >= {low:g}, got {raw!r}")
        return value

    return parse
