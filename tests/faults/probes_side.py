"""Fault probes, second pass (issue 22): side. Registered into tests.faults.probes.PROBES on import."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from flannel_repro.analysis.bounds import load_bounds
from tests.faults.probes import (
    _GOOD,
    CFG,
    Outcome,
    _quiet,
    cli,
    cli_fault,
    copy_store,
    expect_error,
    good_store,
    probe,
    _reference,
)

# --- prune: only what the store wrote -------------------------------------------------------------------


def _prune_keeps(make: Callable[[Path], Path]) -> Callable[[Path], Outcome]:
    """A file the store did not write, put beside the store's runs by `make`: prune (dry run, then for real)
    must keep it byte for byte and list it as not ours."""

    def run(workdir: Path) -> Outcome:
        root, path = copy_store(workdir)
        victim = make(root)
        before = victim.read_bytes()
        dry_code, dry, dry_err = _quiet(lambda: cli.main(["prune", "--artifacts", str(root), "--dry-run"]))
        code, out, err = _quiet(lambda: cli.main(["prune", "--artifacts", str(root)]))
        if not victim.exists() or victim.read_bytes() != before:
            return Outcome("silent", f"prune deleted or changed {victim.name}: {out.strip()[-300:]}")
        if not path.exists():
            return Outcome("silent", f"prune deleted the store's current run {path.name}")
        if dry_code or code:
            return Outcome("unclear", f"prune exited {dry_code} / {code}: {(dry_err + err)[-300:]}")
        said = f"{victim.name}: not ours, kept"
        if said not in dry or said not in out:
            return Outcome("unclear", f"kept, but not listed as not ours: {out.strip()[-300:]}")
        return Outcome("fine", "kept byte for byte; " + next(line for line in out.splitlines() if said in line).strip())

    return run


def _user_model(root: Path) -> Path:
    from safetensors.torch import save_file

    save_file({"weight": torch.arange(16, dtype=torch.float32).reshape(4, 4)}, str(root / "model.safetensors"))
    return root / "model.safetensors"


def _recorded_run(root: Path) -> Path:
    from flannel_repro import TrajectoryRecorder

    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 4)
    opt = torch.optim.SGD(lin.parameters(), lr=0.1)
    path = root / "my-run.safetensors"
    with TrajectoryRecorder(path, {"w": lin.weight}, steps=3, optimizer=opt, batch_size=1) as rec:
        for s in range(3):
            opt.zero_grad()
            lin(torch.randn(1, 4)).sum().backward()
            opt.step()
            rec.step(loss=1.0, batch=[s])
    return path


def _store_like_name(root: Path) -> Path:
    path = root / "seed7-cpu-torch-r0-0123456789ab.safetensors"  # the store's name pattern, no run-key material
    path.write_bytes(b"my notes, not an artifact")
    return path


def _user_partial(root: Path) -> Path:
    path = root / "my-run.safetensors.partial-999999-0a1b2c3d"  # a hand recorder's partial file of a dead pid
    path.write_bytes(b"x" * 64)
    old = time.time() - 3600
    os.utime(path, (old, old))
    return path


probe("prune", "a user's model.safetensors in the artifacts folder")(_prune_keeps(_user_model))
probe("prune", "a run recorded with TrajectoryRecorder")(_prune_keeps(_recorded_run))
probe("prune", "an unreadable file under a name like the store's")(_prune_keeps(_store_like_name))
probe("prune", "a stale partial file of a hand recorder")(_prune_keeps(_user_partial))


@probe("prune", "a run of the store cut in half: deleted, retrained bitwise equal")
def _damaged_own_run(workdir: Path) -> Outcome:
    import warnings

    from flannel_repro.runs.store import RunStore

    _, _, ref = good_store()
    root, path = copy_store(workdir)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    code, out, err = _quiet(lambda: cli.main(["prune", "--artifacts", str(root)]))
    if code or path.exists():
        return Outcome("unclear", f"prune (exit {code}) kept the store's damaged run: {(out + err).strip()[-300:]}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = RunStore(root).obtain(CFG)
    same = _reference(got.trajectory) == ref
    got.trajectory.close()
    if not (got.trained and same):
        return Outcome("silent", "the store's run after prune is not the reference")
    line = next((x for x in out.splitlines() if path.name + ":" in x), "")
    return Outcome("fine", f"deleted ({line.strip()[:160]}); retrained bitwise equal")


# --- output over input ------------------------------------------------------------------------------------


def _contents(path: Path) -> object:
    if path.is_dir():
        return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()}
    return path.read_bytes() if path.exists() else None


def output_over_input(setup: "Setup") -> Callable[[Path], Outcome]:
    """`setup` gives the command line and the file (or folder) its -o would overwrite: exit 2 naming the -o
    path, the file unchanged byte for byte."""

    def run(workdir: Path) -> Outcome:
        argv, victim = setup(workdir)
        before = _contents(victim)
        try:
            code, _, err = _quiet(lambda: cli.main(argv))
        except SystemExit as exc:
            code, err = int(exc.code or 0), ""
        if _contents(victim) != before:
            return Outcome("silent", f"exit {code}: {victim} was overwritten")
        target = argv[argv.index("-o") + 1]
        if code != cli.EXIT_USAGE or target not in err or "Traceback" in err:
            return Outcome("unclear", f"exit {code}, expected 2 naming {target}: {err[-300:]}")
        return Outcome("clear", err.strip()[:300])

    return run


def _runs(workdir: Path) -> tuple[Path, Path, Path]:
    root, path = copy_store(workdir)
    return root, path, root / Path(str(_GOOD["other"])).name


def _exp_toml(workdir: Path) -> Path:
    p = workdir / "exp.toml"
    p.write_text(
        'dataset = "tiny"\nvocab_size = 512\nsteps = 4\nbatch_size = 8\nseq_len = 32\n[experiment]\nn_runs = 2\n'
    )
    return p


def _bounds_toml(workdir: Path) -> Path:
    p = workdir / "bounds.toml"
    p.write_text('[b]\nscale = "s"\nmax_frobenius = 9.6\norder_share_min = 0.15\norder_share_max = 0.89\n')
    return p


def _link_to(workdir: Path, target: Path) -> Path:
    link = workdir / "link.safetensors"
    link.symlink_to(target)
    return link


Setup = Callable[[Path], tuple[list[str], Path]]


def _with_runs(make: Callable[[Path, Path, Path, Path], tuple[list[str], Path]]) -> Setup:
    """A setup given (workdir, artifacts folder, run, the other run) of a fresh copy of the good store."""
    return lambda w: make(w, *_runs(w))


_OUTPUTS: list[tuple[str, Setup]] = [
    (
        "export-notebook RUN -o RUN",
        _with_runs(lambda w, root, run, other: (["export-notebook", str(run), "-o", str(run)], run)),
    ),
    ("digests RUN -o RUN", _with_runs(lambda w, root, run, other: (["digests", str(run), "-o", str(run)], run))),
    (
        "oplog RUN -o RUN",
        _with_runs(lambda w, root, run, other: (["oplog", str(run), "--step", "1", "-o", str(run)], run)),
    ),
    ("report RUN -o RUN", _with_runs(lambda w, root, run, other: (["report", str(run), "-o", str(run)], run))),
    (
        "export-notebook RUN -o a link to RUN",
        _with_runs(lambda w, root, run, other: (["export-notebook", str(run), "-o", str(_link_to(w, run))], run)),
    ),
    (
        "export-notebook RUN -o another run",
        _with_runs(lambda w, root, run, other: (["export-notebook", str(run), "-o", str(other)], other)),
    ),
    (
        "digests RUN -o another run --force",
        _with_runs(lambda w, root, run, other: (["digests", str(run), "-o", str(other), "--force"], other)),
    ),
    (
        "digests RUN -o a bounds.toml",
        _with_runs(lambda w, root, run, other: (["digests", str(run), "-o", str(_bounds_toml(w))], w / "bounds.toml")),
    ),
    (
        "noise --config FILE -o FILE",
        lambda w: (lambda c: (["noise", "--config", str(c), "-o", str(c)], c))(_exp_toml(w)),
    ),
    (
        "report DIR -o DIR (the artifacts folder)",
        _with_runs(lambda w, root, run, other: (["report", str(root), "-o", str(root)], root)),
    ),
]
for _name, _setup in _OUTPUTS:
    probe("output over input", _name)(output_over_input(_setup))


# --- side files: bounds.toml, snapshots --------------------------------------------------------------------

_BOUND = '[b]\nscale = "s"\nmax_frobenius = 9.6\norder_share_min = 0.15\norder_share_max = 0.89\n'


def bounds_fault(old: str, new: str, key: str) -> Callable[[Path], Outcome]:
    def run(workdir: Path) -> Outcome:
        p = workdir / "bounds.toml"
        p.write_text(_BOUND.replace(old, new))
        return expect_error(lambda: load_bounds(p), str(p), key)

    return run


for _name, _old, _new, _key in [
    ("bounds.toml: max_frobenius = inf", "max_frobenius = 9.6", "max_frobenius = inf", "max_frobenius"),
    ("bounds.toml: max_frobenius = nan", "max_frobenius = 9.6", "max_frobenius = nan", "max_frobenius"),
    ("bounds.toml: max_frobenius = 0", "max_frobenius = 9.6", "max_frobenius = 0.0", "max_frobenius"),
    (
        "bounds.toml: share band -inf..inf",
        "order_share_min = 0.15\norder_share_max = 0.89",
        "order_share_min = -inf\norder_share_max = inf",
        "order_share_min",
    ),
    ("bounds.toml: share band 0.15..inf", "order_share_max = 0.89", "order_share_max = inf", "order_share_max"),
    ("bounds.toml: share band reversed", "order_share_min = 0.15", "order_share_min = 0.95", "order_share_min"),
    (
        "bounds.toml: a fit's sd = inf",
        "order_share_max = 0.89",
        "order_share_max = 0.89\nn = 16\nfalse_alarm = 0.01\n"
        "frobenius_log_mean = 1.0\nfrobenius_log_sd = inf\nshare_log_mean = -1.0\nshare_log_sd = 0.3",
        "frobenius_log_sd",
    ),
]:
    probe("side files", _name)(bounds_fault(_old, _new, _key))

_SNAPSHOT_TEST = """
def test_summary(trajectory, flannel_snapshot):
    assert flannel_snapshot == trajectory(42).summary()
"""


@probe("side files", "a snapshot file with a byte that is not UTF-8")
def _snapshot_not_utf8(workdir: Path) -> Outcome:
    (workdir / "flannel.toml").write_text(
        'dataset = "tiny"\nvocab_size = 512\nsteps = 4\nbatch_size = 8\nseq_len = 32\n'
        "[experiment]\nn_runs = 2\nbase_train_seed = 42\n"
    )
    (workdir / "pytest.ini").write_text("[pytest]\nflannel_config = flannel.toml\nflannel_progress = 0\n")
    (workdir / "test_s.py").write_text(_SNAPSHOT_TEST)

    def session(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "-q",
                "-p",
                "no:cacheprovider",
                "-p",
                "no:xdist",
                "--flannel-threads=1",
                "--flannel-artifacts=art",
                *args,
            ],
            cwd=workdir,
            capture_output=True,
            text=True,
            timeout=300,
            env={k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")},
        )

    first = session("--snapshot-update")
    snaps = sorted(workdir.glob("__snapshots__/**/*.flannel"))
    if first.returncode != 0 or len(snaps) != 1:
        return Outcome(
            "crash", f"writing the snapshot: exit {first.returncode}: {(first.stdout + first.stderr)[-400:]}"
        )
    raw = bytearray(snaps[0].read_bytes())
    raw[40] = 0xFF
    snaps[0].write_bytes(bytes(raw))
    done = session()
    text = done.stdout + done.stderr
    if done.returncode == 0:
        return Outcome("silent", "the session passed with a damaged snapshot")
    if "Traceback" in text or "UnicodeDecodeError" in text:
        return Outcome("unclear", text[-600:])
    line = next((x for x in text.splitlines() if str(snaps[0]) in x and "offset 40" in x), None)
    if done.returncode != 1 or line is None:
        return Outcome("unclear", f"exit {done.returncode}; no line names the file and offset 40: {text[-400:]}")
    return Outcome("clear", line.strip()[:300])


# --- command line: named errors -------------------------------------------------------------------------------


def usage_fault(args: Callable[[Path], list[str]], *needles: str) -> Callable[[Path], Outcome]:
    """Exit 2 (a usage error) with a stderr line that names every needle, no traceback."""

    def run(workdir: Path) -> Outcome:
        try:
            code, _, err = _quiet(lambda: cli.main(args(workdir)))
        except SystemExit as exc:
            code, err = int(exc.code or 0), ""
        if code != cli.EXIT_USAGE:
            return Outcome("unclear" if code else "silent", f"exit {code}, expected 2: {err[-300:]}")
        missing = [n for n in needles if n not in err]
        if missing or "Traceback" in err:
            return Outcome("unclear", f"stderr does not name {missing}: {err[-300:]}")
        return Outcome("clear", err.strip()[:300])

    return run


probe("command line", "noise --seeds 5-3 (a reversed range)")(
    usage_fault(lambda w: ["noise", "--seeds", "5-3"], "--seeds", "'5-3'")
)
probe("command line", "why A B --step 99 (past the runs' 4 steps)")(
    cli_fault(
        lambda w: (lambda _, run, other: ["why", str(run), str(other), "--step", "99"])(*_runs(w)),
        3,
        "step 99: expected a step in 1..4",
    )
)


# --- report.md: what it quotes is escaped --------------------------------------------------------------------


@probe("report", "report.md: a test id and message holding <script>")
def _report_markdown_escapes(workdir: Path) -> Outcome:
    from flannel_repro.report import SessionInfo, write_report

    _, path = copy_store(workdir)
    evil = "<script>alert(1)</script> a|b"
    claim = {"nodeid": f"test_x.py::test[{evil}]", "outcome": "failed", "duration_s": 0.1, "message": evil, "plots": []}
    result = write_report([path], workdir / "rep", session=SessionInfo(claims=[claim]))
    md = (result.folder / "report.md").read_text(encoding="utf-8")
    page = (result.folder / "index.html").read_text(encoding="utf-8")
    if "<script>alert" in md or "<script>alert" in page:
        return Outcome("silent", "report.md or index.html quotes <script> as markup")
    row = next((x for x in md.splitlines() if x.startswith("| FAILED")), "")
    if "&lt;script&gt;" not in row or "a\\|b" not in row:
        return Outcome("unclear", f"the claim row does not quote the test id as text: {row[:300]}")
    return Outcome("fine", f"escaped: {row[:200]}")
