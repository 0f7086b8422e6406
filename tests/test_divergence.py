"""Tests of flannel_repro.analysis.divergence (and its kernel and bitwise scans) on small synthetic run artifacts."""

from __future__ import annotations

import itertools
import math
import threading
from collections import Counter
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from flannel_repro.storage import layout
from flannel_repro.storage.layout import KEY_W
from flannel_repro.storage.reader import ArtifactReader
from flannel_repro.analysis.bitwise import NEVER, first_divergent_step, update_counts, update_fraction
from flannel_repro.analysis.divergence import all_pairs, pair_divergence
from flannel_repro.errors import ArtifactError

V, H, S, B = 50, 8, 6, 4
LIVE = torch.arange(V) % 5 != 0  # tokens 0, 5, 10, ... are dead


def write_run(
    path: Path, W: torch.Tensor, *, digests_of: torch.Tensor | None = None, live_mask: torch.Tensor = LIVE
) -> Path:
    """A per-run artifact in the harness layout; `digests_of` lets a test record wrong digests."""
    steps, vocab, hidden = W.shape[0] - 1, W.shape[1], W.shape[2]
    config = dict(
        vocab_size=vocab,
        hidden_dim=hidden,
        steps=steps,
        init_seed=42,
        init_scale=0.02,
        lr=1e-3,
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        model_seed=1,
        data_seed=1,
        record_W=True,
    )
    return layout.write_run(
        path, W, steps=steps, live_mask=live_mask, config=config, batch_size=B, digests_of=digests_of
    )


def trajectory(seed: int, dtype: torch.dtype = torch.bfloat16, w0_seed: int = 0) -> torch.Tensor:
    w0 = 0.02 * torch.randn(V, H, generator=torch.Generator().manual_seed(w0_seed))
    g = torch.Generator().manual_seed(seed)
    rows = [w0.to(dtype)]
    for _ in range(S):
        rows.append((rows[-1].float() + 1e-3 * torch.randn(V, H, generator=g)).to(dtype))
    return torch.stack(rows)


def bump(W: torch.Tensor, t: int, v: int, h: int, *, persist: bool = False) -> torch.Tensor:
    """A copy of W with entry (v, h) one ulp up (bit pattern + 1) at step t (and after, if persist)."""
    out = W.clone()
    bits = out.view(torch.int16 if W.dtype == torch.bfloat16 else torch.int32)
    stop = W.shape[0] if persist else t + 1
    bits[t:stop, v, h] += 1
    return out


def reference(Wa: torch.Tensor, Wb: torch.Tensor, live: torch.Tensor = LIVE) -> dict[str, np.ndarray]:
    """Straightforward float64 numpy reference for every step."""
    a = Wa.double().numpy()
    b = Wb.double().numpy()
    d = a - b
    differ = (Wa.view(torch.int16).numpy() != Wb.view(torch.int16).numpy()).any(axis=2)
    lv = live.numpy()
    return {
        "max_abs": np.abs(d).max(axis=(1, 2)),
        "frobenius": np.sqrt((d**2).sum(axis=(1, 2))),
        "rows_differ": differ.sum(axis=1),
        "rows_differ_live": (differ & lv).sum(axis=1),
        "rows_differ_dead": (differ & ~lv).sum(axis=1),
    }


FIELDS = ("max_abs", "frobenius", "frobenius_live", "rows_differ", "rows_differ_live", "rows_differ_dead")


def test_identical_runs(tmp_path: Path) -> None:
    W = trajectory(1)
    a = write_run(tmp_path / "a.safetensors", W)
    b = write_run(tmp_path / "b.safetensors", W.clone())
    assert first_divergent_step(a, b) is None
    assert first_divergent_step(a, b, trust_digests=True) is None
    pd = pair_divergence(a, b)
    assert pd.first_step is None
    assert pd.steps.tolist() == list(range(S + 1))
    for f in FIELDS:
        assert not getattr(pd, f).any(), f
    ap = all_pairs([a, b, a])
    assert (ap.first_step == NEVER).all()
    assert not ap.frobenius.any() and not ap.rows_differ.any()


@pytest.mark.parametrize("v,live", [(3, True), (10, False)])
def test_one_ulp_change(tmp_path: Path, v: int, live: bool) -> None:
    assert bool(LIVE[v]) is live
    t, h = 4, 5
    W = trajectory(1)
    W2 = bump(W, t, v, h)
    a = write_run(tmp_path / "a.safetensors", W)
    b = write_run(tmp_path / "b.safetensors", W2)
    assert first_divergent_step(a, b) == t
    assert first_divergent_step(b, a, trust_digests=True) == t
    ulp = abs(W2[t, v, h].float().item() - W[t, v, h].float().item())
    assert ulp > 0
    # the ulp of a bf16 value x in [2^e, 2^(e+1)) is 2^(e-7)
    assert ulp == 2.0 ** (math.floor(math.log2(abs(W[t, v, h].float().item()))) - 7)
    pd = pair_divergence(a, b)
    assert pd.first_step == t
    expected_rows = np.zeros(S + 1, dtype=np.int64)
    expected_rows[t] = 1
    assert pd.rows_differ.tolist() == expected_rows.tolist()
    assert pd.rows_differ_live.tolist() == (expected_rows if live else 0 * expected_rows).tolist()
    assert pd.rows_differ_dead.tolist() == (0 * expected_rows if live else expected_rows).tolist()
    assert pd.max_abs[t] == ulp and pd.frobenius[t] == ulp  # exact, not approximately
    assert pd.max_abs[[s for s in range(S + 1) if s != t]].sum() == 0
    row = pd.at(t)
    assert row == {
        "step": t,
        "max_abs": ulp,
        "frobenius": ulp,
        "frobenius_live": ulp if live else 0.0,
        "rows_differ": 1,
        "rows_differ_live": int(live),
        "rows_differ_dead": int(not live),
    }
    assert pd.live_share()[t] == (1.0 if live else 0.0) and np.isnan(pd.live_share()[t - 1])
    # an explicit mask overrides the file's
    flipped = pair_divergence(a, b, live_mask=~LIVE)
    assert flipped.rows_differ_live[t] == int(not live)


def test_one_ulp_persistent_and_wrong_shapes(tmp_path: Path) -> None:
    W = trajectory(2)
    a = write_run(tmp_path / "a.safetensors", W)
    b = write_run(tmp_path / "b.safetensors", bump(W, 2, 7, 0, persist=True))
    assert first_divergent_step(a, b) == 2
    pd = pair_divergence(a, b)
    assert pd.rows_differ.tolist() == [0, 0] + [1] * (S - 1)
    other = write_run(tmp_path / "c.safetensors", trajectory(2)[:, :, : H - 1].contiguous())
    with pytest.raises(ArtifactError, match=r"c\.safetensors.*tensor 'W' must match"):
        first_divergent_step(a, other)
    with pytest.raises(ArtifactError, match="must match"):
        pair_divergence(a, other)
    with pytest.raises(ArtifactError, match="must match"):
        all_pairs([a, b, other])


def test_digests_are_checked_against_bytes(tmp_path: Path) -> None:
    W = trajectory(3)
    a = write_run(tmp_path / "a.safetensors", W)
    # bytes differ at step 1, but the recorded digests claim the runs agree until the bump at 5
    b = write_run(tmp_path / "b.safetensors", bump(W, 1, 0, 0), digests_of=bump(W, 5, 0, 0))
    with pytest.warns(RuntimeWarning, match="trusting the bytes"):
        assert first_divergent_step(a, b) == 1
    # trusting digests: step 5's bytes are equal, so the scan continues past it and finds nothing
    with pytest.warns(RuntimeWarning):
        assert first_divergent_step(a, b, trust_digests=True) is None


def test_frobenius_against_numpy(tmp_path: Path) -> None:
    Wa, Wb = trajectory(10), trajectory(11)
    assert torch.equal(Wa[0], Wb[0])
    a = write_run(tmp_path / "a.safetensors", Wa)
    b = write_run(tmp_path / "b.safetensors", Wb)
    ref = reference(Wa, Wb)
    pd = pair_divergence(a, b)
    assert pd.first_step == 1
    np.testing.assert_array_equal(pd.max_abs, ref["max_abs"])
    np.testing.assert_allclose(pd.frobenius, ref["frobenius"], rtol=1e-14, atol=0)
    for t in range(S + 1):  # the kernel's order of additions: per token row, then over the rows (bitwise)
        d = (Wa[t].float() - Wb[t].float()).double()
        assert pd.frobenius[t] == math.sqrt(float(d.square().sum(dim=1).sum()))
        assert pd.frobenius_live[t] == math.sqrt(float(d.square().sum(dim=1)[LIVE].sum()))
    for f in ("rows_differ", "rows_differ_live", "rows_differ_dead"):
        np.testing.assert_array_equal(getattr(pd, f), ref[f])
    sub = pair_divergence(a, b, steps=[6, 0, 3])
    assert sub.steps.tolist() == [6, 0, 3] and sub.first_step == 1
    for f in FIELDS:
        np.testing.assert_array_equal(getattr(sub, f), getattr(pd, f)[[6, 0, 3]])
    table = pd.table([0, 3])
    lines = table.splitlines()
    assert len(lines) == 4 and "max|ΔW|" in lines[0] and "‖ΔW‖_F" in lines[0]
    assert lines[3].split("|")[0].strip() == "3"
    with pytest.raises(ArtifactError, match="expected steps"):
        pair_divergence(a, b, steps=[S + 1])


def test_float32_runs(tmp_path: Path) -> None:
    Wa, Wb = trajectory(20, torch.float32), trajectory(21, torch.float32)
    a = write_run(tmp_path / "a.safetensors", Wa)
    b = write_run(tmp_path / "b.safetensors", bump(Wa, 3, 1, 1))
    pd = pair_divergence(a, b)
    assert pd.first_step == 3 and pd.rows_differ.tolist() == [0, 0, 0, 1, 0, 0, 0]
    assert pd.max_abs[3] == abs(float(bump(Wa, 3, 1, 1)[3, 1, 1].double() - Wa[3, 1, 1].double()))
    c = write_run(tmp_path / "c.safetensors", Wb)
    d = (Wa.double() - Wb.double()).numpy()
    np.testing.assert_allclose(pair_divergence(a, c).frobenius, np.sqrt((d**2).sum(axis=(1, 2))), rtol=1e-14)


class CountingReader(ArtifactReader):
    """Counts row reads per (key, step), in rows' worth: reading W[t, v0:v1] counts (v1-v0)/V, so
    a step read in parts by several worker threads still counts 1 if its parts tile the row."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.reads: Counter[tuple[str, int]] = Counter()
        self._count_lock = threading.Lock()

    def row(
        self, name: str, index: int, out: torch.Tensor | None = None, *, start: int = 0, stop: int | None = None
    ) -> torch.Tensor:
        first_axis = self.spec(name).shape[1]
        part = Fraction((first_axis if stop is None else stop) - start, first_axis)
        with self._count_lock:
            self.reads[(name, int(index))] += part
        return super().row(name, index, out, start=start, stop=stop)


def test_all_pairs_matches_pairs_and_reads_once(tmp_path: Path) -> None:
    Ws = [trajectory(30 + i) for i in range(4)]
    Ws.append(bump(Ws[0], 5, 2, 2))  # run 4 = run 0 but one ulp at step 5
    paths = [write_run(tmp_path / f"r{i}.safetensors", W) for i, W in enumerate(Ws)]
    readers = [CountingReader(p) for p in paths]
    ap = all_pairs(readers)
    for r in readers:
        assert r.reads == Counter({(KEY_W, t): 1 for t in range(S + 1)})
    assert ap.pairs.tolist() == [list(p) for p in itertools.combinations(range(5), 2)]
    assert ap.max_abs.shape == (10, S + 1)
    for p, (i, j) in enumerate(ap.pairs.tolist()):
        assert ap.pair_index(i, j) == p == ap.pair_index(j, i)
        pd = pair_divergence(paths[i], paths[j])
        for f in FIELDS:  # one kernel: bitwise the same alone as among five runs
            np.testing.assert_array_equal(getattr(ap, f)[p], getattr(pd, f), err_msg=f"{f} {(i, j)}")
        assert (None if ap.first_step[p] == NEVER else ap.first_step[p]) == pd.first_step
        assert ap.pair(i, j).first_step == pd.first_step
        np.testing.assert_array_equal(ap.pair(i, j).rows_differ, pd.rows_differ)
    assert ap.first_step[ap.pair_index(0, 4)] == 5
    m = ap.matrix("frobenius")
    assert m.shape == (5, 5) and np.array_equal(m, m.T) and not np.diag(m).any()
    assert m[1, 3] == ap.final()["frobenius"][ap.pair_index(1, 3)]
    summary = ap.summary()
    assert summary["n_pairs"] == 10 and summary["pairs_identical"] == 0
    assert summary["first_step_min"] == 1 and summary["first_step_max"] == 5
    assert summary["final_frobenius_min"] == 0.0  # runs 0 and 4 agree again after step 5
    for r in readers:
        r.close()

    # a subset of steps: first steps come from a separate scan, still one read per run per step
    readers = [CountingReader(p) for p in paths]
    sub = all_pairs(readers, steps=[0, 6])
    np.testing.assert_array_equal(sub.first_step, ap.first_step)
    np.testing.assert_array_equal(sub.max_abs, ap.max_abs[:, [0, 6]])
    for r in readers:
        assert max(r.reads.values()) <= 2  # once in the main loop, once in the first-step scan
        r.close()


def test_all_pairs_needs_two_runs(tmp_path: Path) -> None:
    a = write_run(tmp_path / "a.safetensors", trajectory(1))
    with pytest.raises(ArtifactError, match="at least 2"):
        all_pairs([a])


def test_update_fraction(tmp_path: Path) -> None:
    W = torch.zeros(S + 1, V, H, dtype=torch.bfloat16)
    W[0] = 1.0
    W[1] = 1.0
    W[1, 0, :3] = 2.0  # 3 entries change in one row
    W[2] = W[1]
    W[2, 0, 0] = 0.0  # 1 entry
    W[3] = W[2]
    W[3, 0, 0] = -0.0  # 0.0 -> -0.0: a bit change, no value change
    W[4] = W[3]
    W[4, 4, 4] = float("nan")  # 1 entry
    W[5] = W[4]  # NaN -> same NaN: no change
    W[6] = 3.0  # everything changes (V rows)
    p = write_run(tmp_path / "u.safetensors", W)
    frac = update_fraction(p)
    n = V * H
    assert math.isnan(frac[0])
    assert frac[1:].tolist() == [3 / n, 1 / n, 1 / n, 1 / n, 0.0, 1.0]
    entries, rows = update_counts(p)
    assert entries.tolist() == [0, 3, 1, 1, 1, 0, n]
    assert rows.tolist() == [0, 1, 1, 1, 1, 0, V]
    # bitwise: the ±0 step counts as a row difference between runs too
    q = write_run(tmp_path / "q.safetensors", torch.stack([W[0], W[1], W[2], W[2], W[4], W[5], W[6]]))
    pd = pair_divergence(p, q)
    assert pd.first_step == 3 and pd.rows_differ[3] == 1 and pd.max_abs[3] == 0.0


def f32_reference(Ws: list[torch.Tensor], live: torch.Tensor) -> dict[str, np.ndarray]:
    """Per pair (combinations order) and step, from float32 differences (exact upcast, then the
    subtraction rounded to float32, as the module docstring specifies), in numpy float64."""
    out: dict[str, list[np.ndarray]] = {f: [] for f in FIELDS}
    bits = {2: torch.int16, 4: torch.int32}[Ws[0].dtype.itemsize]
    for a, b in itertools.combinations(Ws, 2):
        d = (b.float() - a.float()).double().numpy()
        differ = (a.view(bits).numpy() != b.view(bits).numpy()).any(axis=2)
        out["max_abs"].append(np.abs(d).max(axis=(1, 2)))
        out["frobenius"].append(np.sqrt((d**2).sum(axis=(1, 2))))
        out["frobenius_live"].append(np.sqrt((d[:, live.numpy()] ** 2).sum(axis=(1, 2))))
        out["rows_differ"].append(differ.sum(axis=1))
        out["rows_differ_live"].append((differ & live.numpy()).sum(axis=1))
        out["rows_differ_dead"].append((differ & ~live.numpy()).sum(axis=1))
    return {f: np.stack(v) for f, v in out.items()}


@pytest.mark.parametrize("R", [2, 4, 5])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_all_pairs_threads_chunks_and_special_values(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, R: int, dtype: torch.dtype
) -> None:
    """Two worker threads sharing the steps, chunks of 3 token rows (97 rows: a short last chunk),
    odd and even run counts, NaN, ±0, inf and exponent gaps beyond float32's exact range: everything
    equals the float32-difference reference (frobenius to a few float64 ulps: numpy adds in another order),
    and every pair's numbers are bitwise those of `pair_divergence` in one thread and one chunk."""
    import flannel_repro.analysis.pair_kernel as pk

    vocab, hidden = 97, 8
    live = torch.arange(vocab) % 4 != 0
    monkeypatch.setattr(pk, "_PARALLEL_MIN_PAIR_ELEMS", 0)
    monkeypatch.setattr(pk, "_CHUNK_PAIR_ELEMS", 3 * (R * (R - 1) // 2) * hidden)
    g = torch.Generator().manual_seed(R)
    w0 = 0.02 * torch.randn(vocab, hidden, generator=g)
    Ws = []
    for r in range(R):
        W = torch.stack([(w0 + 1e-3 * t * torch.randn(vocab, hidden, generator=g)).to(dtype) for t in range(S + 1)])
        W[1, 5] = 0.0
        if r % 2:
            W[1, 5, 3] = -0.0  # bitwise different, value-equal
            W[2, 6, 1] = float("inf")
        W[3, 7, 2] = float("nan")  # the same NaN in every run: not a bit difference
        if r == 1:
            W[4, 8, 0], W[4, 8, 1] = 1e-7, 3e4  # differences rounded in float32 (bf16: not exact)
        if r == R - 1 and R > 2:
            W[5:] = Ws[0][5:]  # identical to run 0 from step 5 on
        Ws.append(W)
    paths = [write_run(tmp_path / f"r{i}.safetensors", W, live_mask=live) for i, W in enumerate(Ws)]
    threads_before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        readers = [CountingReader(p) for p in paths]
        ap = all_pairs(readers)
        assert torch.get_num_threads() == 2  # restored after the workers ran single-threaded
    finally:
        torch.set_num_threads(threads_before)
    for r in readers:
        assert r.reads == Counter({(KEY_W, t): 1 for t in range(S + 1)})  # every row read once
        r.close()
    ref = f32_reference(Ws, live)
    for f in ("max_abs", "rows_differ", "rows_differ_live", "rows_differ_dead"):
        np.testing.assert_array_equal(getattr(ap, f), ref[f], err_msg=f)
    assert np.isnan(ap.max_abs[:, 3]).all() and np.isnan(ap.frobenius[:, 3]).all()
    # float64 sums in other orders (numpy, per token row then over rows, one flat sum): a few ulps apart
    for f in ("frobenius", "frobenius_live"):
        np.testing.assert_allclose(getattr(ap, f), ref[f], rtol=1e-15, atol=0, err_msg=f)
    monkeypatch.setattr(pk, "_PARALLEL_MIN_PAIR_ELEMS", 1 << 20)  # one thread for one small pair
    monkeypatch.setattr(pk, "_CHUNK_PAIR_ELEMS", 1 << 19)  # all 97 rows in one chunk
    for p, (i, j) in enumerate(ap.pairs.tolist()):
        pd = pair_divergence(paths[i], paths[j], live_mask=live)
        for f in FIELDS:  # one kernel, one order of additions: bitwise, whatever the runs, chunks and threads
            np.testing.assert_array_equal(getattr(pd, f), getattr(ap, f)[p], err_msg=f)
        assert (
            (None if ap.first_step[p] == NEVER else ap.first_step[p])
            == pd.first_step
            == first_divergent_step(paths[i], paths[j])
        )


def test_first_divergent_step_scans_in_blocks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of 2 steps (one buffer per run, reused); the difference in the middle of a block."""
    import flannel_repro.analysis.bitwise as bw

    monkeypatch.setattr(bw, "_SCAN_BLOCK_BYTES", 2 * V * H * 2)
    W = trajectory(7)
    a = write_run(tmp_path / "a.safetensors", W)
    for t in range(S + 1):
        b = write_run(tmp_path / f"b{t}.safetensors", bump(W, t, 3, 3, persist=True))
        assert first_divergent_step(a, b) == t
        assert first_divergent_step(a, b, trust_digests=True) == t
    entries, rows = update_counts(a)
    changed = W[1:].view(torch.int16) != W[:-1].view(torch.int16)
    assert entries.tolist() == [0] + changed.sum(dim=(1, 2)).tolist()
    assert rows.tolist() == [0] + changed.any(dim=2).sum(dim=1).tolist()
