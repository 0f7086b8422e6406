"""Tests of the artifact files (flannel_repro.storage: format, writer, reader, partials): the streaming writer,
the lazy reader, safetensors interop, atomic publication and partial files, digests."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from flannel_repro.errors import ArtifactError
from flannel_repro.storage import layout
from flannel_repro.storage.format import TensorSpec, digest_tensor
from flannel_repro.storage.layout import KEY_LIVE_MASK, KEY_LOSSES, KEY_W
from flannel_repro.storage.partials import cleanup_partials
from flannel_repro.storage.reader import ArtifactReader
from flannel_repro.storage.writer import ArtifactWriter

REPO = Path(__file__).resolve().parents[1]
V, H, S, B = 50, 8, 6, 4


def base_config(**over: Any) -> dict[str, Any]:
    cfg = dict(
        vocab_size=V,
        hidden_dim=H,
        steps=S,
        init_seed=42,
        init_scale=0.02,
        lr=1e-3,
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        model_seed=42,
        data_seed=42,
        record_W=True,
        batch_size=B,
    )
    cfg.update(over)
    return cfg


def make_trajectory(seed: int, w0: torch.Tensor, steps: int = S) -> torch.Tensor:
    """(steps+1, V, H) bf16 trajectory starting at w0 with seed-dependent random-walk steps."""
    g = torch.Generator().manual_seed(seed)
    rows = [w0]
    for _ in range(steps):
        rows.append((rows[-1].float() + 1e-3 * torch.randn(w0.shape, generator=g)).to(torch.bfloat16))
    return torch.stack(rows)


def write_run(
    path: Path,
    W: torch.Tensor,
    *,
    config: dict[str, Any],
    losses: torch.Tensor | None = None,
    live_mask: torch.Tensor | None = None,
) -> Path:
    """A per-run artifact in the harness layout, written row by row."""
    steps, vocab = W.shape[0] - 1, W.shape[1]
    if losses is None:
        losses = torch.linspace(5.0, 3.0, steps + 1)
        losses[0] = float("nan")
    if live_mask is None:
        live_mask = torch.arange(vocab) % 5 != 0
    n_live = int(live_mask.sum())
    return layout.write_run(
        path,
        W,
        steps=steps,
        live_mask=live_mask,
        config=config,
        losses=losses,
        batch_size=B,
        data={"n_live": n_live, "n_dead": vocab - n_live, "corpus_sha256": "x"},
        batch_starts=torch.arange(steps * B, dtype=torch.int64).reshape(steps, B),
    )


def make_runs(tmp_path: Path, n: int = 3) -> tuple[list[Path], list[torch.Tensor], torch.Tensor]:
    w0 = (0.02 * torch.randn(V, H, generator=torch.Generator().manual_seed(42))).to(torch.bfloat16)
    paths, Ws = [], []
    for i in range(n):
        W = make_trajectory(100 + i, w0)
        Ws.append(W)
        paths.append(
            write_run(tmp_path / f"run{i}.safetensors", W, config=base_config(model_seed=42 + i, data_seed=42 + i))
        )
    return paths, Ws, w0


ALL_DTYPES = [torch.bfloat16, torch.float32, torch.int64, torch.uint8, torch.bool, torch.float16, torch.int32]


def sample(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) > 0.5
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    return torch.randint(0, 200, shape, generator=g).to(dtype)


def write_all_dtypes(path: Path, metadata: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    tensors = {f"t_{str(dt).split('.')[-1]}": sample(dt, (5, 3, 2), i) for i, dt in enumerate(ALL_DTYPES)}
    tensors["scalar"] = torch.tensor(7, dtype=torch.int64)
    tensors["empty"] = torch.zeros((0, 4), dtype=torch.float32)
    specs = [TensorSpec(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    with ArtifactWriter(path, specs, metadata or {"k": "v"}) as w:
        for k, v in tensors.items():
            if v.dim() and v.shape[0]:
                for i in reversed(range(v.shape[0])):  # out of order on purpose
                    w.write_row(k, i, v[i])
            else:
                w.write(k, v)
        w.finish()
    return tensors


def assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


# --- round trips ------------------------------------------------------------------------------


def test_round_trip_all_dtypes(tmp_path: Path) -> None:
    p = tmp_path / "a.safetensors"
    tensors = write_all_dtypes(p)
    assert not list(tmp_path.glob("*.partial-*"))
    with ArtifactReader(p) as r:
        assert set(r.keys()) == set(tensors)
        for k, v in tensors.items():
            assert_same(r[k], v)
            assert r.spec(k) == TensorSpec(k, v.dtype, tuple(v.shape))
        assert "scalar" in r and "nope" not in r
        with pytest.raises(ArtifactError, match="nope"):
            r["nope"]
    # 8 + N is a multiple of 8, and every tensor is aligned to its element size
    with open(p, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    assert (8 + n) % 8 == 0
    for k, info in header.items():
        if k != "__metadata__":
            assert info["data_offsets"][0] % tensors[k].element_size() == 0


def test_metadata_round_trip_and_finish_extra(tmp_path: Path) -> None:
    p = tmp_path / "m.safetensors"
    meta = {"format": "x/1", "config": json.dumps({"a": [1, 2]}), "unicode": "ΔW ‖·‖"}
    spec = TensorSpec("x", torch.float32, (2,))
    with ArtifactWriter(p, [spec], meta) as w:
        w.write("x", torch.ones(2))
        w.finish({"status": "complete", "format": "x/2"})
    final = {**meta, "status": "complete", "format": "x/2"}
    checksums = {
        "x": hashlib.blake2b(torch.ones(2).numpy().tobytes(), digest_size=32).hexdigest(),
        "__metadata__": hashlib.blake2b(json.dumps(final, sort_keys=True).encode(), digest_size=32).hexdigest(),
    }
    with ArtifactReader(p) as r:
        assert r.metadata == {**final, "checksums": json.dumps(checksums, sort_keys=True)}
        assert r.checksum_problems() == []
    with safe_open(str(p), framework="pt") as f:
        assert f.metadata() == {**final, "checksums": json.dumps(checksums, sort_keys=True)}


def test_metadata_must_be_str(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="str"):
        ArtifactWriter(tmp_path / "x", [], {"n": 3})  # type: ignore[dict-item]
    with ArtifactWriter(tmp_path / "y", [], {}) as w:
        with pytest.raises(ArtifactError, match="str"):
            w.finish({"n": 1.5})  # type: ignore[dict-item]


def test_safetensors_reads_our_files(tmp_path: Path) -> None:
    p = tmp_path / "ours.safetensors"
    tensors = write_all_dtypes(p, {"who": "us"})
    loaded = load_file(str(p))
    assert set(loaded) == set(tensors)
    for k, v in tensors.items():
        assert_same(loaded[k], v)
    with safe_open(str(p), framework="pt") as f:
        assert json.loads(f.metadata().pop("checksums")).keys() == {*tensors, "__metadata__"}
        assert {k: v for k, v in f.metadata().items() if k != "checksums"} == {"who": "us"}
        for k, v in tensors.items():
            assert_same(f.get_tensor(k), v)
            if v.dim() and v.shape[0] > 2:
                assert_same(f.get_slice(k)[1:3], v[1:3])


def test_we_read_safetensors_files(tmp_path: Path) -> None:
    p = tmp_path / "theirs.safetensors"
    tensors = {f"t{i}": sample(dt, (4, 3), i) for i, dt in enumerate(ALL_DTYPES)}
    tensors["scalar"] = torch.tensor(1.5, dtype=torch.float64)
    save_file(tensors, str(p), metadata={"a": "b"})
    with ArtifactReader(p) as r:
        assert r.metadata == {"a": "b"}
        assert set(r.keys()) == set(tensors)
        for k, v in tensors.items():
            assert_same(r[k], v)


def test_reader_tensors_never_write_back(tmp_path: Path) -> None:
    p = tmp_path / "ro.safetensors"
    with ArtifactWriter(p, [TensorSpec("x", torch.float32, (4,))], {}) as w:
        w.write("x", torch.arange(4.0))
        w.finish()
    before = p.read_bytes()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "non-writable array" UserWarning from torch
        r = ArtifactReader(p)
        x = r["x"]
    x.add_(100.0)  # copy-on-write: private to this process
    r.close()
    assert x[0].item() == 100.0  # views stay valid after close
    assert p.read_bytes() == before
    with ArtifactReader(p) as r2:
        assert torch.equal(r2["x"], torch.arange(4.0))


# --- atomicity and failure --------------------------------------------------------------------


def test_exception_inside_with_leaves_nothing(tmp_path: Path) -> None:
    p = tmp_path / "boom.safetensors"
    with pytest.raises(RuntimeError):
        with ArtifactWriter(p, [TensorSpec("x", torch.float32, (3, 2))], {}) as w:
            w.write_row("x", 0, torch.ones(2))
            assert w.temp_path is not None and w.temp_path.exists()
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_no_finish_leaves_nothing(tmp_path: Path) -> None:
    p = tmp_path / "nofinish.safetensors"
    with ArtifactWriter(p, [TensorSpec("x", torch.float32, (3,))], {}) as w:
        w.write("x", torch.ones(3))
    assert list(tmp_path.iterdir()) == []


def test_unwritten_rows_refused_unless_allowed(tmp_path: Path) -> None:
    p = tmp_path / "holes.safetensors"
    spec = TensorSpec("x", torch.float32, (3, 2))
    with pytest.raises(ArtifactError, match="never written"):
        with ArtifactWriter(p, [spec], {}) as w:
            w.write_row("x", 0, torch.ones(2))
            w.finish()
    assert list(tmp_path.iterdir()) == []
    with ArtifactWriter(p, [spec], {}) as w:
        w.write_row("x", 0, torch.ones(2))
        assert w.unwritten() == {"x": 2}
        w.finish(allow_unwritten=True)
    with ArtifactReader(p) as r:
        assert torch.equal(r["x"], torch.tensor([[1.0, 1.0], [0.0, 0.0], [0.0, 0.0]]))


def test_killed_writer_leaves_only_partial(tmp_path: Path) -> None:
    final = tmp_path / "killed.safetensors"
    script = textwrap.dedent(
        f"""
        import os, signal, torch
        from flannel_repro.storage.format import TensorSpec
        from flannel_repro.storage.writer import ArtifactWriter
        w = ArtifactWriter({str(final)!r}, [TensorSpec("W", torch.bfloat16, (10, 50, 8))], {{"a": "b"}})
        w.__enter__()
        for t in range(3):
            w.write_row("W", t, torch.ones(50, 8, dtype=torch.bfloat16))
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0, proc.stderr
    assert not final.exists()
    partials = list(tmp_path.glob("killed.safetensors.partial-*"))
    assert len(partials) == 1
    with pytest.raises(ArtifactError, match="incomplete"):
        ArtifactReader(partials[0])
    assert cleanup_partials(tmp_path, older_than_s=3600) == []  # too recent
    assert cleanup_partials(tmp_path, older_than_s=0) == partials  # writer pid is gone
    assert list(tmp_path.iterdir()) == []


def test_cleanup_keeps_live_writers(tmp_path: Path) -> None:
    with ArtifactWriter(tmp_path / "live", [TensorSpec("x", torch.uint8, (1,))], {}) as w:
        assert cleanup_partials(tmp_path, older_than_s=0) == []
        assert w.temp_path is not None and w.temp_path.exists()


def test_truncated_file(tmp_path: Path) -> None:
    p = tmp_path / "t.safetensors"
    write_all_dtypes(p)
    size = p.stat().st_size
    with open(p, "r+b") as f:
        f.truncate(size - 3)
    with pytest.raises(ArtifactError, match=f"truncated or incomplete: expected {size} bytes, got {size - 3}"):
        ArtifactReader(p)
    with open(p, "r+b") as f:
        f.truncate(5)
    with pytest.raises(ArtifactError, match="truncated or incomplete"):
        ArtifactReader(p)
    with open(p, "r+b") as f:
        f.truncate(0)
        f.write((1000).to_bytes(8, "little") + b"{")
    with pytest.raises(ArtifactError, match="expected at least 1008 bytes"):
        ArtifactReader(p)


def test_garbage_header(tmp_path: Path) -> None:
    p = tmp_path / "g.safetensors"
    p.write_bytes((8).to_bytes(8, "little") + b"not json")
    with pytest.raises(ArtifactError, match="JSON"):
        ArtifactReader(p)
    with pytest.raises(ArtifactError, match="no such file"):
        ArtifactReader(tmp_path / "missing.safetensors")


def test_write_row_validation(tmp_path: Path) -> None:
    spec = TensorSpec("W", torch.bfloat16, (3, 4, 2))
    with ArtifactWriter(tmp_path / "v", [spec], {}) as w:
        with pytest.raises(ArtifactError, match="expected dtype torch.bfloat16, got torch.float32"):
            w.write_row("W", 0, torch.zeros(4, 2))
        with pytest.raises(ArtifactError, match=r"expected shape \(4, 2\), got \(4, 3\)"):
            w.write_row("W", 0, torch.zeros(4, 3, dtype=torch.bfloat16))
        with pytest.raises(ArtifactError, match=r"expected an index in \[0, 3\), got 3"):
            w.write_row("W", 3, torch.zeros(4, 2, dtype=torch.bfloat16))
        with pytest.raises(ArtifactError, match=r"got -1"):
            w.write_row("W", -1, torch.zeros(4, 2, dtype=torch.bfloat16))
        with pytest.raises(ArtifactError, match="no tensor 'X'"):
            w.write_row("X", 0, torch.zeros(4, 2, dtype=torch.bfloat16))
        with pytest.raises(ArtifactError, match=r"expected shape \(3, 4, 2\)"):
            w.write("W", torch.zeros(4, 2, dtype=torch.bfloat16))
    with pytest.raises(ArtifactError, match="not entered"):
        ArtifactWriter(tmp_path / "v", [spec], {}).write_row("W", 0, torch.zeros(4, 2, dtype=torch.bfloat16))


def test_tuple_index_write(tmp_path: Path) -> None:
    p = tmp_path / "tuple.safetensors"
    x = sample(torch.bfloat16, (2, 3, 4, 5))
    with ArtifactWriter(p, [TensorSpec("x", x.dtype, tuple(x.shape))], {}) as w:
        for i in range(2):
            for j in range(3):
                w.write_row("x", (i, j), x[i, j])
        w.finish()
    with ArtifactReader(p) as r:
        assert_same(r["x"], x)


def test_metadata_too_large(tmp_path: Path) -> None:
    p = tmp_path / "big.safetensors"
    with pytest.raises(ArtifactError, match="reserve"):
        with ArtifactWriter(p, [TensorSpec("x", torch.float32, (1,))], {"a": "b"}, reserve_metadata_bytes=100) as w:
            w.write("x", torch.ones(1))
            w.finish({"huge": "z" * 200})
    assert list(tmp_path.iterdir()) == []
    # a little extra fits in the reserve
    with ArtifactWriter(p, [TensorSpec("x", torch.float32, (1,))], {"a": "b"}, reserve_metadata_bytes=100) as w:
        w.write("x", torch.ones(1))
        w.finish({"small": "z" * 50})
    assert load_file(str(p))["x"].item() == 1.0


def _rss_file_bytes() -> int:
    """Resident file-backed pages of this process (mapped files), from /proc/self/status."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssFile:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no RssFile line in /proc/self/status")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_lazy_rows(tmp_path: Path) -> None:
    # 64 MiB W, sparse on disk: only two rows are ever written.
    steps, vocab, hidden = 64, 1024, 512
    p = tmp_path / "lazy.safetensors"
    spec = TensorSpec("W", torch.bfloat16, (steps, vocab, hidden))
    row = sample(torch.bfloat16, (vocab, hidden), 3)
    with ArtifactWriter(p, [spec], {}) as w:
        w.write_row("W", 5, row)
        w.write_row("W", 60, row)
        w.finish(allow_unwritten=True)
    with ArtifactReader(p) as r:
        before = _rss_bytes() if os.path.exists("/proc/self/statm") else None
        W = r["W"]
        assert W.shape == (steps, vocab, hidden) and W.dtype == torch.bfloat16
        assert_same(W[5], row)
        assert_same(W[60], row)
        assert not W[6].any()
        if before is not None:
            grew = _rss_bytes() - before
            assert grew < 16 << 20, f"reading 3 rows grew RSS by {grew} bytes"
        # the view is backed by the file: a change made on disk after opening shows in a later read
        off = r._data_start + r._offsets["W"][0] + 7 * vocab * hidden * 2
        with open(p, "r+b") as f:
            os.pwrite(f.fileno(), row.view(torch.uint8).numpy().tobytes(), off)
        assert_same(r.row("W", 7), row)


def test_positional_reads(tmp_path: Path) -> None:
    """row/rows/read copy from the file without mapping it; out= buffers are filled and reused."""
    paths, Ws, _ = make_runs(tmp_path, 1)
    W = Ws[0]
    with ArtifactReader(paths[0]) as r:
        assert_same(r.row(KEY_W, 3), W[3])
        assert_same(r.row(KEY_W, -1), W[-1])  # negative indices count from the end, as W[-1]
        assert_same(r.row(KEY_W, (2, 7)), W[2, 7])
        assert_same(r.row(KEY_W, np.int64(2)), W[2])
        assert_same(r.row(KEY_W, torch.tensor(2)), W[2])
        with pytest.raises(ArtifactError, match="expected an int index"):
            r.row(KEY_W, True)
        assert_same(r.row(KEY_W, 4, start=10, stop=17), W[4, 10:17])
        assert_same(r.row(KEY_W, 4, start=V - 1), W[4, V - 1 :])
        assert_same(r.row(KEY_W, 4, start=5, stop=5), W[4, 5:5])
        assert_same(r.rows(KEY_W, 1, 4), W[1:4])
        buf = torch.empty(V, H, dtype=torch.bfloat16)
        for t in range(S + 1):
            assert r.row(KEY_W, t, out=buf) is buf
            assert_same(buf, W[t])
        block = torch.empty(2, V, H, dtype=torch.bfloat16)
        assert r.rows(KEY_W, 5, 7, out=block) is block
        assert_same(block, W[5:7])
        assert r.read(KEY_LIVE_MASK).dtype == torch.bool
        assert r._mm is None  # nothing above made the map
        copy = r.row(KEY_W, 0)
        copy.add_(1.0)  # the caller's own tensor
        assert_same(r.row(KEY_W, 0), W[0])
        with pytest.raises(IndexError, match="out of bounds"):
            r.row(KEY_W, S + 1)
        with pytest.raises(IndexError, match="out of bounds"):
            r.row(KEY_W, -(S + 2))
        with pytest.raises(ArtifactError, match="leading indices"):
            r.row(KEY_W, (0, 0, 0, 0))
        with pytest.raises(ArtifactError, match="start <= stop"):
            r.row(KEY_W, 0, start=3, stop=2)
        with pytest.raises(ArtifactError, match="start <= stop"):
            r.rows(KEY_W, 0, S + 2)
        with pytest.raises(ArtifactError, match="out= to be a contiguous CPU torch.bfloat16 tensor of shape"):
            r.row(KEY_W, 0, out=torch.empty(V, H))  # wrong dtype
        with pytest.raises(ArtifactError, match="of shape"):
            r.row(KEY_W, 0, out=torch.empty(V, H + 1, dtype=torch.bfloat16))
        with pytest.raises(ArtifactError, match="non-contiguous"):
            r.row(KEY_W, 0, out=torch.empty(H, V, dtype=torch.bfloat16).T)
        with pytest.raises(ArtifactError, match="expected a tensor 'nope'"):
            r.row("nope", 0)
        view = r[KEY_W]  # the map still works, created on first use
        assert r._mm is not None
        assert_same(view[3], W[3])
    for read in (lambda: r.row(KEY_W, 0), lambda: r.rows(KEY_W, 0, 1), lambda: r.read(KEY_LOSSES), lambda: r[KEY_W]):
        with pytest.raises(ArtifactError, match="the reader is closed"):
            read()
    assert r.closed
    assert_same(view[3], W[3])  # views handed out before close stay valid


def test_positional_reads_from_threads(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    paths, Ws, _ = make_runs(tmp_path, 1)
    with ArtifactReader(paths[0]) as r:
        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(lambda t: r.row(KEY_W, t % (S + 1)), range(64)))
        for t, row in enumerate(got):
            assert_same(row, Ws[0][t % (S + 1)])


def test_truncated_after_open(tmp_path: Path) -> None:
    paths, _, _ = make_runs(tmp_path, 1)
    with ArtifactReader(paths[0]) as r:
        os.truncate(paths[0], r.file_size - 1)  # replaced by something shorter under our feet
        with pytest.raises(ArtifactError, match="truncated"):
            r.read(KEY_LIVE_MASK)  # the last tensor in the file


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc")
def test_release_pages_drops_the_map_from_rss(tmp_path: Path) -> None:
    steps, vocab, hidden = 16, 1024, 1024  # 32 MiB of W
    p = tmp_path / "big.safetensors"
    with ArtifactWriter(p, [TensorSpec("W", torch.bfloat16, (steps, vocab, hidden))], {}) as w:
        for t in range(steps):
            w.write_row("W", t, torch.full((vocab, hidden), float(t), dtype=torch.bfloat16))
        w.finish()
    # File-backed resident pages only (RssFile): heap growth from temporaries, which an allocator
    # may keep, must not count.
    with ArtifactReader(p) as r:
        buf = torch.zeros((vocab, hidden), dtype=torch.bfloat16)
        before = _rss_file_bytes()
        for t in range(steps):
            assert r.row("W", t, buf)[7, 7].item() == t  # positional reads: nothing stays resident
        assert _rss_file_bytes() - before < 8 << 20
        W = r["W"]
        assert sum(float(W[t].sum()) for t in range(steps)) > 0  # touches every page of the map
        touched = _rss_file_bytes() - before
        assert touched > 24 << 20, touched
        r.release_pages()
        assert _rss_file_bytes() - before < touched / 4
        assert W[5, 3, 3].item() == 5.0  # the view still works: pages come back from the file


def test_digest() -> None:
    x = sample(torch.bfloat16, (3, 4))
    d = digest_tensor(x)
    assert len(d) == 32 and d == digest_tensor(x.clone())
    y = x.clone()
    y.view(torch.int16)[1, 2] += 1
    assert digest_tensor(y) != d
    assert digest_tensor(x.t()) == digest_tensor(x.t().contiguous())
