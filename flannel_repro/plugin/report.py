"""What the plugin prints: progress lines while runs train, and the terminal summary on the controller."""

from __future__ import annotations

import contextlib
import json
import math
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from flannel_repro.config import ENGINES
from flannel_repro.errors import FlannelError
from flannel_repro.plugin.session import SESSION_KEY
from flannel_repro import safeio
from flannel_repro.version import __version__


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def progress_line(info: dict[str, Any], number: int, planned: int, done: int) -> str:
    """One progress line: which run of how many, steps done, loss, speed and the run's ETA."""
    step, steps, rate = int(info["step"]), int(info["steps"]), float(info["rate"])
    eta = (steps - step) / rate if rate > 0 else math.inf
    of = f"of >= {max(planned, number)}" if number <= planned else f"of >= {number}"
    return (
        f"flannel: run {number} {of} ({done} done) {info['name']}: step {step}/{steps} ({100 * step / max(1, steps):.0f}%), "
        f"loss {float(info['loss']):.4f}, {rate:.2f} steps/s, ETA {format_eta(eta)}"
    )


class ProgressWriter:
    """Progress of a training run: a line on the terminal every `interval` seconds (no xdist), and a
    small JSON file beside the artifact that the xdist controller polls and numbers."""

    def __init__(self, config: pytest.Config, interval: float) -> None:
        self.config = config
        self.interval = interval
        self.path: Path | None = None
        self.t0 = time.perf_counter()
        self.last = 0.0
        self.is_worker = hasattr(config, "workerinput")
        self.number = 0

    def start(self, path: Path) -> None:
        self.path = path
        self.t0 = self.last = time.perf_counter()
        state = self.config.stash[SESSION_KEY]
        state.runs_started += 1
        self.number = state.runs_started
        self._line(
            f"flannel: run {self.number} of >= {max(state.planned_runs(), self.number)}: training {path.stem} ..."
        )

    def step(self, step: int, steps: int, loss: float) -> None:
        now = time.perf_counter()
        if self.interval <= 0 or (now - self.last < self.interval and step != steps):
            return
        self.last = now
        info = {
            "name": self.path.stem if self.path else "run",
            "step": step,
            "steps": steps,
            "loss": loss,
            "rate": step / max(now - self.t0, 1e-9),
            "time": time.time(),
        }
        if self.is_worker and self.path is not None:
            progress_file = Path(str(self.path) + ".progress")
            # a fresh temporary name and a rename; a link at the progress file is refused, not followed
            safeio.write_bytes_atomic(progress_file, json.dumps(info).encode(), "the run's progress file")
            if step == steps:
                progress_file.unlink(missing_ok=True)
        else:
            state = self.config.stash[SESSION_KEY]
            self._line(progress_line(info, self.number, state.planned_runs(), self.number - 1))

    def _line(self, line: str) -> None:
        if self.is_worker or self.interval <= 0:
            return
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        capman = self.config.pluginmanager.get_plugin("capturemanager")
        if reporter is None:
            return
        ctx = capman.global_and_fixture_disabled() if capman is not None else contextlib.nullcontext()
        with ctx:
            reporter.write_line(line)


class ControllerReporter:
    """Lives on the controller (or the single process): polls worker progress, prints the summary."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.results: list[tuple[str, str, list[dict[str, Any]]]] = []
        self.metrics: dict[str, list[float]] = {}
        self.snapshots: list[dict[str, Any]] = []  # every flannel_snapshot assertion: how it was compared, if at all
        self.sources: list[dict[str, Any]] = []  # divergence-by-source tables recorded by claims
        self.verdicts: list[dict[str, Any]] = []  # claims for the report: nodeid, outcome, duration, message, plots
        self.report_line = ""
        self.report_error = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._seen: dict[str, float] = {}

    @pytest.hookimpl(tryfirst=True)  # before junitxml writes the report's properties
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        props: list[tuple[str, Any]] = report.user_properties  # ours hold JSON text
        if report.when == "teardown":  # its report carries what setup, call and teardown recorded, once
            self.snapshots.extend(json.loads(v) for k, v in props if k == SNAPSHOT_PROPERTY)
        sources = [json.loads(v) for k, v in props if k == "flannel_sources"] if report.when == "call" else []
        self.sources.extend(sources)
        claims = [json.loads(v) for k, v in props if k == "flannel_claim"]
        uses = any(k == "flannel_uses_trajectory" for k, _ in props)
        if (report.when == "call" and (claims or uses)) or (report.when == "setup" and report.skipped and uses):
            self.results.append((report.nodeid, report.outcome, claims))
        if uses and (report.when == "call" or (report.when == "setup" and not report.passed)):
            self.verdicts.append(_verdict(report, claims, bool(sources)))
        if uses and report.when == "call":
            for key, value in props:
                if key == "flannel_metric":
                    name, number = json.loads(value)
                    self.metrics.setdefault(name, []).append(float(number))
                elif not key.startswith("flannel_") and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.metrics.setdefault(key, []).append(float(value))
        if self._xunit2():
            # our own entries are transport between processes; JUnit XML's xunit2 has no per-test properties
            report.user_properties = [(k, v) for k, v in props if not k.startswith("flannel_")]

    def _xunit2(self) -> bool:
        xml = _junit_xml(self.config)
        return xml is not None and getattr(xml, "family", "xunit2") not in ("xunit1", "legacy")

    @pytest.hookimpl(tryfirst=True)  # before junitxml writes its file
    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        state = self.config.stash[SESSION_KEY]
        if state.report_dir is not None and state.runs:
            self._write_report(session, state)
        xml = _junit_xml(self.config)
        if xml is not None and (state.runs or self.results):
            for name, value in self.facts(state).items():
                xml.add_global_property(name, value if isinstance(value, str) else json.dumps(value))

    @property
    def cross_class(self) -> list[dict[str, Any]]:
        """The snapshot assertions of a class with no snapshot of its own, where other classes had one."""
        return [s for s in self.snapshots if s.get("cross_class")]

    def snapshot_counts(self) -> dict[str, Any]:
        """The snapshot assertions in three groups: compared exactly (this class's own snapshot), within the noise
        band (another class's), not compared (skipped, failed for want of a band or a snapshot, written), with
        why nothing was compared."""
        count = {c: sum(1 for s in self.snapshots if s.get("comparison") == c) for c in ("exact", "band", "none")}
        reasons: dict[str, int] = {}
        for s in self.snapshots:
            if s.get("comparison") == "none":
                reasons[str(s.get("reason"))] = reasons.get(str(s.get("reason")), 0) + 1
        return {
            "assertions": len(self.snapshots),
            "compared_exactly": count["exact"],
            "within_band": count["band"],
            "not_compared": count["none"],
            "not_compared_by_reason": dict(sorted(reasons.items())),
        }

    def snapshot_line(self) -> str:
        """`flannel snapshots: 5 compared exactly, 0 within the noise band, 0 not compared`, with why."""
        c = self.snapshot_counts()
        line = (
            f"flannel snapshots: {c['compared_exactly']} compared exactly, {c['within_band']} within the noise band, "
            f"{c['not_compared']} not compared"
        )
        if c["not_compared"]:
            line += " (" + ", ".join(f"{n} {_REASONS.get(r, r)}" for r, n in c["not_compared_by_reason"].items()) + ")"
        return line

    def facts(self, state: Any) -> dict[str, Any]:
        """Session facts: JUnit XML testsuite properties and the JSON report's `session`."""
        from importlib import metadata

        exp = state.experiment
        out: dict[str, Any] = {
            "flannel_repro_version": __version__,
            "flannel_config": exp.run.fingerprint(),
            "flannel_scale": f"{exp.n_runs} runs x {exp.run.steps} steps",
            "flannel_numerics_requested": exp.run.numerics,
            "flannel_numerics_classes": ",".join(
                sorted({r.numerics_class for r in state.runs.values() if r.numerics_class})
            ),
            "flannel_runs_trained": sum(1 for r in state.runs.values() if r.trained_here),
            "flannel_runs_reused": sum(1 for r in state.runs.values() if not r.trained_here),
            "flannel_runs_downloaded": sum(1 for r in state.runs.values() if r.fetched),
            "flannel_artifacts": _shown_store(state.store_url) or str(state.artifacts_dir),
        }
        for package in ("torch", "transformers"):
            try:
                out[f"flannel_{package}"] = metadata.version(package)
            except metadata.PackageNotFoundError:
                pass
        for outcome in ("passed", "failed", "skipped"):
            out[f"flannel_claims_{outcome}"] = sum(1 for v in self.verdicts if v["outcome"] == outcome)
        counts = self.snapshot_counts()
        for key in ("compared_exactly", "within_band", "not_compared"):
            out[f"flannel_snapshots_{key}"] = counts[key]
        for name, values in sorted(self.metrics.items()):
            out[f"flannel_metric_{name}_min"] = min(values)
            out[f"flannel_metric_{name}_max"] = max(values)
        if state.report_dir is not None:
            out["flannel_report"] = str(state.report_dir)
        return out

    def _write_report(self, session: pytest.Session, state: Any) -> None:
        from flannel_repro.errors import FlannelError
        from flannel_repro.report import SessionInfo, write_report

        t0 = time.perf_counter()
        tables = self._source_tables()
        try:
            result = write_report(
                [r.path for r in state.runs.values()],
                state.report_dir,
                session=SessionInfo(
                    claims=list(self.verdicts), facts=self.facts(state), snapshots=self._snapshot_document(state)
                ),
                sources=tables[0] if tables else None,
            )
        except (FlannelError, OSError) as exc:
            self.report_error = f"{type(exc).__name__}: {exc}"
            if session.exitstatus == 0:
                session.exitstatus = pytest.ExitCode.TESTS_FAILED
            return
        self.report_line = (
            f"report: {result.page} ({len(result.document['figures'])} plots, {time.perf_counter() - t0:.1f} s)"
        )
        summary = os.environ.get("GITHUB_STEP_SUMMARY")
        if summary:
            from flannel_repro.report import step_summary

            try:
                with open(summary, "a", encoding="utf-8") as f:
                    f.write(step_summary(result))
                self.report_line += f"; tables appended to $GITHUB_STEP_SUMMARY ({summary})"
            except OSError as exc:
                self.report_line += f"; could not append to $GITHUB_STEP_SUMMARY ({summary}: {exc.strerror or exc})"

    def _snapshot_document(self, state: Any) -> dict[str, Any]:
        """report.json's `snapshots`: the three counts, why nothing was compared, and each assertion."""
        keys = ("nodeid", "snapshot", "comparison", "outcome", "reason", "class", "stored")
        return {
            **self.snapshot_counts(),
            "policy": state.missing_class,
            "items": [{k: s.get(k) for k in keys} for s in self.snapshots],
        }

    def _source_tables(self) -> list[Any]:
        from flannel_repro.analysis.sources import SourceRow, SourceTable

        return [
            SourceTable(
                base=f"{rec['base']} [{rec.get('device', '?')}]", rows=[SourceRow(**row) for row in rec["rows"]]
            )
            for rec in self.sources
        ]

    @pytest.hookimpl
    def pytest_sessionstart(self, session: pytest.Session) -> None:
        state = self.config.stash[SESSION_KEY]
        if self.config.pluginmanager.hasplugin("dsession") and state.progress_interval > 0:
            self._thread = threading.Thread(target=self._poll, name="flannel-progress", daemon=True)
            self._thread.start()

    def _poll(self) -> None:
        """Print the workers' progress lines, numbering runs in the order the controller first sees them."""
        state = self.config.stash[SESSION_KEY]
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        numbers: dict[str, int] = {}
        while not self._stop.wait(state.progress_interval):
            try:
                files = {f.name: f for f in state.artifacts_dir.glob("*.progress")}
            except OSError:
                continue
            done = sum(1 for name in numbers if name not in files)
            for name, f in sorted(files.items()):
                try:
                    info = json.loads(safeio.read_regular(f, "a progress file", max_bytes=1 << 16))
                except (OSError, ValueError, FlannelError):
                    continue  # gone, half there, or not a file of ours (a FIFO there must not block this thread)
                if not isinstance(info, dict) or "rate" not in info:
                    continue
                number = numbers.setdefault(name, len(numbers) + 1)
                if info.get("time", 0) > self._seen.get(name, 0) and reporter is not None:
                    self._seen[name] = info["time"]
                    tw = getattr(reporter, "_tw", None)  # after a row of test-progress dots: start a new line
                    if tw is not None and getattr(tw, "width_of_current_line", False):
                        tw.line()
                    reporter.write_line(progress_line(info, number, state.planned_runs(), done))

    @pytest.hookimpl
    def pytest_unconfigure(self, config: pytest.Config) -> None:
        self._stop.set()

    @pytest.hookimpl
    def pytest_terminal_summary(self, terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
        self._stop.set()
        state = config.stash[SESSION_KEY]
        if not state.runs and not self.results and not self.snapshots:
            return
        tr = terminalreporter
        tr.write_sep("=", "flannel-repro")
        if state.leftovers_removed:
            shown = ", ".join(state.leftovers_removed[:3]) + (" ..." if len(state.leftovers_removed) > 3 else "")
            tr.write_line(
                f"removed {len(state.leftovers_removed)} file(s) left by killed runs at session start: {shown}"
            )
        exp = state.experiment
        own = sorted({r.engine for r in state.runs.values() if r.engine not in ENGINES})
        if own and len(own) == len({r.engine for r in state.runs.values()}):  # only your registered engines ran
            tr.write_line(
                f"registered engine(s) {', '.join(own)}: {len(state.runs)} runs, artifacts {state.artifacts_dir}"
            )
        else:
            tr.write_line(
                f"config {exp.run.fingerprint()}: {exp.n_runs} runs x {exp.run.steps} steps, seeds "
                f"{exp.train_seeds[0]}-{exp.train_seeds[-1]}, engine {exp.run.engine}, labels "
                f"{exp.run.label_mode}, artifacts {state.artifacts_dir}"
            )
        if state.store_url:
            downloaded = sum(1 for r in state.runs.values() if r.fetched)
            trained = sum(1 for r in state.runs.values() if r.trained_here)
            tr.write_line(
                f"store {_shown_store(state.store_url)} (cache {state.artifacts_dir}): {trained} run(s) trained and published "
                f"here, {downloaded} downloaded and verified"
            )
        if state.runs:
            tr.write_line("")
            ew = max(6, *(len(r.engine) for r in state.runs.values()))
            head = (
                f"{'seed':<12} {'device':<7} {'engine':<{ew}} {'steps':>6} {'final loss':>11} {'wall s':>8} "
                f"{'steps/s':>8} {'thr':>3}  artifact"
            )
            tr.write_line(head)
            for r in sorted(state.runs.values(), key=lambda r: (r.device, r.seed)):
                note = "" if r.trained_here else " (from the store)" if r.fetched else " (reused)"
                if r.replaced:
                    note = " (retrained: a stored artifact or checkpoint failed verification)"
                tr.write_line(
                    f"{r.seed:<12} {r.device:<7} {r.engine:<{ew}} {r.steps:>6} {r.final_loss:>11.5f} "
                    f"{r.wall_time_s:>8.1f} {r.steps_per_s:>8.2f} {r.threads:>3}  {Path(r.path).name}{note}"
                )
            for r in sorted(state.runs.values(), key=lambda r: r.name):
                if r.replaced:
                    tr.write_line(f"set aside and retrained {r.name}: {r.replaced}")
            classes = sorted({r.numerics_class for r in state.runs.values() if r.numerics_class})
            if classes:
                tr.write_line(
                    f"numerics class{'es' if len(classes) > 1 else ''}: {', '.join(classes)} "
                    f"(requested numerics: {exp.run.numerics})"
                )
        if self.cross_class:
            tr.write_line("")
            tr.write_line(
                f"snapshots stored only for other numerics classes (--flannel-missing-class={state.missing_class}):"
            )
            for c in self.cross_class:
                tr.write_line(
                    f"  {c['outcome'].upper():<7} {c['snapshot']}: this run {c['class']}, nearest stored {c['stored']}"
                )
        if self.snapshots:
            counts = self.snapshot_counts()
            compared = counts["compared_exactly"] + counts["within_band"]
            tr.write_line("")
            uncompared = {r for r in counts["not_compared_by_reason"] if r != "written"}  # written: --snapshot-update
            tr.write_line(
                self.snapshot_line(),
                red=compared == 0 and bool(uncompared),
                yellow=counts["not_compared"] > 0 and not (compared == 0 and uncompared),
            )
            if compared == 0 and uncompared:
                tr.write_line(
                    f"  none of this session's {counts['assertions']} snapshot assertion(s) compared anything: "
                    "the snapshot gate checked nothing",
                    red=True,
                )
        if self.results:
            tr.write_line("")
            tr.write_line("claims:")
            skipped = [r for r in self.results if r[1] == "skipped"]
            for nodeid, outcome, _ in self.results:
                if outcome != "skipped":
                    tr.write_line(f"  {outcome.upper():<7} {nodeid}")
            if skipped:
                tr.write_line(f"  SKIPPED {len(skipped)} claim(s) (see -rs for the reasons)")
            by_class: dict[str, list[dict[str, Any]]] = {}
            for _, _, claims in self.results:
                for c in claims:
                    by_class.setdefault(c["pair_class"], []).append(c)
            if by_class:
                tr.write_line("")
                tr.write_line("divergence by pair class:")
                for cls, claims in sorted(by_class.items()):
                    tr.write_line("  " + _class_line(cls, claims))
            for table in self._source_tables():
                tr.write_line("")
                for line in table.lines():
                    tr.write_line(line)
            if self.metrics:
                tr.write_line("")
                tr.write_line("measured by the claims (flannel_record / record_property):")
                for name, values in sorted(self.metrics.items()):
                    tr.write_line(f"  {name}: n={len(values)}, min {min(values):.4g}, max {max(values):.4g}")
        if self.report_line:
            tr.write_line("")
            tr.write_line(self.report_line)
        if self.report_error:
            tr.write_line("")
            tr.write_line(f"flannel-repro report FAILED (the session exits non-zero): {self.report_error}", red=True)


SNAPSHOT_PROPERTY = "flannel_snapshot"  # what flannel_snapshot records per assertion (plugin.snapshot._record)
_REASONS = {  # why a snapshot assertion compared nothing (plugin.snapshot._record), as the summary says it
    "skipped": "skipped (--flannel-missing-class=skip)",
    "fail-policy": "failed (--flannel-missing-class=fail)",
    "no-band": "failed: no noise band to compare with another class",
    "no-snapshot": "failed: no snapshot stored",
    "written": "written by --snapshot-update",
    "error": "errors",
}


def _junit_xml(config: pytest.Config) -> Any:
    """pytest's JUnit XML writer when --junitxml is on (the object `record_testsuite_property` hands
    properties to; that fixture is session-scoped in the test process, which under xdist is a worker
    without the writer), else None."""
    try:
        from _pytest.junitxml import xml_key
    except ImportError:  # pragma: no cover -- pytest moved it: no testsuite properties then
        return None
    return config.stash.get(xml_key, None)


def _verdict(report: pytest.TestReport, claims: list[dict[str, Any]], sources: bool) -> dict[str, Any]:
    """One claim's line in the report: nodeid, outcome, duration, the first line of why, the plots that show it."""
    from flannel_repro.report.names import plots_for

    message = None
    if report.failed:
        crash = getattr(report.longrepr, "reprcrash", None)
        message = (crash.message if crash is not None else str(report.longrepr)).strip().splitlines()[0][:500]
    elif report.skipped and isinstance(report.longrepr, tuple):
        message = str(report.longrepr[2]).removeprefix("Skipped: ")[:500]
    plots = plots_for(claims, sources=sources)
    outcome = report.outcome if report.outcome in ("passed", "failed", "skipped") else "failed"
    return {
        "nodeid": report.nodeid,
        "outcome": outcome,
        "duration_s": round(float(report.duration), 3),
        "message": message,
        "plots": plots,
    }


def _class_line(cls: str, claims: list[dict[str, Any]]) -> str:
    firsts = sorted({c["first_step"] for c in claims if c.get("first_step") is not None})
    frobs = [c["frobenius"] for c in claims if isinstance(c.get("frobenius"), float)]
    identical = sum(1 for c in claims if c.get("identical") is True)
    parts = [f"{cls}: {len(claims)} check(s)"]
    if identical:
        parts.append(f"{identical} bitwise identical")
    if firsts:
        parts.append("first divergent step " + (str(firsts[0]) if len(firsts) == 1 else f"{firsts[0]}..{firsts[-1]}"))
    elif any("first_step" in c for c in claims):
        parts.append("never diverged")
    if frobs:
        parts.append(f"final ‖ΔW‖_F min {min(frobs):.4g} / max {max(frobs):.4g}")
    return ", ".join(parts)


def _shown_store(url: str | None) -> str:
    """A URL store as the summary and report show it: never with credentials (user info, query)."""
    from flannel_repro.runs.remote import redact

    return redact(url) if url else ""
