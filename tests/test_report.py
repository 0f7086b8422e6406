"""The report: every plot written and showing its data with ticks a reader can use, an identical pair said in
words instead of an empty chart, verdicts styled per kind, the page holding them, the JSON document in its
documented shape, the CSV files, errors that leave nothing behind, and the page in a real headless browser."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from flannel_repro.errors import ArtifactError, ConfigError
from flannel_repro.runs.store import RunStore

from tests.conftest import TINY

matplotlib = pytest.importorskip("matplotlib", reason="the report needs the 'report' extra (matplotlib)")
jsonschema = pytest.importorskip("jsonschema", reason="the JSON shape is checked with jsonschema (the 'test' extra)")

from flannel_repro.report import SCHEMA, write_report  # noqa: E402
from flannel_repro.report.names import STALL_PLOT  # noqa: E402

STEPS = 12
IDENTICAL_PLOT = "divergence-same-config-separate-trainings.png"  # the class of repeats: bitwise identical, not drawn
BASE = TINY.replace(steps=STEPS)

# what each source of divergence needs, plus float32 weights for the stall plot's cure
VARIANTS = [
    (BASE.with_train_seed(42), 0),
    (BASE.with_train_seed(43), 0),
    (BASE.with_train_seed(44), 0),
    (BASE.with_train_seed(42), 1),
    (BASE.replace(model_seed=42, data_seed=43), 0),
    (BASE.replace(model_seed=43, data_seed=42), 0),
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
def report(artifacts: Path, tmp_path_factory: pytest.TempPathFactory):
    return write_report([artifacts], tmp_path_factory.mktemp("report") / "out")


def _png_pixels(path: Path) -> np.ndarray:
    import matplotlib.image

    return matplotlib.image.imread(str(path))


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


class _Page(HTMLParser):
    """What the checks read of a page: its images, its table cells (class, text), each h3 of the Plots section
    with the images and text under it, and the inline style."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.images: list[str] = []
        self.cells: list[tuple[str, str]] = []
        self.sections: list[dict] = []
        self.style = ""
        self._in: str | None = None
        self._cell: list[str] | None = None
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        if tag == "img":
            self.images.append(a["src"])
            if self.sections:
                self.sections[-1]["images"].append(a["src"])
        elif tag == "td":
            self._cell = [a.get("class") or "", ""]
        elif tag == "h3":
            self.sections.append({"id": a.get("id"), "title": "", "images": [], "text": ""})
            self._in = "h3"
        elif tag in ("p", "style"):
            self._in = tag

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._cell is not None:
            self.cells.append((self._cell[0], self._cell[1]))
            self._cell = None
        elif tag in ("h3", "p", "style"):
            self._in = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell[1] += data
        elif self._in == "h3":
            self.sections[-1]["title"] += data
        elif self._in == "p" and self.sections:
            self.sections[-1]["text"] += data
        elif self._in == "style":
            self.style += data


def test_every_plot_is_written_and_not_blank(report) -> None:
    doc = report.document
    files = {f["file"] for f in doc["figures"]}
    expected = {
        "divergence-different-train-seeds.png",
        "divergence-data-order-only-model-seed-fixed.png",
        "divergence-model-init-only-data-seed-fixed.png",
        "live-dead-share.png",
        "loss.png",
        "seed-matrix.png",
        STALL_PLOT,
        "sources.png",
    }
    assert expected <= files, expected - files
    assert IDENTICAL_PLOT not in files and not (report.folder / IDENTICAL_PLOT).exists()  # said in words instead
    for c in doc["pair_classes"]:  # a class is drawn where a pair parted (threads: machine-dependent), else said
        drawn = c["identical"] < c["n_pairs"]
        assert (c["plot"] in files) == drawn and (c["plot"] is None) == (not drawn), c
    for name in files:
        pixels = _png_pixels(report.folder / name)
        assert pixels.shape[0] > 200 and pixels.shape[1] > 300, name
        rgb = pixels[..., :3]
        ink = (rgb.min(axis=2) < 0.9).mean()  # share of pixels that are not (near) white
        assert ink > 0.02, f"{name}: only {ink:.1%} of the image is drawn"
        assert rgb.std() > 0.05, name


@pytest.fixture(scope="module")
def figures(report):
    """The Figure objects (with axis limits and ticks) of the same report, drawn again from the same runs."""
    from flannel_repro.report.compute import collect
    from flannel_repro.report.figures import all_figures

    runs = [r["path"] for r in report.document["runs"]]
    return {f.file: f for f in all_figures(collect(runs))}


def test_axes_show_the_data(report, figures) -> None:
    """Each plot's axis limits hold the data's range, read back independently from the CSV files."""
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


def test_axes_have_ticks_a_reader_can_use(figures) -> None:
    """Every log value axis has at least two labelled ticks in view; the step axis of a short run (here 12
    steps) is linear with at least three labelled steps."""
    assert set(figures) >= {"divergence-different-train-seeds.png", "sources.png", STALL_PLOT}
    for f in figures.values():
        if f.yscale == "log":
            assert len(f.yticks) >= 2, (f.file, f.ylim, f.yticks)
        if f.file.startswith("divergence-") or f.file == "sources.png":
            assert f.yscale == "log" and f.xscale == "linear", f.file
            assert len(f.xticks) >= 3, (f.file, f.xlim, f.xticks)
            assert all(float(label) == pos and pos == int(pos) for pos, label in f.xticks), f.xticks  # whole steps


def _pair(steps: int, frobenius: np.ndarray, first_step: int | None):
    from flannel_repro.report.compute import PairResult

    return PairResult(
        a=0,
        b=1,
        pair_class="x",
        steps=np.arange(steps + 1),
        frobenius=frobenius,
        frobenius_live=frobenius,
        max_abs=frobenius / 3,
        rows_differ=np.zeros(steps + 1),
        first_step=first_step,
    )


@pytest.mark.parametrize(
    "steps, frobenius, scale",
    [
        (8, np.r_[0.0, np.geomspace(1e-4, 1e-1, 8)], "linear"),  # the issue's 8-step run
        (8, np.r_[0.0, np.linspace(3.1, 3.4, 8)], "linear"),  # a value axis spanning less than one mantissa step
        (1000, np.r_[0.0, np.geomspace(1e-6, 1.0, 1000)], "symlog"),
        (100, np.r_[0.0, np.linspace(0.02, 0.03, 100)], "symlog"),
    ],
    ids=["8-steps", "8-steps-narrow", "1000-steps", "100-steps-narrow"],
)
def test_step_and_value_axes_of_short_and_long_runs(steps: int, frobenius: np.ndarray, scale: str) -> None:
    """Drawn from made-up divergence curves: a short run's step axis labels every step, a long run's a
    1-2-5 log sequence; the log value axis has at least two labelled ticks however narrow its range."""
    from flannel_repro.report.compute import Collected
    from flannel_repro.report.figures import pair_class_figure, require_matplotlib

    data = Collected(runs=[SimpleNamespace(name="a"), SimpleNamespace(name="b")])
    fig = pair_class_figure(require_matplotlib(), data, "x", [_pair(steps, frobenius, 1)])
    assert fig.xscale == scale and fig.yscale == "log"
    shown = [pos for pos, _ in fig.xticks]
    if steps == 8:
        assert shown == list(range(1, 9)), fig.xticks  # every step with a value (0 is equal: not on a log axis)
    else:
        assert {1, 10, 100} <= set(shown) and len(shown) >= 5 and 2 in shown, fig.xticks
        assert all(label == str(int(pos)) for pos, label in fig.xticks), fig.xticks  # plain step numbers
    assert len(fig.yticks) >= 2 and len({label for _, label in fig.yticks}) == len(fig.yticks), fig.yticks
    assert fig.ylim[0] <= frobenius[1:].min() and fig.ylim[1] >= frobenius.max()


def test_an_identical_pair_is_a_line_of_text_not_a_chart(report) -> None:
    """The repeats of one config are bitwise identical: no chart (and no empty log axes), a line of text in its
    place on both pages, under a heading whose anchor is the plot's name; a class that parted keeps its chart."""
    from flannel_repro.report.compute import Collected
    from flannel_repro.report.figures import pair_class_figure, require_matplotlib

    doc = report.document
    same = next(c for c in doc["pair_classes"] if c["class"] == "same config, separate trainings")
    assert same["plot"] is None and same["steps"] == STEPS and same["identical"] == same["n_pairs"]
    page = _Page((report.folder / "index.html").read_text())
    assert IDENTICAL_PLOT not in page.images
    section = next(s for s in page.sections if s["id"] == IDENTICAL_PLOT)
    assert section["images"] == [] and f"bitwise identical over all {STEPS} steps" in section["text"], section
    for c in doc["pair_classes"]:
        if c["plot"] is not None:
            assert next(s for s in page.sections if s["id"] == c["plot"])["images"] == [c["plot"]]
    md = (report.folder / "report.md").read_text()
    block = md.split("### Divergence: same config, separate trainings\n", 1)[1].split("\n### ", 1)[0]
    assert f"bitwise identical over all {STEPS} steps" in block and "![" not in block, block
    data = Collected(runs=[SimpleNamespace(name="a"), SimpleNamespace(name="b")])
    assert pair_class_figure(require_matplotlib(), data, "x", [_pair(8, np.zeros(9), None)]) is None


VERDICT_WORDS = {
    "EXACT": "exact",
    "WITHIN BAND": "band",
    "PARTED": "parted",
    "PASSED": "passed",
    "FAILED": "failed",
    "SKIPPED": "skipped",
    "NOT COMPARED": "none",
}


def _verdict_kind(text: str) -> str | None:
    return next((kind for word, kind in VERDICT_WORDS.items() if text.startswith(word)), None)


def test_verdict_cells_carry_a_word_and_their_class(report) -> None:
    """Every verdict in the tables (exact, within band, parted; passed, failed, skipped; not compared) starts with
    its word and carries `verdict v-<kind>`, which the page's own style colours: colour is never alone."""
    from flannel_repro.report import markdown, page_html

    items = [
        {
            "nodeid": f"t.py::test_{c}",
            "snapshot": f"test_{c}[k]",
            "comparison": c,
            "outcome": o,
            "reason": None if c != "none" else "no-band",
            "class": "k",
            "stored": None,
        }
        for c, o in (("exact", "passed"), ("band", "passed"), ("none", "skipped"))
    ]
    doc = dict(
        report.document,
        claims=[
            {"nodeid": f"t.py::test_{o}", "outcome": o, "message": None, "plots": [], "duration_s": 0.1}
            for o in ("passed", "failed", "skipped")
        ],
        verdicts={"passed": 1, "failed": 1, "skipped": 1},
        snapshots={
            "assertions": 3,
            "compared_exactly": 1,
            "within_band": 1,
            "not_compared": 1,
            "not_compared_by_reason": {"no-band": 1},
            "policy": "tolerant",
            "items": items,
        },
    )
    for text in (page_html(doc), (report.folder / "index.html").read_text()):
        page = _Page(text)
        seen = set()
        for cls, cell in page.cells:
            kind = _verdict_kind(cell)
            if "verdict" in cls.split():
                assert kind is not None and cls.split() == ["verdict", f"v-{kind}"], (cls, cell)
                seen.add(kind)
            elif kind is not None:
                pytest.fail(f"a verdict cell without its class: {cell!r}")
        for kind in seen:
            rule = re.search(rf"\.v-{kind}\{{([^}}]*)\}}", page.style)
            assert rule and "background:" in rule.group(1) and "color:" in rule.group(1), (kind, page.style)
    assert seen >= {"exact", "parted"}  # the report's own page: the pair classes and the sources
    page = _Page(page_html(doc))
    assert {_verdict_kind(cell) for cls, cell in page.cells if "verdict" in cls} == set(VERDICT_WORDS.values())
    colours = {
        kind: re.search(rf"\.v-{kind}\{{background:([^;]+);", page.style).group(1)
        for kind in ("exact", "parted", "failed")
    }
    assert len(set(colours.values())) == 3, colours
    md = markdown(doc)
    assert "| FAILED |" in md and "| WITHIN BAND | PASSED |" in md and "| NOT COMPARED | SKIPPED |" in md
    assert re.search(r"\| same config, separate trainings \| EXACT \|", md) and "| PARTED |" in md


def test_page_references_every_image_and_table(report) -> None:
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


def test_json_has_its_documented_shape_and_agrees_with_the_csv(report) -> None:
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


def test_update_statistics_in_the_report(report) -> None:
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
    assert (
        not (out / "sources.png").exists()
        and not (out / "seed-matrix.png").exists()
        or "seed-matrix.png" in second.files
    )
    assert set(second.document["files"]) <= {p.name for p in out.iterdir()}
    assert len(first.document["figures"]) > len(second.document["figures"])


def test_errors_name_the_thing_and_leave_nothing(
    artifacts: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
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


def test_page_renders_in_a_headless_browser(report, tmp_path: Path) -> None:
    browser = _browser()
    if browser is None:
        pytest.skip("no headless browser installed (Debian: apt-get install chromium; .ci/run installs it)")
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--allow-file-access-from-files",
        "--virtual-time-budget=10000",
    ]
    url = (report.folder / "index.html").resolve().as_uri()
    dom = subprocess.run([browser, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    n = len(report.document["figures"])
    assert f'data-images-loaded="{n}/{n}"' in dom.stdout, re.findall(r"data-images-loaded=\"[^\"]*\"", dom.stdout)
    # the style coloured every verdict cell, and the identical pair is a line of text (no image) in the browser too
    v = sum(1 for cls, _ in _Page((report.folder / "index.html").read_text()).cells if "verdict" in cls.split())
    assert v > 0 and f'data-verdicts-coloured="{v}/{v}"' in dom.stdout, re.findall(
        r"data-verdicts-\w+=\"[^\"]*\"", dom.stdout
    )
    rendered = _Page(dom.stdout)
    section = next(s for s in rendered.sections if s["id"] == IDENTICAL_PLOT)
    assert section["images"] == [] and f"bitwise identical over all {STEPS} steps" in section["text"]
    shot = tmp_path / "page.png"
    got = subprocess.run(
        [browser, *flags, f"--screenshot={shot}", "--window-size=1280,2400", url],
        capture_output=True,
        text=True,
        timeout=120,
    )
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


def test_the_markdown_page_escapes_what_it_quotes_as_the_html_page_does(report) -> None:
    """A test id or a message holding markup, a pipe or a backtick is quoted as text in report.md too."""
    from flannel_repro.report import markdown, page_html

    evil = "<script>alert(1)</script> & a|b `c`\nnext"
    doc = dict(
        report.document,
        claims=[{"nodeid": f"test_x.py::test[{evil}]", "outcome": "failed", "message": evil, "plots": []}],
        verdicts={"passed": 0, "failed": 1, "skipped": 0},
        notes=[evil],
    )
    md, page = markdown(doc), page_html(doc)
    assert "<script>alert" not in md and "<script>alert" not in page
    row = next(line for line in md.splitlines() if line.startswith("| FAILED"))
    assert "&lt;script&gt;alert(1)&lt;/script&gt; &amp; a\\|b \\`c\\` next" in row
    assert row.count(" | ") == 3  # four cells: the pipe in the text does not add one
    assert "Note: &lt;script&gt;" in md


def test_a_failing_claim_names_a_place_that_exists() -> None:
    """A claim that found its pair bitwise identical names the page's section (a class of identical pairs has
    no plot file); a pair that parted names its plot."""
    from flannel_repro.report.names import plots_for

    same = {"claim": "identical", "pair_class": "same config, separate trainings", "identical": True}
    parted = {"claim": "identical", "pair_class": "different threads", "identical": False}
    assert plots_for([same]) == ["index.html#divergence-same-config-separate-trainings.png"]
    assert plots_for([parted]) == ["divergence-different-threads.png"]
