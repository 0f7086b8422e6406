"""The fresh processes of `resume_at` (training.resume.train_in_two_processes): one trains a run and stops
after step k, the next resumes it. Run as `python -m flannel_repro.training.resume_child JSON`.

A separate module so that the resume machinery (imported by the harness) does not import the engines."""

from __future__ import annotations

import json
import sys
from typing import Any, Callable

import torch

from flannel_repro.errors import TrainingStopped


CHILD_KINDS: dict[str, Callable[[dict[str, Any]], None]] = {}


def _child_flannel6(args: dict[str, Any]) -> None:
    from flannel_repro.config import RunConfig
    from flannel_repro.training.harness import train

    if args.get("threads"):
        torch.set_num_threads(int(args["threads"]))  # the parent's count: the key was computed with it
    config = RunConfig.from_dict(args["config"], source="resume child")
    train(
        config,
        args["path"],
        metadata=args.get("metadata"),
        checkpoint_every=args.get("checkpoint_every", 0),
        stop_at=args.get("stop_at"),
        run_key=args["run_key"],
    )


def _child_engine(args: dict[str, Any]) -> None:
    import importlib

    from flannel_repro.training.engines import EngineRunConfig, train_engine

    if args.get("threads"):
        torch.set_num_threads(int(args["threads"]))
    for module in args.get("imports", []):
        importlib.import_module(module)  # registers the user's engine in this fresh process
    config = EngineRunConfig.from_dict(args["config"])
    train_engine(
        config,
        args["path"],
        metadata=args.get("metadata"),
        checkpoint_every=args.get("checkpoint_every", 0),
        stop_at=args.get("stop_at"),
        run_key=args["run_key"],
    )


CHILD_KINDS.update(flannel6=_child_flannel6, engine=_child_engine)


def main(argv: list[str] | None = None) -> int:
    args = json.loads((argv if argv is not None else sys.argv[1:])[0])
    try:
        CHILD_KINDS[args["kind"]](args)
    except TrainingStopped:
        return 0
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
