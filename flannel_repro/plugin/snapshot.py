"""A syrupy extension for run summaries: reviewable snapshot files, tolerant comparison, one file per numerics class.

    def test_training_did_not_move(trajectory, flannel_snapshot):
        assert flannel_snapshot == trajectory(42).summary()

* **Files.** One text file per snapshot, next to syrupy's own:
  ``__snapshots__/<test file>/<test name>[<numerics class>].flannel``. The content is the summary's
  canonical JSON (`flannel_repro.summary`): sorted keys, one value per line, floats written with
  repr (round-trip exact). A second assertion in the same test gets ``[<class>.1]``, a named one
  (``flannel_snapshot(name="final") == ...``) gets ``[<class>.final]``; a pair across classes
  ``[<class a>+<class b>]``.
* **Numerics classes** (`flannel_repro.numerics`: ``cpu-amx-mklamx-t1``, ``cuda-...``) come from the
  summary's environment, so the same test keeps one snapshot per class: trajectories of different
  classes legitimately part at step 1. Snapshots of classes this session does not run (another
  CPU's, a cuda snapshot on a CPU-only CI machine) are left alone: never reported as unused, never
  deleted by ``--snapshot-update``.
* **A class with no snapshot** while other classes have one follows ``--flannel-missing-class``:
  ``tolerant`` (the default) compares with the nearest stored class within the noise band measured
  for the config's scale (`flannel_repro.analysis.noise`), and fails when no band is measured for it;
  ``fail`` fails; ``skip`` (an explicit opt-in) skips. A failure names this run's class, the stored
  ones, the command that records this class (``pytest <node id> --snapshot-update``) and the one
  that measures a band (``flannel-repro noise ... -o <bands file>``). Nothing passes without a
  comparison.
* **Accounting.** Every assertion is recorded on the test's report (user property
  ``flannel_snapshot``, which travels through xdist) as compared exactly (its own class's snapshot),
  within the noise band (another class's, tolerantly), or not compared (skipped by the opt-in policy,
  failed for want of a band or of any snapshot, written by ``--snapshot-update``). The terminal summary
  and the JSON report (`--flannel-report`) count the three.
* **Comparison.** Floats within ``|obtained - stored| <= max(atol, rtol * |stored|)``; ints,
  strings, digests and the config exactly; the environment is stored but not compared. The
  tolerance comes from ``@pytest.mark.flannel(rtol=..., atol=...)``, ``--flannel-rtol`` /
  ``--flannel-atol`` or the ini keys ``flannel_rtol`` / ``flannel_atol`` (default exact).
* **Failures** list the fields that moved (stored, obtained, difference, allowed difference), the
  step at which the digest chains part, and how the stored environment differs from this run's.
* **Updating** is syrupy's: ``pytest --snapshot-update``.

The `flannel_snapshot` fixture (registered by `flannel_repro.plugin`) builds a
`FlannelSnapshotAssertion` with the test's tolerance and missing-class policy.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, cast

import pytest
from syrupy.assertion import DiffMode, SnapshotAssertion
from syrupy.extensions.single_file import SingleFileSnapshotExtension, WriteMode
from syrupy.location import PyTestLocation

from flannel_repro.errors import ArtifactError, FlannelError
from flannel_repro.plugin.report import SNAPSHOT_PROPERTY  # the user property each assertion leaves
from flannel_repro.plugin.session import SESSION_KEY, SNAPSHOT_SUFFIX
from flannel_repro.training.numerics import class_kind
from flannel_repro.analysis.compare import Comparison, Tolerance, compare, display_path
from flannel_repro.analysis.provenance import DEVICE_CLASSES
from flannel_repro.analysis.summary import Summary

if TYPE_CHECKING:
    from syrupy.data import SnapshotCollections
    from syrupy.types import PropertyFilter, PropertyMatcher, SerializableData, SerializedData

__all__ = [
    "COMPARISONS",
    "SNAPSHOT_EXTENSION",
    "SNAPSHOT_PROPERTY",
    "FlannelSnapshotExtension",
    "FlannelSnapshotAssertion",
    "as_summary",
    "nearest_class",
    "snapshot_assertion",
    "snapshot_tag",
    "update_command",
]

SNAPSHOT_EXTENSION = SNAPSHOT_SUFFIX  # "flannel": a suffix no other syrupy extension claims

_LAST_BRACKETS = re.compile(r"\[([^\[\]]*)\]$")
_VISIBLE_KEY = pytest.StashKey[frozenset]()


def as_summary(data: Any) -> Summary:
    """A Summary from a Summary or a Trajectory (its default summary); TypeError for anything else."""
    if isinstance(data, Summary):
        return data
    from flannel_repro.analysis.summary import summarize
    from flannel_repro.storage.run import RunFile

    if isinstance(data, RunFile):
        return summarize(data)
    raise TypeError(
        f"flannel_snapshot compares run summaries: expected a Summary (trajectory(...).summary(), "
        f"summarize_pair(a, b)) or a Trajectory, got {type(data).__name__}."
    )


def read_snapshot_text(path: str | os.PathLike[str]) -> str:
    """A snapshot file's text, newlines read as syrupy's text mode reads them; ArtifactError naming the file and
    the byte offset when it is not UTF-8."""
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ArtifactError(
            f"{path}: expected a UTF-8 snapshot file, got byte 0x{raw[exc.start]:02x} at offset "
            f"{exc.start} ({exc.reason}); restore it, or delete it and write it again with "
            "--snapshot-update."
        ) from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def snapshot_tag(filepath: str) -> tuple[frozenset[str], str] | None:
    """The numerics classes and the index suffix named in a snapshot file name:
    `test_x[cpu-amx-mklamx-t1.1].flannel` -> ({'cpu-amx-mklamx-t1'}, '1'); a pair across classes
    `[A+B]` -> ({A, B}, ''). None when the name carries no recognisable class tag."""
    stem = Path(filepath).name
    if stem.endswith("." + SNAPSHOT_EXTENSION):
        stem = stem[: -len(SNAPSHOT_EXTENSION) - 1]
    m = _LAST_BRACKETS.search(stem)
    if m is None:
        return None
    head, _, suffix = m.group(1).partition(".")
    classes = frozenset(head.split("+"))
    if not classes or not all(class_kind(c) in DEVICE_CLASSES for c in classes):
        return None
    return classes, suffix


def visible_numerics_classes(config: pytest.Config | None) -> frozenset[str] | None:
    """Numerics classes this session's runs get on the devices it runs and this machine has: snapshots
    of other classes (another CPU, a GPU, the device-only names of older versions) are not this
    session's to judge, report as unused, or delete. None outside a flannel session (own everything)."""
    if config is None:
        return None
    cached = config.stash.get(_VISIBLE_KEY, None)
    if cached is not None:
        return cached
    state = config.stash.get(SESSION_KEY, None)
    if state is None:
        return None
    visible = state.numerics_classes()
    config.stash[_VISIBLE_KEY] = visible
    return visible


class FlannelSnapshotExtension(SingleFileSnapshotExtension):
    """Single-file text snapshots of `Summary` objects, compared with a `Tolerance`.

    syrupy instantiates extensions without arguments (on xdist's controller, for instance), so the
    tolerance defaults to exact; `FlannelSnapshotAssertion` passes the test's tolerance.
    """

    file_extension = SNAPSHOT_EXTENSION
    _write_mode = WriteMode.TEXT

    def __init__(self, tolerance: Tolerance | None = None) -> None:
        self.tolerance = tolerance or Tolerance()

    # -- serialization and comparison ----------------------------------------------------------

    def serialize(
        self,
        data: "SerializableData",
        *,
        exclude: "PropertyFilter | None" = None,
        include: "PropertyFilter | None" = None,
        matcher: "PropertyMatcher | None" = None,
    ) -> str:
        """The summary's canonical text (syrupy's include/exclude/matcher do not apply to summaries)."""
        return as_summary(data).to_text()

    def comparison(self, *, serialized_data: "SerializedData", snapshot_data: "SerializedData") -> Comparison:
        return compare(str(snapshot_data), str(serialized_data), self.tolerance)

    def matches(self, *, serialized_data: "SerializableData", snapshot_data: "SerializableData") -> bool:
        return self.comparison(serialized_data=serialized_data, snapshot_data=snapshot_data).ok

    def diff_lines(self, serialized_data: "SerializedData", snapshot_data: "SerializedData") -> Iterator[str]:
        yield from self.comparison(serialized_data=serialized_data, snapshot_data=snapshot_data).report()

    def read_snapshot_data_from_location(
        self, *, snapshot_location: str, snapshot_name: str, session_id: str
    ) -> str | None:
        try:
            return read_snapshot_text(snapshot_location)
        except FileNotFoundError:
            return None

    # -- discovery: our files only, and only for the device classes this session runs -------------

    def discover_snapshots(
        self, *, test_location: "PyTestLocation", ignore_extensions: list[str] | None = None
    ) -> "SnapshotCollections":
        # The plugin puts our suffix in syrupy's ignore list so that other extensions' discovery never
        # sees (and never deletes) summaries of device classes this session does not run; we look.
        keep = [e for e in (ignore_extensions or []) if e != SNAPSHOT_EXTENSION]
        return super().discover_snapshots(test_location=test_location, ignore_extensions=keep)

    def owns_snapshot_collection(self, *, filepath: str, test_location: "PyTestLocation") -> bool:
        if not super().owns_snapshot_collection(filepath=filepath, test_location=test_location):
            return False
        tag = snapshot_tag(filepath)
        if tag is None:
            return True
        visible = visible_numerics_classes(getattr(test_location.item, "config", None))
        return visible is None or tag[0] <= visible


@dataclass(eq=False, order=False, repr=False)
class FlannelSnapshotAssertion(SnapshotAssertion):
    """syrupy's SnapshotAssertion for summaries: names snapshots by device class, compares with a tolerance,
    and explains a mismatch field by field.

    ``flannel_snapshot == summary`` (or a Trajectory) asserts; ``flannel_snapshot(name="x") == ...``
    names the snapshot; ``flannel_snapshot.with_tolerance(rtol=1e-6) == ...`` loosens one assertion.
    """

    tolerance: Tolerance = field(default_factory=Tolerance)
    names_used: dict[str, int] = field(
        default_factory=dict
    )  # numerics class -> assertions so far (shared when derived)
    missing_class: str = "tolerant"  # tolerant (band, else fail) / fail / skip: when only other classes have a snapshot
    noise_bands: Path | None = None  # bands file for tolerant comparisons (None: beside the test file)
    _last_name: str | None = field(init=False, default=None)

    @property
    def extension(self) -> FlannelSnapshotExtension:
        if self._extension is None:
            self._extension = FlannelSnapshotExtension(self.tolerance)
        # syrupy types the field as any extension; use_extension (below) admits only ours
        return cast(FlannelSnapshotExtension, self._extension)

    @property
    def name(self) -> str:
        return self._last_name or "flannel_snapshot"

    def with_tolerance(self, *, rtol: float | None = None, atol: float | None = None) -> "FlannelSnapshotAssertion":
        """The same snapshot fixture with another tolerance (unset parts keep the current one)."""
        tol = Tolerance(
            rtol=self.tolerance.rtol if rtol is None else rtol, atol=self.tolerance.atol if atol is None else atol
        )
        return self._derive(tol)

    def with_defaults(
        self,
        *,
        exclude: "PropertyFilter | None" = None,
        include: "PropertyFilter | None" = None,
        matcher: "PropertyMatcher | None" = None,
        extension_class: type | None = None,
    ) -> "FlannelSnapshotAssertion":
        if exclude or include or matcher or (extension_class not in (None, FlannelSnapshotExtension)):
            raise TypeError(
                "flannel_snapshot compares whole summaries with FlannelSnapshotExtension: "
                "include=, exclude=, matcher= and other extensions are not supported."
            )
        return self._derive(self.tolerance)

    def _derive(self, tolerance: Tolerance) -> "FlannelSnapshotAssertion":
        return self.__class__(
            session=self.session,
            extension_class=FlannelSnapshotExtension,
            test_location=self.test_location,
            update_snapshots=self.update_snapshots,
            update_new_snapshots_only=self.update_new_snapshots_only,
            tolerance=tolerance,
            names_used=self.names_used,
            missing_class=self.missing_class,
            noise_bands=self.noise_bands,
        )

    def _index_for(self, device_spec: str) -> str:
        """The numerics class for a test's first assertion in that class, then `<class>.1`, `<class>.2`;
        `<class>.<name>` when named."""
        custom = self._custom_index
        if custom:
            return f"{device_spec}.{custom}"
        n = self.names_used.get(device_spec, 0)
        self.names_used[device_spec] = n + 1
        return device_spec if n == 0 else f"{device_spec}.{n}"

    def __eq__(self, other: Any) -> bool:
        """Compare a summary (or a Trajectory) with the stored snapshot of its numerics class.

        True when it matches (or was written by --snapshot-update); otherwise raises AssertionError
        with the full explanation (pytest would truncate a long assert explanation outside CI).
        """
        __tracebackhide__ = True
        summary = as_summary(other)
        index = self._index_for(summary.numerics_class)
        self(name=index)  # restored after the assertion, as syrupy does for name=
        self._last_name = self.extension.get_snapshot_name(test_location=self.test_location, index=index)
        if not self.update_snapshots:
            others = self._other_classes(summary.numerics_class, index)
            if others:
                return self._missing_class(summary, others)
        ok = self._assert(summary)
        self._record_own_class(summary.numerics_class, ok)
        if ok:
            return True
        raise AssertionError("\n".join(self.get_assert_diff()))

    def _record_own_class(self, klass: str, ok: bool) -> None:
        """Record what the assertion just made of this class's own snapshot: compared exactly, or not compared
        (no snapshot stored, or one written by --snapshot-update instead of compared)."""
        result = self._execution_results.get(self.num_executions - 1)
        outcome = "passed" if ok else "failed"
        if result is None or result.exception is not None:
            _record(self, "none", outcome, klass, None, reason="error")
        elif result.created or result.updated:
            _record(self, "none", outcome, klass, None, reason="written")
        elif result.recalled_data is None:
            _record(self, "none", outcome, klass, None, reason="no-snapshot")
        else:
            _record(self, "exact", outcome, klass, klass)

    # -- a snapshot stored for other numerics classes only --------------------------------------------

    def _other_classes(self, klass: str, index: str) -> dict[str, Path]:
        """{class: file} of this snapshot stored under other classes of the same device kind(s), when none
        is stored under `klass` itself; {} when this class has its snapshot (or no class has one)."""
        own = Path(self.extension.get_location(test_location=self.test_location, index=index))
        if own.exists():
            return {}
        name = self._last_name or ""
        base = name[: name.rfind("[")] if name.endswith("]") else name
        suffix = index[len(klass) :].lstrip(".")
        kinds = sorted(class_kind(c) for c in klass.split("+"))
        found: dict[str, Path] = {}
        if not own.parent.is_dir():
            return found
        for path in own.parent.iterdir():
            if not path.name.startswith(base + "[") or path.name.count("[") != base.count("[") + 1:
                continue
            tag = snapshot_tag(str(path))
            if tag is None or tag[1] != suffix:
                continue
            head = path.name[len(base) + 1 :].rsplit("]", 1)[0].partition(".")[0]
            if head != klass and sorted(class_kind(c) for c in head.split("+")) == kinds:
                found[head] = path
        return found

    def _missing_class(self, summary: Summary, others: dict[str, Path]) -> bool:
        """Only other classes have this snapshot: compare within the noise band (tolerant, the default), or
        fail, or skip (opt-in). Without a band the tolerant policy fails: nothing passes uncompared."""
        __tracebackhide__ = True
        klass = summary.numerics_class
        nearest = nearest_class(klass, others)
        head = (
            f"flannel snapshot {self._last_name}: no snapshot for this run's numerics class {klass}; "
            f"stored for: {', '.join(sorted(others))}"
        )
        record = f"record this class: {update_command(self.test_location.item)} (then review and commit the new file)"
        choose = (
            "policy: --flannel-missing-class=tolerant|fail|skip (ini flannel_missing_class; this session: "
            f"{self.missing_class})"
        )
        if self.missing_class == "skip":
            _record(self, "none", "skipped", klass, nearest, reason="skipped")
            pytest.skip(f"{head}. Nothing was compared (skipped by the opt-in --flannel-missing-class=skip); {record}.")
        if self.missing_class == "fail":
            _record(self, "none", "failed", klass, nearest, reason="fail-policy")
            raise AssertionError(
                f"{head}.\n  Nothing was compared (--flannel-missing-class=fail).\n  To {record}.\n  {choose}."
            )
        from flannel_repro.analysis.noise import DEFAULT_FILE, read_bands, summary_scale, compare_within_band

        bands_file = self.noise_bands or Path(self.test_location.filepath).parent / DEFAULT_FILE
        try:
            scale = summary_scale(summary)
            band = read_bands(bands_file).get(scale)
        except Exception:
            _record(self, "none", "failed", klass, nearest, reason="error")
            raise
        if band is None:
            _record(self, "none", "failed", klass, nearest, reason="no-band")
            shown = display_path(str(bands_file))
            raise AssertionError(
                f"{head}.\n  Nothing was compared: comparing with another class needs a noise band for scale {scale}, "
                f"and {shown} has none.\n  To {record};\n  or measure a band: flannel-repro noise --config FILE "
                f"-o {shown} (see docs/gate.md, 'Numerics classes').\n  {choose}."
            )
        try:
            stored = read_snapshot_text(others[nearest])
        except FlannelError as exc:
            _record(self, "none", "failed", klass, nearest, reason="error")
            raise AssertionError(f"flannel snapshot {self._last_name}: {exc}") from None
        cmp = compare_within_band(stored, summary, band)
        _record(self, "band", "passed" if cmp.ok else "failed", klass, nearest)
        if cmp.ok:
            return True
        lines = cmp.report(name=self._last_name or "", location=str(others[nearest]))
        lines.insert(1, f"  compared with the nearest stored class {nearest} ({choose}; or {record})")
        raise AssertionError("\n".join(lines))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"<flannel_snapshot {self.name}, tolerance {self.tolerance}>"

    def assert_match(self, data: "SerializableData") -> None:
        __tracebackhide__ = True
        self == data  # noqa: B015  (raises AssertionError with the explanation on a mismatch)

    def get_assert_diff(self, *, diff_mode: DiffMode = DiffMode.DETAILED) -> list[str]:
        result = self._execution_results[self.num_executions - 1]
        if isinstance(result.exception, FlannelError):  # a snapshot file that cannot be read: said, no traceback
            return [f"flannel snapshot {result.snapshot_name}: {result.exception}"]
        if result.exception is not None:
            return super().get_assert_diff(diff_mode=diff_mode)
        location = result.snapshot_location
        if result.recalled_data is None:
            return [
                f"no stored snapshot {result.snapshot_name} ({display_path(location)}): nothing was compared. "
                f"Write it with {update_command(self.test_location.item)}, then review and commit it"
            ]
        cmp = compare(str(result.recalled_data), str(result.asserted_data), self.tolerance)
        lines = cmp.report(name=result.snapshot_name, location=location)
        return lines if diff_mode == DiffMode.DETAILED else lines[:1]


def nearest_class(klass: str, candidates: "dict[str, Any] | list[str]") -> str:
    """The stored class closest to `klass`: most '-'-separated parts in common (device kind, oneDNN ISA,
    MKL path, threads), then the name; a pair compares part by part."""
    mine = set(klass.replace("+", "-").split("-"))
    return min(candidates, key=lambda c: (-len(mine & set(c.replace("+", "-").split("-"))), c))


def update_command(item: Any) -> str:
    """The command that records a test's snapshots for this run's class: ``pytest <node id> --snapshot-update``,
    the node id's file relative to where pytest was invoked (the node id itself when that cannot be said)."""
    nodeid = str(getattr(item, "nodeid", "") or "")
    path = getattr(item, "path", None)
    config = getattr(item, "config", None)
    if path is not None and config is not None and "::" in nodeid:
        try:
            rel = os.path.relpath(Path(path), Path(config.invocation_params.dir))
            nodeid = rel.replace(os.sep, "/") + "::" + nodeid.split("::", 1)[1]
        except (ValueError, AttributeError, TypeError):
            pass
    return f"pytest {shlex.quote(nodeid)} --snapshot-update"


COMPARISONS = ("exact", "band", "none")  # compared exactly / within the noise band / not compared


def _record(
    assertion: FlannelSnapshotAssertion,
    comparison: str,
    outcome: str,
    klass: str,
    stored: str | None,
    *,
    reason: str | None = None,
) -> None:
    """Note one snapshot assertion on the test's report, for the terminal summary and the JSON report (user
    properties travel through xdist). `comparison`: exact, band or none; `reason` why nothing was compared:
    skipped (opt-in policy), fail-policy, no-band, no-snapshot, written (--snapshot-update), error."""
    item = getattr(assertion.test_location, "item", None)
    if item is not None:
        item.user_properties.append(
            (
                SNAPSHOT_PROPERTY,
                json.dumps(
                    {
                        "nodeid": item.nodeid,
                        "snapshot": assertion._last_name,
                        "comparison": comparison,
                        "outcome": outcome,
                        "reason": reason,
                        "policy": assertion.missing_class,
                        "class": klass,
                        "stored": stored,
                        "cross_class": stored is not None and stored != klass,
                    }
                ),
            )
        )


def snapshot_assertion(request: pytest.FixtureRequest, tolerance: Tolerance) -> FlannelSnapshotAssertion:
    """The `flannel_snapshot` fixture's value for one test."""
    session = getattr(request.config, "_syrupy", None)
    if session is None:
        pytest.fail(
            "flannel_snapshot needs the syrupy pytest plugin: expected an active syrupy session, got none "
            "(is syrupy installed, and not disabled with -p no:syrupy?).",
            pytrace=False,
        )
    option = request.config.option
    state = request.config.stash[SESSION_KEY]
    return FlannelSnapshotAssertion(
        session=session,
        extension_class=FlannelSnapshotExtension,
        test_location=PyTestLocation(request.node),
        update_snapshots=bool(option.update_snapshots),
        update_new_snapshots_only=bool(getattr(option, "update_new_snapshots_only", False)),
        tolerance=tolerance,
        missing_class=state.missing_class,
        noise_bands=state.noise_bands,
    )
