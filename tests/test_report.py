"""The report: every plot written and showing its data, the page holding them, the JSON document in its
documented shape, the CSV files, errors that leave nothing behind, and the page in a real headless browser."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from flannel_repro.errors import ArtifactError, ConfigError
from flannel_repro.training.store import RunStore

from tests.conftest import TINY

matplotlib = pytest.importorskip("matplotlib", reason="the report needs the 'report' extra (matplotlib)")
jsonschema = pytest.importorskip("jsonschema", reason="the JSON shape is checked with jsonschema (the 'test' extra)")

from flannel_repro.report import SCHEMA, write_report  # noqa: E402
from flannel_repro.report.names import STALL_PLOT  # noqa: E402

STEPS = 12
BASE = TINY.replace(steps=STEPS)

# what each source of divergence needs, plus float32 weights for the stall plot's cure
VARIANTS = [
    (BASE.with_train_seed(42), 0), (BASE.with_train_seed(43), 0), (BASE.with_train_seed(44), 0),
    (BASE.with_train_seed(42), 1),
    (BASE.replace(model_seed=42, data_seed=43), 0), (BASE.replace(model_seed=43, data_seed=42), 0),
    (BASE.with_train_seed(42).replace(threads=2), 0),
    (BASE.with_train_seed(42).replace(dtype="float32", amp="none"), 0),
]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("report-runs")
    store = RunStore(root)
    for cfg, repeat in VARIANTS:
        store.obtain(cfg, repeat=repeat)
    return root


@pytest.fixture(scope="module")
def report(artifacts: Path, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    return write_report([artifacts], tmp_path_factory.mktemp("report") / "out")


def _png_pixels(path: Path) -> np.ndarray:
    import matplotlib.image

    return matplotlib.image.imread(str(path))


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_every_plot_is_written_and_not_blank(report) -> None:  # noqa: ANN001
    doc = report.document
    files = {f["file"] for f in doc["figures"]}
    expected = {"divergence-different-train-seeds.png", "divergence-data-order-only-model-seed-fixed.png",
                "divergence-model-init-only-data-seed-fixed.png", "divergence-same-config-separate-trainings.png",
                "divergence-different-threads.png", "live-dead-share.png", "loss.png", "seed-matrix.png",
                STALL_PLOT, "sources.png"}
    assert expected <= files, expected - files
    for name in files:
        pixels = _png_pixels(report.folder / name)
        assert pixels.shape[0] > 200 and pixels.shape[1] > 300, name
        rgb = pixels[..., :3]
        ink = (rgb.min(axis=2) < 0.9).mean()  # share of pixels that are not (near) white
        assert ink > 0.02, f"{name}: only {ink:.1%} of the image is drawn"
        assert rgb.std() > 0.05, name


def test_axes_show_the_data(report) -> None:  # noqa: ANN001
    """Each plot's axis limits hold the data's range, read back independently from the CSV files."""
    figures = {f.file: f for f in _figures_of(report)}
    rows = _read_csv(report.folder / "divergence.csv")
    seeds = [r for r in rows if r["pair_class"] == "different train seeds"]
    frob = np.array([float(r["frobenius"]) for r in seeds if r["frobenius"] and float(r["frobenius"]) > 0])
    steps = np.array([int(r["step"]) for r in seeds])
    fig = figures["divergence-different-train-seeds.png"]
    assert fig.xlim[0] <= steps.min() + 1 and fig.xlim[1] >= steps.max()
    assert fig.ylim[0] <= frob.min() and fig.ylim[1] >= frob.max()
    assert fig.ylim[0] > frob.min() / 10 and fig.ylim[1] < frob.max() * 10  # a log axis fitted to the data
    losses = np.array([float(r["loss"]) for r in _read_csv(report.folder / "steps.csv") if r["loss"]])
    fig = figures["loss.png"]
    assert fig.ylim[0] <= losses.min() and fig.ylim[1] >= losses.max()
    assert fig.ylim[1] - fig.ylim[0] < 2 * (losses.max() - losses.min())
    # the update plot draws the float32 run (the cure) and the bf16 run of its seed (the cause), at least
    drawn = [r for r in _read_csv(report.folder / "steps.csv") if r["run"] == "s42" or "float32" in r["run"]]
    changed = np.array([float(r["changed"]) for r in drawn if r["changed"]])
    fig = figures[STALL_PLOT]
    assert fig.ylim[0] <= changed[changed > 0].min() and fig.ylim[1] >= changed.max()


def _figures_of(report):  # noqa: ANN001, ANN202
    """The Figure objects (with axis limits) of the same report, drawn again from the same runs."""
    from flannel_repro.report.compute import collect
    from flannel_repro.report.figures import all_figures

    runs = [r["path"] for r in report.document["runs"]]
    return all_figures(collect(runs))


def test_page_references_every_image_and_table(report) -> None:  # noqa: ANN001
    doc = report.document
    page = (report.folder / "index.html").read_text()
    md = (report.folder / "report.md").read_text()
    images = set(re.findall(r'<img src="([^"]+)"', page))
    assert images == {f["file"] for f in doc["figures"]}
    assert set(re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)) == images
    for name in images:
        assert (report.folder / name).is_file()
    for title in ("Runs", "Divergence by pair class", "Divergence by source", "Update fraction"):
        assert f"<h2>{title}" in page and f"## {title}" in md
    for f in doc["files"]:
        assert (report.folder / f).is_file(), f


def test_json_has_its_documented_shape_and_agrees_with_the_csv(report) -> None:  # noqa: ANN001
    doc = json.loads((report.folder / "report.json").read_text())
    jsonschema.validate(doc, SCHEMA)
    assert len(doc["runs"]) == len(VARIANTS)
    rows = _read_csv(report.folder / "divergence.csv")
    final = {(r["a"], r["b"]): float(r["frobenius"]) for r in rows if int(r["step"]) == STEPS}
    for cls in doc["pair_classes"]:
        for p in cls["pairs"]:
            assert final[(p["a"], p["b"])] == pytest.approx(p["final_frobenius"], rel=1e-12, abs=0)
    same = next(c for c in doc["pair_classes"] if c["class"] == "same config, separate trainings")
    assert same["identical"] == same["n_pairs"] and same["final_frobenius_max"] == 0
    seeds = next(c for c in doc["pair_classes"] if c["class"] == "different train seeds")
    assert seeds["first_step_min"] == 1 and seeds["n_pairs"] == 3
    assert doc["matrix"]["runs"] == ["s42", "s43", "s44"]
    sources = {r["source"]: r for r in doc["sources"]["rows"]}
    assert set(sources) == {"data_order", "model_init", "threads", "none"}
    assert sources["none"]["first_step"] is None and sources["data_order"]["first_step"] == 1


def test_update_statistics_in_the_report(report) -> None:  # noqa: ANN001
    rows = _read_csv(report.folder / "steps.csv")
    by_run: dict[str, list[dict[str, str]]] = {}
    for r in rows:
        by_run.setdefault(r["run"], []).append(r)
    f32 = next(v for k, v in by_run.items() if "float32" in k)
    bf16 = by_run["s42"]
    assert all(float(r["changed"]) > 0.99 for r in f32[1:])  # float32 weights take (nearly) every update
    assert all(float(r["lost"]) < 1e-3 for r in f32[1:])
    # an entry that did not change either had no proposed update or lost it: lost <= 1 - changed
    for r in bf16[1:]:
        assert 0 <= float(r["lost"]) <= 1 - float(r["changed"]) + 1e-6
    assert sum(float(r["lost"]) for r in bf16[1:]) > 0  # bf16 loses some updates to rounding
    assert all(0 < float(r["second_moment_moved"]) <= 1 for r in bf16[1:])
    assert f32[0]["changed"] == "" and bf16[0]["lost"] == ""  # unknown at step 0: empty, not 0


def test_a_second_report_removes_plots_it_no_longer_draws(artifacts: Path, tmp_path: Path) -> None:
    out = tmp_path / "rep"
    first = write_report([artifacts], out)
    assert (out / "sources.png").exists()
    two = [r["path"] for r in first.document["runs"] if r["name"] in ("s42", "s43")]
    second = write_report(two, out)
    assert not (out / "sources.png").exists() and not (out / "seed-matrix.png").exists() or \
        "seed-matrix.png" in second.files
    assert set(second.document["files"]) <= {p.name for p in out.iterdir()}
    assert len(first.document["figures"]) > len(second.document["figures"])


def test_errors_name_the_thing_and_leave_nothing(artifacts: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ArtifactError, match=r"report: expected a run artifact or a directory of them, got .*nope"):
        write_report([tmp_path / "nope"], tmp_path / "a")
    assert not (tmp_path / "a").exists()
    with pytest.raises(ArtifactError, match=r"found none"):
        write_report([tmp_path], tmp_path / "b")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ArtifactError, match=r"expected a folder to write into, got .*file.* \(a file\)"):
        write_report([artifacts], a_file)
    # a damaged artifact: refused before anything is written
    bad = tmp_path / "bad"
    bad.mkdir()
    src = next(artifacts.glob("seed42-*-r0-*.safetensors"))
    data = bytearray(src.read_bytes())
    data[-5] ^= 0xFF  # a byte of W's last step
    (bad / src.name).write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="failed verification"):
        write_report([bad], tmp_path / "c")
    assert not (tmp_path / "c").exists()
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if the extra were not installed
    with pytest.raises(ConfigError, match=r"pip install 'flannel-repro\[report\]'"):
        write_report([artifacts], tmp_path / "d")
    assert not (tmp_path / "d").exists()


def test_cli_report_and_json(artifacts: Path, tmp_path: Path) -> None:
    cli = [sys.executable, "-m", "flannel_repro"]
    out = tmp_path / "cli"
    got = subprocess.run([*cli, "report", str(artifacts), "-o", str(out), "--json"], capture_output=True, text=True)
    assert got.returncode == 0, got.stderr
    jsonschema.validate(json.loads(got.stdout), SCHEMA)
    assert (out / "index.html").is_file()
    got = subprocess.run([*cli, "report", str(tmp_path / "missing"), "-o", str(out)], capture_output=True, text=True)
    assert got.returncode == 3 and "missing" in got.stderr and "Traceback" not in got.stderr
    doc = json.loads((out / "report.json").read_text())
    runs = [r["path"] for r in doc["runs"] if r["name"] in ("s42", "s43")]
    got = subprocess.run([*cli, "divergence", "--csv", *runs], capture_output=True, text=True)
    assert got.returncode == 0, got.stderr
    rows = list(csv.DictReader(got.stdout.splitlines()))
    assert len(rows) == STEPS + 1 and rows[0]["frobenius"] == "0.0" and float(rows[-1]["frobenius"]) > 0


def _browser() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


def test_page_renders_in_a_headless_browser(report, tmp_path: Path) -> None:  # noqa: ANN001
    browser = _browser()
    if browser is None:
        pytest.skip("no headless browser installed (Debian: apt-get install chromium; .ci/run installs it)")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--allow-file-access-from-files", "--virtual-time-budget=10000"]
    url = (report.folder / "index.html").resolve().as_uri()
    dom = subprocess.run([browser, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    n = len(report.document["figures"])
    assert f'data-images-loaded="{n}/{n}"' in dom.stdout, re.findall(r"data-images-loaded=\"[^\"]*\"", dom.stdout)
    shot = tmp_path / "page.png"
    got = subprocess.run([browser, *flags, f"--screenshot={shot}", "--window-size=1280,2400", url],
                         capture_output=True, text=True, timeout=120)
    assert got.returncode == 0 and shot.is_file(), got.stderr[-2000:]
    rgb = _png_pixels(shot)[..., :3]
    assert (rgb.min(axis=2) < 0.9).mean() > 0.02  # the page drew text, tables and plots, not a blank window


def test_runs_recorded_without_W_are_listed_not_compared(artifacts: Path, tmp_path: Path) -> None:
    """A digests-only run (record_W = false) is in the runs and the loss plot, and a note says why it is in no pair."""
    store = RunStore(tmp_path / "more")
    lean = store.obtain(BASE.with_train_seed(45).replace(record_W=False)).trajectory.path
    first = write_report([artifacts], tmp_path / "all")
    runs = [r["path"] for r in first.document["runs"] if r["name"] in ("s42", "s43")] + [lean]
    result = write_report(runs, tmp_path / "rep")
    doc = result.document
    assert any("record_W = false" in n and "s45" in n for n in doc["notes"]), doc["notes"]
    assert "s45" in {r["name"] for r in doc["runs"]}
    assert all("s45" not in (p["a"], p["b"]) for c in doc["pair_classes"] for p in c["pairs"])


def test_the_markdown_page_escapes_what_it_quotes_as_the_html_page_does(report) -> None:  # noqa: ANN001
    """A test id or a message holding markup, a pipe or a backtick is quoted as text in report.md too."""
    from flannel_repro.report import markdown, page_html

    evil = "<script>alert(1)</script> & a|b `c`\nnext"
    doc = dict(report.document, claims=[{"nodeid": f"test_x.py::test[{evil}]", "outcome": "failed", "message": evil,
                                         "plots": []}], verdicts={"passed": 0, "failed": 1, "skipped": 0},
               notes=[evil])
    md, page = markdown(doc), page_html(doc)
    assert "<script>alert" not in md and "<script>alert" not in page
    row = next(line for line in md.splitlines() if line.startswith("| FAILED"))
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; a\\|b \\`c\\` next" in row
    assert row.count(" | ") == 3  # four cells: the pipe in the text does not add one
    assert "Note: &lt;script&gt;" in md
