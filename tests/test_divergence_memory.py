"""Scanning trajectories must not leave the files' pages in the process's RSS.

Each measurement runs in a fresh subprocess (peak RSS is per process and only ever grows): the
divergence functions, which read rows with positional reads into reused buffers, must stay far
below the size of what they scan, while a control that walks the same steps through the
memory-mapped view (``reader["W"][t]``) grows by about the whole file. Without the control the
first assertion could pass for the wrong reason (e.g. pages not counted on this kernel).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from flannel_repro.storage.layout import write_run

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc/self/status (Linux)")

REPO = Path(__file__).resolve().parents[1]
S, V, H, B = 120, 10_000, 64, 4  # W: 121 x 1.28 MB = 155 MB per run
MiB = 1 << 20


def _write(path: Path, seed: int) -> Path:
    """A run whose rows differ from the other run's from step 60 on (cheap to generate)."""
    base = (0.02 * torch.randn(V, H, generator=torch.Generator().manual_seed(0))).to(torch.bfloat16)

    def steps():
        for t in range(S + 1):
            row = base.clone()
            row[t % V] += 0.001 * (1 + t)  # every step changes
            if t >= 60:
                row[(7 * t) % V, : 1 + seed] += 0.01  # the runs part at step 60
            yield row

    return write_run(
        path,
        steps(),
        steps=S,
        live_mask=torch.ones(V, dtype=torch.bool),
        batch_size=B,
        config=dict(vocab_size=V, hidden_dim=H, steps=S),
        data={"n_live": V, "n_dead": 0},
        losses=torch.zeros(S + 1),
    )


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("rss")
    return _write(d / "a.safetensors", 0), _write(d / "b.safetensors", 1)


_PROBE = textwrap.dedent(
    """
    import json, sys
    import torch
    from flannel_repro.storage.reader import ArtifactReader
    from flannel_repro.analysis import bitwise as bw, divergence as dv, pair_kernel as pk

    def status(key):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        raise KeyError(key)

    mode, a, b = sys.argv[1:4]
    torch.set_num_threads(2)
    pk._PARALLEL_MIN_PAIR_ELEMS = 0  # two worker threads even for one pair
    ra, rb = ArtifactReader(a), ArtifactReader(b)
    if mode == "pread":  # warm up: load the code and start the threads before measuring
        dv.pair_divergence(ra, rb, steps=[0, 1])
        dv.all_pairs([ra, rb, a], steps=[0, 1])
    try:  # reset the peak to the current RSS (Linux >= 4.0), so the warm-up's peak does not count
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # then the growth below is an upper bound, which only makes the check stricter
    before = status("VmRSS")
    out = {}
    if mode == "pread":
        pd = dv.pair_divergence(ra, rb)
        ap = dv.all_pairs([ra, rb, a])
        entries, rows = bw.update_counts(rb)
        out = {"first": pd.first_step, "first_ap": int(ap.first_step[0]),
               "first_scan": bw.first_divergent_step(ra, rb),
               "first_sub": int(dv.all_pairs([ra, rb], steps=[0, 5]).first_step[0]),
               "changed_rows": int(rows.sum())}
    else:  # control: the same steps through the memory-mapped view
        Wa, Wb = ra["W"], rb["W"]
        out = {"first": next(t for t in range(Wa.shape[0]) if not torch.equal(Wa[t], Wb[t]))}
        for t in range(Wa.shape[0]):
            Wa[t].float().sum(), Wb[t].float().sum()
    out["growth"] = status("VmHWM") - before
    print(json.dumps(out))
    """
)


def _probe(mode: str, a: Path, b: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, mode, str(a), str(b)], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_scans_leave_no_pages_resident_but_the_map_does(two_runs: tuple[Path, Path]) -> None:
    a, b = two_runs
    w_bytes = 2 * (S + 1) * V * H * 2  # both runs' W: every step is read at least once below
    new = _probe("pread", a, b)
    assert new["first"] == new["first_ap"] == new["first_scan"] == new["first_sub"] == 60
    assert new["changed_rows"] > 0
    control = _probe("mmap", a, b)
    assert control["first"] == 60
    # The map keeps (nearly) every page it touched: this is what the reading path avoids.
    assert control["growth"] > 0.8 * w_bytes, f"control grew only {control['growth'] / MiB:.0f} MiB"
    # Positional reads into reused buffers: only fixed-size buffers (scan blocks, one step of each
    # run, the kernels' work buffers; about 20 MiB here), far below the 310 MB scanned.
    assert new["growth"] < 48 * MiB, f"scans grew peak RSS by {new['growth'] / MiB:.0f} MiB"
    assert new["growth"] < control["growth"] / 4
