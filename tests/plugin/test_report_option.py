"""--flannel-report: the report written once at the end of a session (on the controller under xdist), the
claims and verdicts in its JSON, the plot a failing claim names, GitHub's step summary, and JUnit XML
under the default xunit2 family carrying the session facts without a warning."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pytest

pytest.importorskip("matplotlib", reason="the report needs the 'report' extra (matplotlib)")
jsonschema = pytest.importorskip("jsonschema", reason="the JSON shape is checked with jsonschema (the 'test' extra)")

CLAIMS = """
import pytest
from flannel_repro import assert_diverged, assert_identical

def test_repeatable(trajectory):
    assert_identical(trajectory(42, repeat=0), trajectory(42, repeat=1))

def test_seeds_part(trajectory, flannel_record):
    assert_diverged(trajectory(42), trajectory(43), by_step=1)
    flannel_record("answer", 42.0)

def test_wrong(trajectory):
    assert_identical(trajectory(42), trajectory(43))
"""


@pytest.mark.parametrize("xdist", [[], ["-n", "2"]], ids=["no-xdist", "xdist"])
def test_report_at_the_end_of_a_session(tiny_experiment, xdist, tmp_path, monkeypatch):
    from flannel_repro.report import SCHEMA

    tiny_experiment.makepyfile(CLAIMS)
    summary = tmp_path / "step_summary.md"
    summary.write_text("earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    out = tmp_path / "rep"
    junit = tmp_path / "junit.xml"
    result = tiny_experiment.runpytest_subprocess(
        *xdist, f"--flannel-report={out}", f"--junitxml={junit}", "-W", "error::pytest.PytestWarning"
    )
    result.assert_outcomes(passed=2, failed=1)
    # the failing claim names the plot that shows it
    result.stdout.fnmatch_lines(
        ["*flannel-repro plot*", f"the plot that shows it: divergence-different-train-seeds.png in {out}"]
    )
    result.stdout.fnmatch_lines([f"report: {out}/index.html (* plots, * s); tables appended to $GITHUB_STEP_SUMMARY*"])
    doc = json.loads((out / "report.json").read_text())
    jsonschema.validate(doc, SCHEMA)
    assert doc["verdicts"] == {"passed": 2, "failed": 1, "skipped": 0}
    wrong = next(c for c in doc["claims"] if c["nodeid"].endswith("test_wrong"))
    assert wrong["outcome"] == "failed" and "part at step 1" in wrong["message"]
    assert wrong["plots"] == ["divergence-different-train-seeds.png"]
    assert (out / "divergence-different-train-seeds.png").is_file()
    assert doc["session"]["flannel_runs_trained"] == 3 and doc["session"]["flannel_metric_answer_max"] == 42.0
    assert len(doc["runs"]) == 3
    # appended once, after what was there
    text = summary.read_text()
    assert text.startswith("earlier step\n") and text.count("# flannel-repro report") == 1
    assert "![" not in text and "upload it as an artifact" in text
    # JUnit XML: the facts on the testsuite, nothing of ours on the test cases
    suite = ET.parse(junit).getroot().find("testsuite")
    props = {p.get("name"): p.get("value") for p in suite.find("properties")}
    assert props["flannel_claims_failed"] == "1" and props["flannel_claims_passed"] == "2"
    assert props["flannel_report"] == str(out) and props["flannel_metric_answer_min"] == "42.0"
    assert props["flannel_numerics_classes"] and props["flannel_scale"] == "2 runs x 4 steps"
    for case in suite.iter("testcase"):
        assert case.find("properties") is None, ET.tostring(case)


def test_xunit1_keeps_the_claims_on_the_test_cases(tiny_experiment, tmp_path):
    tiny_experiment.makepyfile(CLAIMS)
    junit = tmp_path / "junit.xml"
    result = tiny_experiment.runpytest_subprocess(f"--junitxml={junit}", "-o", "junit_family=xunit1")
    result.assert_outcomes(passed=2, failed=1)
    suite = ET.parse(junit).getroot().find("testsuite")
    names = {p.get("name") for case in suite.iter("testcase") for p in case.iter("property")}
    assert "flannel_claim" in names


def test_report_option_errors(tiny_experiment, tmp_path):
    tiny_experiment.makepyfile(CLAIMS)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = tiny_experiment.runpytest_subprocess(f"--flannel-report={blocker}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        [
            "*--flannel-report (ini: flannel_report) accepts a folder to write the report into "
            "(created if missing); this path is a file; got *"
        ]
    )
    result = tiny_experiment.runpytest_subprocess(f"--flannel-report={blocker}/sub")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*this path lies under a file*"])


def test_report_without_matplotlib_is_a_usage_error(tiny_experiment, tmp_path):
    tiny_experiment.makepyfile(CLAIMS)
    tiny_experiment.makeconftest("import sys\nsys.modules['matplotlib'] = None  # as if the extra were not installed\n")
    result = tiny_experiment.runpytest_subprocess(f"--flannel-report={tmp_path / 'r'}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert (
        "--flannel-report (ini: flannel_report) accepts a folder for the report, with matplotlib installed for its "
        "plots (pip install 'flannel-repro[report]')"
    ) in result.stderr.str()
    assert not (tmp_path / "r").exists()


def test_report_ini_key(tiny_experiment, tmp_path):
    tiny_experiment.makepyfile("""
        def test_one(trajectory):
            assert trajectory(42).steps == 4
    """)
    tiny_experiment.makeini(
        f"[pytest]\nflannel_config = flannel.toml\nflannel_progress = 0\nflannel_report = {tmp_path / 'r'}\n"
    )
    result = tiny_experiment.runpytest_subprocess()
    result.assert_outcomes(passed=1)
    assert (tmp_path / "r" / "index.html").is_file() and (tmp_path / "r" / "loss.png").is_file()


SNAPSHOTS = """
def test_exact(trajectory, flannel_snapshot):
    assert flannel_snapshot == trajectory(42).summary()

def test_other_class(trajectory, flannel_snapshot):
    assert flannel_snapshot == trajectory(43).summary()
"""


def test_report_counts_the_snapshot_assertions(tiny_experiment, tmp_path):
    """report.json (and the JUnit XML facts) count the snapshot assertions as the terminal summary does, across
    xdist workers: one compared exactly, one not compared (only another class has a snapshot, and no band)."""
    from flannel_repro.report import SCHEMA
    from tests.plugin.conftest import cpu_class

    p = tiny_experiment
    p.makepyfile(test_s=SNAPSHOTS)
    assert p.runpytest_subprocess("--snapshot-update").ret == 0
    snaps = p.path / "__snapshots__" / "test_s"
    klass = cpu_class(threads=1)
    (snaps / f"test_other_class[{klass}].flannel").rename(snaps / "test_other_class[cpu-otherisa-mklother-t1].flannel")
    out, junit = tmp_path / "rep", tmp_path / "junit.xml"
    result = p.runpytest_subprocess("-n", "2", "--flannel-threads=1", f"--flannel-report={out}", f"--junitxml={junit}")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "flannel snapshots: 1 compared exactly, 0 within the noise band, 1 not compared "
            "(1 failed: no noise band to compare with another class)"
        ]
    )
    doc = json.loads((out / "report.json").read_text())
    jsonschema.validate(doc, SCHEMA)
    snap = doc["snapshots"]
    assert {k: snap[k] for k in ("assertions", "compared_exactly", "within_band", "not_compared", "policy")} == {
        "assertions": 2,
        "compared_exactly": 1,
        "within_band": 0,
        "not_compared": 1,
        "policy": "tolerant",
    }
    assert snap["not_compared_by_reason"] == {"no-band": 1}
    items = {i["nodeid"]: i for i in snap["items"]}
    assert (
        items["test_s.py::test_exact"]["comparison"] == "exact"
        and items["test_s.py::test_exact"]["outcome"] == "passed"
    )
    assert items["test_s.py::test_other_class"] == {
        "nodeid": "test_s.py::test_other_class",
        "snapshot": f"test_other_class[{klass}]",
        "comparison": "none",
        "outcome": "failed",
        "reason": "no-band",
        "class": klass,
        "stored": "cpu-otherisa-mklother-t1",
    }
    assert "Snapshots: 1 compared exactly, 0 within the noise band, 1 not compared." in (out / "report.md").read_text()
    props = {q.get("name"): q.get("value") for q in ET.parse(junit).getroot().find("testsuite").find("properties")}
    assert (
        props["flannel_snapshots_compared_exactly"],
        props["flannel_snapshots_within_band"],
        props["flannel_snapshots_not_compared"],
    ) == ("1", "0", "1")
