"""`flannel-repro train`: train the runs a test suite's claims need on a Ray cluster, into a store.

    flannel-repro train tests/flannel6 --store s3://bucket/runs --cluster auto [-- --flannel-numerics=portable]

The runs are known from collection: pytest collects the given paths in this process (`--collect-only`, with
the pytest arguments after `--`), and the session's plan (`runs.plan`) lists the runs its claims will ask
for. Each run is one Ray task (`runs.cluster.train_on_cluster`); a run already in the store is read, not
trained. One line per run, then a summary; exit 0 when every run is in the store in the expected numerics
class, 1 otherwise. `pytest ... --flannel-artifacts=STORE --flannel-no-train` then judges the claims.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

from flannel_repro.cli.common import EXIT_NEGATIVE, EXIT_OK, bounded_int, print_json
from flannel_repro.config import MAX_THREADS
from flannel_repro.errors import ConfigError, NumericsError, UsageError

if TYPE_CHECKING:
    import pytest

    from flannel_repro.runs.cluster import ClusterResult
    from flannel_repro.runs.plan import RunRequest


def split_pytest_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(the command line up to `--`, the pytest arguments after it) for `train`; other commands keep their `--`."""
    command = next((a for a in argv if not a.startswith("-")), None)
    if command != "train" or "--" not in argv:
        return list(argv), []
    at = list(argv).index("--")
    return list(argv[:at]), list(argv[at + 1 :])


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """The `train` subcommand's options (registered by `cli.main`)."""
    t = sub.add_parser(
        "train",
        help="train the runs a suite's claims need on a Ray cluster, into a store (needs the 'ray' extra)",
        description="Pytest arguments (--flannel-config, --flannel-numerics, -k, ...) go after '--'.",
    )
    t.add_argument("paths", nargs="*", help="test files or folders to collect (default: pytest's testpaths)")
    t.add_argument("--store", required=True, help="the run store: a folder, or a URL (s3://bucket/prefix, file://...)")
    t.add_argument("--cache", help="each machine's local cache folder of a URL store")
    t.add_argument(
        "--cluster",
        default="local",
        help="Ray address: 'local' (default: a cluster of this machine, started for the command), 'auto', "
        "HOST:6379 or ray://HOST:10001",
    )
    t.add_argument("--num-cpus", type=bounded_int(1, 4096), help="CPUs of the local cluster (default: all)")
    t.add_argument(
        "--threads",
        type=bounded_int(1, MAX_THREADS),
        help="torch threads (and CPUs) per run (default: the session's, --flannel-threads, else 1)",
    )
    t.add_argument("--shard", help="K/N: train only shard K of N of the plan")
    return t


@dataclass
class PlanCollector:
    """A pytest plugin for one `--collect-only` session: keeps the plan the flannel-repro plugin announces
    (its `pytest_flannel_planned` hook) and the session settings that came with it."""

    plan: list["RunRequest"] | None = None
    session: Any = None  # the plugin's FlannelSession (planned_threads(), checkpoint_every)
    errors: list[str] = field(default_factory=list)

    def pytest_flannel_planned(self, config: "pytest.Config", plan: list["RunRequest"], flannel_session: Any) -> None:
        self.plan, self.session = list(plan), flannel_session

    def pytest_collection_finish(self, session: "pytest.Session") -> None:
        if self.plan is None and not session.config.pluginmanager.hasplugin("flannel_repro"):
            self.errors.append("the flannel-repro plugin is not active in this pytest session")


def collect(paths: Sequence[str], pytest_args: Sequence[str]) -> PlanCollector:
    """Run pytest's collection here; UsageError (with pytest's output) when it fails."""
    import pytest

    collector = PlanCollector()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = pytest.main([*paths, "--collect-only", "-q", *pytest_args], plugins=[collector])
    if collector.plan is None and not collector.errors and code in (0, 5):
        collector.plan = []  # no test asks for a run: nothing to plan
    if collector.plan is None or collector.errors or code not in (0, 5):  # 5: no tests collected
        shown = out.getvalue().strip()[-3000:]
        why = "; ".join(collector.errors) or f"pytest exited {int(code)}"
        raise UsageError(f"collecting {' '.join(paths) or 'the tests'} failed: {why}" + (f"\n{shown}" if shown else ""))
    return collector


def parse_shard(raw: str) -> tuple[int, int]:
    k, sep, n = raw.strip().partition("/")
    if sep and k.isdigit() and n.isdigit() and 1 <= int(k) <= int(n):
        return int(k), int(n)
    raise UsageError(f"--shard accepts K/N, integers with 1 <= K <= N (e.g. 1/2); got {raw!r}.")


def expected_class(plan: Sequence["RunRequest"], threads: int) -> str | None:
    """This machine's numerics class for the plan's runs, when they share one device, mode and thread count:
    the class a session here reads runs of (None when they do not, or this machine cannot run the mode)."""
    from flannel_repro.devices import device_present
    from flannel_repro.training.numerics import numerics_info

    kinds = {(r.config.device, r.config.numerics, r.config.threads or threads, r.config.deterministic) for r in plan}
    if len(kinds) != 1:
        return None
    device, mode, n, deterministic = kinds.pop()
    if not device_present(device)[0]:
        return None
    try:
        return str(numerics_info(device, threads=n, deterministic=deterministic, mode=mode)["class"])
    except NumericsError:
        return None


def run_line(result: "ClusterResult") -> str:
    """One line per run: what happened, its name, time, class and where."""
    where = f"{result.host} (node {result.node_id[:8]})" if result.host else "no node"
    if not result.ok:
        return f"failed   {result.run_name}  on {where}: {result.error}"
    status = "trained" if result.trained else "reused "
    line = f"{status}  {result.run_name}  {result.wall_time_s:7.1f} s  {result.numerics_class}  on {where}"
    if result.class_differs:
        line += f"  OTHER CLASS (expected {result.expected_class}: a different run)"
    return line


def summary(results: Sequence["ClusterResult"], expected: str | None) -> str:
    ok = [r for r in results if r.ok]
    trained = sum(r.trained for r in ok)
    classes = Counter(r.numerics_class for r in ok)
    shown = ", ".join(f"{c} ({n})" for c, n in sorted(classes.items())) or "none"
    line = (
        f"{len(results)} runs: {trained} trained, {len(ok) - trained} reused, {len(results) - len(ok)} failed; "
        f"classes: {shown}"
    )
    others = sum(r.class_differs for r in ok)
    if expected:
        line += f"; expected {expected}" + (f", {others} runs of another class" if others else "")
    return line


def cmd_train(args: argparse.Namespace) -> int:
    from flannel_repro.runs import plan as plans
    from flannel_repro.runs.cluster import (
        check_reachable,
        check_store_shared,
        import_ray,
        is_local,
        train_on_cluster,
    )

    ray = import_ray()  # the missing extra, a store the cluster cannot share, a cluster not there: before collection
    try:
        check_store_shared(args.store, args.cluster)
    except ConfigError as exc:
        raise UsageError(f"--store: {exc}") from None
    if not is_local(args.cluster):
        check_reachable(ray, args.cluster)
    pytest_args, paths = list(getattr(args, "pytest_args", [])), list(args.paths)
    shard = parse_shard(args.shard) if args.shard else None
    collected = collect(paths, pytest_args)
    assert collected.plan is not None
    plan = plans.shard(collected.plan, *shard) if shard else collected.plan
    if not plan:
        print_json({"runs": [], "expected_class": None}) if args.json else print(
            "flannel-repro train: no runs planned."
        )
        return EXIT_OK
    assert collected.session is not None  # announced with the plan
    threads = args.threads or collected.session.planned_threads()
    expected = expected_class(plan, threads)
    if not args.json:
        print(f"flannel-repro train: {len(plan)} runs on {args.cluster} into {args.store}", flush=True)
    results = train_on_cluster(
        plan,
        location=args.store,
        cache=args.cache,
        address=args.cluster,
        threads=threads,
        session=f"train-{uuid.uuid4().hex}",
        checkpoint_every=collected.session.checkpoint_every,
        expected_class=expected,
        on_result=None if args.json else (lambda r: print(run_line(r), flush=True)),
        num_cpus=args.num_cpus,
    )
    if args.json:
        print_json({"runs": [r.to_dict() for r in results], "expected_class": expected})
    else:
        print(summary(results, expected))
    complete = all(r.ok and not r.class_differs for r in results)
    if not complete:
        print("flannel-repro train: not every run is in the store (see above)", file=sys.stderr)
    return EXIT_OK if complete else EXIT_NEGATIVE
