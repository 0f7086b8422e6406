"""The report: plots, one page (HTML and Markdown) holding them with the tables, a JSON document and CSV
files, written from run artifacts by `flannel-repro report` or at the end of a pytest session
(`--flannel-report=DIR`).

Files written into the report folder, each atomically (temporary file, then a rename):

| file | what |
| --- | --- |
| `index.html`, `report.md` | the page: every plot, what it shows, the tables |
| `report.json` | the same as data (shape: `SCHEMA`, format `flannel-repro/report/1`) |
| `divergence.csv` | per pair and step: class, runs, ‖ΔW‖_F, its live part, max abs ΔW, rows that differ |
| `steps.csv` | per run and step: loss and the update statistics |
| `*.png` | the plots (`figures.py`) |

Plots a previous report left and this one does not draw are removed (only files that report listed). A pair
class whose pairs are all bitwise identical gets no plot: the page says so in a line of text where its plot
would be (under a heading whose anchor is the plot's name, which a failing claim names).

Verdicts in the page's tables (exact, within band, parted; passed, failed, skipped; not compared) are
`Verdict` cells: a word first, so that they read without colour (Markdown, a screen reader), and in the HTML
page a CSS class per verdict (`verdict v-exact`, ...) with a colour, from the page's own inline style.
"""

from __future__ import annotations

import csv
import datetime
import html
import io
import json
import math
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from flannel_repro.analysis.sources import SourceTable
from flannel_repro.errors import ArtifactError
from flannel_repro.report.compute import Collected, collect
from flannel_repro.report.names import SOURCES_PLOT, STALL_PLOT, pair_class_plot, plot_for_claim
from flannel_repro.report.figures import Figure, all_figures, require_matplotlib
from flannel_repro.report.schema import FORMAT, SCHEMA
from flannel_repro import safeio
from flannel_repro.storage.jsonfile import read_json, write_bytes_atomic, write_text_atomic
from flannel_repro.version import __version__

__all__ = [
    "FORMAT",
    "SCHEMA",
    "SOURCES_PLOT",
    "STALL_PLOT",
    "VERDICT_COLOURS",
    "ReportResult",
    "SessionInfo",
    "Verdict",
    "plot_for_claim",
    "step_summary",
    "write_report",
]

# verdict kind -> (background, text colour) of its table cell on the page
VERDICT_COLOURS = {
    "exact": ("#dcf1dc", "#145a1e"),
    "passed": ("#dcf1dc", "#145a1e"),
    "band": ("#fff1c2", "#6b4d00"),
    "parted": ("#fde3cc", "#8a3a00"),
    "failed": ("#f9d3d3", "#9b0000"),
    "skipped": ("#e9e9e9", "#4a4a4a"),
    "none": ("#e9e9e9", "#4a4a4a"),
}


@dataclass(frozen=True)
class Verdict:
    """A table cell that is a verdict: `kind` (a key of VERDICT_COLOURS) picks its CSS class on the page,
    `text` leads with the word (EXACT, WITHIN BAND, PARTED, PASSED, FAILED, SKIPPED, NOT COMPARED)."""

    kind: str
    text: str

    def __str__(self) -> str:
        return self.text


@dataclass
class SessionInfo:
    """What a pytest session adds to the report: its claims and verdicts, facts about it, and how its
    flannel_snapshot assertions were compared."""

    claims: list[dict[str, Any]] = field(default_factory=list)  # nodeid, outcome, duration_s, message, plots
    facts: dict[str, Any] = field(default_factory=dict)
    # compared_exactly, within_band, not_compared, not_compared_by_reason, assertions, policy, items (schema.SCHEMA)
    snapshots: dict[str, Any] | None = None


@dataclass
class ReportResult:
    folder: Path
    files: list[str]
    document: dict[str, Any]
    seconds: float

    @property
    def page(self) -> Path:
        return self.folder / "index.html"


def write_report(
    runs: Sequence[str | os.PathLike[str]],
    folder: str | os.PathLike[str],
    *,
    session: SessionInfo | None = None,
    sources: SourceTable | None = None,
    verify: bool = True,
) -> ReportResult:
    """Compute and write the report for `runs` (artifacts, or folders of them) into `folder`."""
    t0 = time.perf_counter()
    require_matplotlib()  # before any work: a missing extra is said at once
    out = Path(folder)
    if out.exists() and not out.is_dir():
        raise ArtifactError(f"report: expected a folder to write into, got {str(out)!r} (a file).")
    data = collect(runs, verify=verify, sources=sources)  # everything is computed before anything is written
    figures = all_figures(data)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ArtifactError(f"report: could not create the folder {str(out)!r} ({exc.strerror or exc}).") from None
    doc = document(data, figures, session)
    files: dict[str, bytes] = {f.file: f.png for f in figures}
    files["divergence.csv"] = _divergence_csv(data).encode()
    files["steps.csv"] = _steps_csv(data).encode()
    files["report.md"] = markdown(doc).encode()
    files["index.html"] = page_html(doc).encode()
    for name in [*files, "report.json"]:  # a link or special file at any of them: refused before anything is written
        safeio.own_file(out / name, f"the report's {name}")
    previous = (
        read_json(out / "report.json", "a report JSON file", missing=None) if (out / "report.json").exists() else None
    )
    for name, payload in files.items():
        write_bytes_atomic(out / name, payload, f"the report's {name}")
    doc["seconds"] = round(time.perf_counter() - t0, 3)
    write_text_atomic(out / "report.json", json.dumps(doc, indent=1, allow_nan=False), "the report JSON")
    if isinstance(previous, dict):  # plots of a previous report that this one did not draw
        for old in previous.get("files", []):
            if isinstance(old, str) and old.endswith(".png") and old not in files and "/" not in old:
                (out / old).unlink(missing_ok=True)
    for r in data.runs:
        r.traj.close()
    return ReportResult(out, sorted([*files, "report.json"]), doc, time.perf_counter() - t0)


def step_summary(result: ReportResult) -> str:
    """The Markdown for a CI step summary ($GITHUB_STEP_SUMMARY): the tables, and where the plots are (a
    step summary cannot show files from the runner's disk: upload the folder as an artifact)."""
    doc = result.document
    text = markdown(doc, images=False)
    return (
        text + f"\nPlots ({len(doc['figures'])}): {', '.join(f['file'] for f in doc['figures'])}, in "
        f"`{result.folder}` on the runner (upload it as an artifact to see them).\n\n"
    )


# --- the document ----------------------------------------------------------------------------------


def _f(x: Any) -> float | None:
    v = float(x)
    return v if math.isfinite(v) else None


def document(data: Collected, figures: Sequence[Figure], session: SessionInfo | None) -> dict[str, Any]:
    import torch

    classes = []
    drawn = {f.file for f in figures}
    for cls, pairs in data.classes().items():
        firsts = [p.first_step for p in pairs if p.first_step is not None]
        classes.append(
            {
                "class": cls,
                "plot": pair_class_plot(cls) if pair_class_plot(cls) in drawn else None,  # None: all bitwise identical
                "steps": max(int(p.steps[-1]) for p in pairs),
                "n_pairs": len(pairs),
                "identical": sum(1 for p in pairs if p.first_step is None),
                "first_step_min": min(firsts) if firsts else None,
                "first_step_max": max(firsts) if firsts else None,
                "final_frobenius_min": _f(min(p.frobenius[-1] for p in pairs)),
                "final_frobenius_max": _f(max(p.frobenius[-1] for p in pairs)),
                "pairs": [
                    {
                        "a": data.runs[p.a].name,
                        "b": data.runs[p.b].name,
                        "first_step": p.first_step,
                        "final_frobenius": _f(p.frobenius[-1]),
                        "final_max_abs": _f(p.max_abs[-1]),
                        "final_live_share": _f(p.live_share()[-1]),
                    }
                    for p in pairs
                ],
            }
        )
    runs: list[dict[str, Any]] = []
    for r, prof in zip(data.runs, data.stall):
        t = r.traj
        runs.append(
            {
                "name": r.name,
                "label": t.label,
                "path": str(t.path),
                "run_key": t.run_key,
                "repeat": t.repeat,
                "config": t.config.to_dict(),
                "steps": t.steps,
                "final_loss": _f(t.final_loss),
                "numerics_class": (t.env.get("numerics") or {}).get("class"),
                "wall_time_s": _f(t.wall_time_s),
                "stalled_at": prof.stalled_at() if prof.steps.size > 10 else None,
                "update_stats_recorded": prof.recorded,
            }
        )
    matrix = data.matrix()
    env = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "torch": torch.__version__,
        "flannel_repro": __version__,
        "numerics_classes": sorted({r["numerics_class"] for r in runs if r["numerics_class"]}),
    }
    claims = list(session.claims) if session else []
    return {
        "format": FORMAT,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "environment": env,
        "session": dict(session.facts) if session else None,
        "runs": runs,
        "pair_classes": classes,
        "matrix": None
        if matrix is None
        else {
            "runs": [data.runs[i].name for i in data.matrix_runs],
            "final_frobenius": [[_f(v) for v in row] for row in matrix],
        },
        "sources": data.sources.to_json() if data.sources is not None else None,
        "stall": [{"run": r.name, **_stall_summary(p)} for r, p in zip(data.runs, data.stall)],
        "claims": claims,
        "verdicts": {k: sum(1 for c in claims if c.get("outcome") == k) for k in ("passed", "failed", "skipped")},
        "snapshots": dict(session.snapshots) if session and session.snapshots is not None else None,
        "figures": [{"file": f.file, "title": f.title, "shows": f.shows} for f in figures],
        "notes": list(data.notes),
        "files": sorted(
            [*(f.file for f in figures), "divergence.csv", "steps.csv", "report.md", "index.html", "report.json"]
        ),
        "seconds": None,
    }


def _stall_summary(p: Any) -> dict[str, Any]:
    last = int(p.steps[-1])
    probe = sorted({s for s in (1, 10, 100, 200, 500, 1000, last) if s <= last})
    return {
        "dtype": p.dtype,
        "recorded": p.recorded,
        "stalled_at": p.stalled_at() if last > 10 else None,
        "at": [{"step": s, **{k: v for k, v in p.at(s).items() if k != "step"}} for s in probe],
    }


# --- CSV -------------------------------------------------------------------------------------------


def _csv(rows: list[list[Any]]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


def _cell(x: Any) -> Any:
    if isinstance(x, (float, np.floating)):
        return "" if not math.isfinite(float(x)) else repr(float(x))
    return x


def _divergence_csv(data: Collected) -> str:
    rows: list[list[Any]] = [["pair_class", "a", "b", "step", "frobenius", "frobenius_live", "max_abs", "rows_differ"]]
    for p in data.pairs:
        a, b = data.runs[p.a].name, data.runs[p.b].name
        for k, s in enumerate(p.steps.tolist()):
            rows.append(
                [
                    p.pair_class,
                    a,
                    b,
                    s,
                    _cell(p.frobenius[k]),
                    _cell(p.frobenius_live[k]),
                    _cell(p.max_abs[k]),
                    int(p.rows_differ[k]),
                ]
            )
    return _csv(rows)


def _steps_csv(data: Collected) -> str:
    rows: list[list[Any]] = [["run", "step", "loss", "changed", "lost", "second_moment_moved"]]
    for r, prof in zip(data.runs, data.stall):
        loss = r.traj.losses.double().numpy()
        for s in range(prof.steps.size):
            rows.append(
                [
                    r.name,
                    s,
                    _cell(loss[s]),
                    _cell(prof.changed[s]),
                    _cell(prof.lost[s]),
                    _cell(prof.second_moment_moved[s]),
                ]
            )
    return _csv(rows)


# --- the page --------------------------------------------------------------------------------------


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _outcome(outcome: str) -> Verdict:
    return Verdict(outcome if outcome in VERDICT_COLOURS else "none", outcome.upper())


def _class_verdict(c: dict[str, Any]) -> Verdict:
    if c["identical"] == c["n_pairs"]:
        return Verdict("exact", "EXACT")
    return Verdict("parted", "PARTED" if not c["identical"] else f"PARTED ({c['identical']} of {c['n_pairs']} exact)")


_COMPARISON = {"exact": Verdict("exact", "EXACT"), "band": Verdict("band", "WITHIN BAND")}


def _tables(doc: dict[str, Any]) -> list[tuple[str, list[str], list[list[Any]]]]:
    """(title, header, rows) of every table the page shows; a verdict is a `Verdict` cell."""
    out = []
    if doc["claims"]:
        out.append(
            (
                "Claims",
                ["outcome", "test", "plot", "message"],
                [
                    [
                        _outcome(c["outcome"]),
                        c["nodeid"],
                        ", ".join(c.get("plots") or []) or "-",
                        (c.get("message") or "")[:200],
                    ]
                    for c in doc["claims"]
                ],
            )
        )
    items = (doc.get("snapshots") or {}).get("items") or []
    if items:
        out.append(
            (
                "Snapshots",
                ["comparison", "outcome", "test", "snapshot", "why not compared"],
                [
                    [
                        _COMPARISON.get(i["comparison"], Verdict("none", "NOT COMPARED")),
                        _outcome(i["outcome"]),
                        i["nodeid"],
                        i["snapshot"],
                        i["reason"],
                    ]
                    for i in items
                ],
            )
        )
    out.append(
        (
            "Runs",
            ["run", "steps", "final loss", "numerics class", "stalled at (<1% changed)"],
            [[r["name"], r["steps"], r["final_loss"], r["numerics_class"], r["stalled_at"]] for r in doc["runs"]],
        )
    )
    out.append(
        (
            "Divergence by pair class",
            ["class", "verdict", "pairs", "bitwise identical", "first divergent step", "final ‖ΔW‖_F", "plot"],
            [
                [
                    c["class"],
                    _class_verdict(c),
                    c["n_pairs"],
                    c["identical"],
                    "-" if c["first_step_min"] is None else f"{c['first_step_min']}..{c['first_step_max']}",
                    f"{_fmt(c['final_frobenius_min'])}..{_fmt(c['final_frobenius_max'])}",
                    c["plot"] or "none: bitwise identical",
                ]
                for c in doc["pair_classes"]
            ],
        )
    )
    if doc["sources"]:
        steps = doc["sources"]["rows"][0]["steps"] if doc["sources"]["rows"] else []
        out.append(
            (
                f"Divergence by source (base {doc['sources']['base']})",
                ["source", "parts at", *[f"‖ΔW‖_F @{s}" for s in steps]],
                [
                    [
                        r["description"],
                        Verdict("exact", "EXACT: never parts")
                        if r["first_step"] is None
                        else Verdict("parted", f"PARTED at {r['first_step']}"),
                        *r["frobenius"],
                    ]
                    for r in doc["sources"]["rows"]
                ],
            )
        )
    stall_rows = []
    for s in doc["stall"]:
        stall_rows.append(
            [
                s["run"],
                s["dtype"],
                s["stalled_at"],
                ", ".join(f"{a['step']}: {100 * a['changed']:.3g}%" for a in s["at"] if a["changed"] is not None),
            ]
        )
    out.append(
        (
            "Update fraction (share of W's entries changed)",
            ["run", "dtype", "stalled at", "changed at step"],
            stall_rows,
        )
    )
    return out


def _identical_sentence(c: dict[str, Any]) -> str:
    """What the page says where the plot of a pair class whose pairs are all bitwise identical would be."""
    who = (
        f"{c['pairs'][0]['a']} and {c['pairs'][0]['b']} are"
        if c["n_pairs"] == 1 and c["pairs"]
        else f"all {c['n_pairs']} pairs are"
    )
    return (
        f"{c['class']}: {who} bitwise identical over all {c['steps']} steps (every recorded W equal), "
        "so there is no divergence to plot."
    )


def _plot_entries(doc: dict[str, Any]) -> list[tuple[str, str, bool, str]]:
    """(anchor, title, has an image, text) of the page's Plots section in order: per pair class its plot, or
    where all its pairs are bitwise identical a line saying so in its place; then the other plots."""
    figures = {f["file"]: f for f in doc["figures"]}
    out: list[tuple[str, str, bool, str]] = []
    used: set[str] = set()
    for c in doc["pair_classes"]:
        f = figures.get(c["plot"] or "")
        if f is not None:
            used.add(f["file"])
            out.append((f["file"], f["title"], True, f["shows"]))
        else:
            out.append((pair_class_plot(c["class"]), f"Divergence: {c['class']}", False, _identical_sentence(c)))
    out += [(f["file"], f["title"], True, f["shows"]) for f in doc["figures"] if f["file"] not in used]
    return out


def _snapshot_sentence(s: dict[str, Any]) -> str:
    return (
        f"Snapshots: {s['compared_exactly']} compared exactly, {s['within_band']} within the noise band, "
        f"{s['not_compared']} not compared."
    )


def _md(value: Any, *, cell: bool = False) -> str:
    """Text quoted into report.md, escaped as the HTML page escapes it: &, < and > as entities (a test id or a
    message cannot add markup); in a table cell also | and ` escaped and line breaks as spaces."""
    text = html.escape(str(value), quote=False)
    if cell:
        text = text.replace("|", "\\|").replace("`", "\\`").replace("\r\n", " ").replace("\n", " ").replace("\r", " ")
    return text


def markdown(doc: dict[str, Any], *, images: bool = True) -> str:
    env = doc["environment"]
    lines = [
        "# flannel-repro report",
        "",
        f"{len(doc['runs'])} run(s); {_md(env['platform'])}; torch {_md(env['torch'])}; "
        f"numerics {_md(', '.join(env['numerics_classes']) or '-')}; created {_md(doc['created'])}.",
        "",
    ]
    if doc["claims"]:
        v = doc["verdicts"]
        lines += [f"Claims: {v['passed']} passed, {v['failed']} failed, {v['skipped']} skipped.", ""]
    if doc.get("snapshots"):
        lines += [_md(_snapshot_sentence(doc["snapshots"])), ""]
    for title, head, rows in _tables(doc):
        lines += [
            f"## {_md(title)}",
            "",
            "| " + " | ".join(_md(h, cell=True) for h in head) + " |",
            "|" + "---|" * len(head),
        ]
        lines += ["| " + " | ".join(_md(_fmt(c), cell=True) for c in row) + " |" for row in rows]
        lines.append("")
    lines += ["## Plots", ""]
    for file, title, has_image, text in _plot_entries(doc):
        title = _md(title)
        lines += [f"### {title}", ""]
        if has_image:
            lines += [f"![{title}]({file})", ""] if images else [f"`{file}`", ""]
        lines += [_md(text), ""]
    for n in doc["notes"]:
        lines.append(f"Note: {_md(n)}")
    return "\n".join(lines) + "\n"


def _td(cell: Any) -> str:
    if isinstance(cell, Verdict):
        kind = cell.kind if cell.kind in VERDICT_COLOURS else "none"
        return f'<td class="verdict v-{kind}">{html.escape(cell.text)}</td>'
    return f"<td>{html.escape(_fmt(cell))}</td>"


def page_html(doc: dict[str, Any]) -> str:
    e = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        "<title>flannel-repro report</title>",
        "<style>body{font-family:sans-serif;max-width:1250px;margin:1em auto;padding:0 1em}"
        "table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px}"
        "th{background:#f3f3f3}img{max-width:100%;border:1px solid #ddd}"
        ".verdict{font-weight:bold;white-space:nowrap}"
        + "".join(f".v-{k}{{background:{bg};color:{fg}}}" for k, (bg, fg) in VERDICT_COLOURS.items())
        + ".identical{border-left:4px solid #3a8a3a;background:#eef7ee;padding:.5em .8em}</style>",
        "</head><body>",
        "<h1>flannel-repro report</h1>",
        f"<p>{len(doc['runs'])} run(s); {e(doc['environment']['platform'])}; torch {e(doc['environment']['torch'])}; "
        f"numerics {e(', '.join(doc['environment']['numerics_classes']) or '-')}; created {e(doc['created'])}.</p>",
    ]
    if doc["claims"]:
        v = doc["verdicts"]
        parts.append(f"<p>Claims: {v['passed']} passed, {v['failed']} failed, {v['skipped']} skipped.</p>")
    if doc.get("snapshots"):
        parts.append(f"<p>{e(_snapshot_sentence(doc['snapshots']))}</p>")
    for title, head, rows in _tables(doc):
        parts.append(f"<h2>{e(title)}</h2><table><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>")
        for row in rows:
            parts.append("<tr>" + "".join(_td(c) for c in row) + "</tr>")
        parts.append("</table>")
    parts.append("<h2>Plots</h2>")
    for file, title, has_image, text in _plot_entries(doc):
        if has_image:
            parts.append(f'<h3 id="{e(file)}">{e(title)}</h3><img src="{e(file)}" alt="{e(title)}"><p>{e(text)}</p>')
        else:
            parts.append(f'<h3 id="{e(file)}">{e(title)}</h3><p class="identical">{e(text)}</p>')
    for n in doc["notes"]:
        parts.append(f"<p>Note: {e(n)}</p>")
    # a check a headless browser can read back (tests/test_report.py): how many images loaded
    # and how many verdict cells the style coloured
    parts.append(
        "<script>window.addEventListener('load', function () { var n = 0, imgs = document.images;"
        " for (var i = 0; i < imgs.length; i++) { if (imgs[i].complete && imgs[i].naturalWidth > 0) n++; }"
        " document.body.setAttribute('data-images-loaded', n + '/' + imgs.length);"
        " var v = document.querySelectorAll('td.verdict'), k = 0;"
        " for (var j = 0; j < v.length; j++) { var bg = getComputedStyle(v[j]).backgroundColor;"
        " if (bg && bg !== 'transparent' && bg !== 'rgba(0, 0, 0, 0)') k++; }"
        " document.body.setAttribute('data-verdicts-coloured', k + '/' + v.length); });</script>"
    )
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
