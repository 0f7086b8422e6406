"""storage.safeio: regular files only, no link followed in our folders, fresh temporary names, no FIFO blocks."""

from __future__ import annotations

import os
import stat
import struct

import pytest

from flannel_repro.data import files as data_files
from flannel_repro.errors import ArtifactError, DataError
from flannel_repro import safeio
from flannel_repro.storage import jsonfile
from flannel_repro.storage.reader import ArtifactReader


@pytest.fixture
def outside(tmp_path):
    p = tmp_path / "outside.txt"
    p.write_bytes(b"keep")
    return p


def test_regular_file_follows_links_to_files_and_refuses_other_kinds(tmp_path, outside):
    (tmp_path / "link").symlink_to(outside)
    assert safeio.regular_file(tmp_path / "link", "a run artifact").st_size == 4
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    for path, got in (
        (tmp_path / "fifo", "a FIFO"),
        (tmp_path, "a directory"),
        ("/dev/null", "a character device"),
        (tmp_path / "none", "no such file"),
        (tmp_path / "loop", "a loop of symbolic links"),
    ):
        with pytest.raises(ArtifactError, match=f"{path}: expected a run artifact .*{got}"):
            safeio.regular_file(path, "a run artifact")
    with pytest.raises(DataError, match="a FIFO"):
        safeio.regular_file(tmp_path / "fifo", "a corpus", DataError)


def test_own_file_refuses_links_and_special_files(tmp_path, outside):
    assert safeio.own_file(tmp_path / "none", "a lock file") is None
    assert safeio.own_file(outside, "a lock file").st_size == 4
    (tmp_path / "link").symlink_to(outside)
    with pytest.raises(
        ArtifactError, match="link: expected a lock file .*symbolic link; flannel-repro does not follow"
    ):
        safeio.own_file(tmp_path / "link", "a lock file")
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(ArtifactError, match="fifo: expected a lock file .*got a FIFO"):
        safeio.own_file(tmp_path / "fifo", "a lock file")


def test_open_nofollow(tmp_path, outside):
    fd = safeio.open_nofollow(tmp_path / "log", os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        assert os.get_blocking(fd)
        os.write(fd, b"x")
    finally:
        os.close(fd)
    assert (tmp_path / "log").read_bytes() == b"x"
    (tmp_path / "link").symlink_to(outside)
    with pytest.raises(ArtifactError, match="link: expected the log .*symbolic link"):
        safeio.open_nofollow(tmp_path / "link", os.O_WRONLY | os.O_APPEND | os.O_CREAT, what="the log")
    assert outside.read_bytes() == b"keep"
    os.mkfifo(tmp_path / "fifo")
    for flags in (os.O_WRONLY | os.O_APPEND, os.O_RDONLY, os.O_RDWR):  # none blocks
        with pytest.raises(ArtifactError, match="fifo: .*FIFO"):
            safeio.open_nofollow(tmp_path / "fifo", flags)
    with pytest.raises(FileNotFoundError):
        safeio.open_nofollow(tmp_path / "none", os.O_RDONLY)


def test_read_regular(tmp_path, outside):
    (tmp_path / "link").symlink_to(outside)
    assert safeio.read_regular(tmp_path / "link", "a chain") == b"keep"
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(ArtifactError, match="fifo: expected a chain .*a FIFO"):
        safeio.read_regular(tmp_path / "fifo", "a chain")
    with pytest.raises(ArtifactError, match="at most 3 bytes, got 4 bytes"):
        safeio.read_regular(outside, "a chain", max_bytes=3)
    with pytest.raises(FileNotFoundError):
        safeio.read_regular(tmp_path / "none", "a chain")


def test_write_bytes_atomic(tmp_path, outside):
    out = tmp_path / "index.html"
    (tmp_path / f".index.html.tmp-{os.getpid()}").symlink_to(outside)  # the old, predictable name
    assert safeio.write_bytes_atomic(out, b"page", "the page") == out
    assert out.read_bytes() == b"page" and outside.read_bytes() == b"keep"
    assert stat.S_IMODE(out.stat().st_mode) == 0o644 & ~safeio._umask()
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".index.html.tmp-{os.getpid()}", "index.html", "outside.txt"]
    link = tmp_path / "link.html"
    link.symlink_to(outside)
    with pytest.raises(ArtifactError, match="link.html: expected the page .*symbolic link"):
        safeio.write_bytes_atomic(link, b"page", "the page")
    assert outside.read_bytes() == b"keep" and link.is_symlink()
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(ArtifactError, match="got a FIFO"):
        safeio.write_bytes_atomic(tmp_path / "fifo", b"x", "the page")
    with pytest.raises(ArtifactError, match=f"{tmp_path / 'none' / 'x'}: could not write the page"):
        safeio.write_bytes_atomic(tmp_path / "none" / "x", b"x", "the page")


def test_write_bytes_atomic_removes_its_temporary_file_on_error(tmp_path, monkeypatch):
    def full(fd, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safeio.os, "write", full)
    with pytest.raises(ArtifactError, match="out.json: could not write the chain .No space left"):
        safeio.write_bytes_atomic(tmp_path / "out.json", b"x", "the chain")
    assert list(tmp_path.iterdir()) == []


def test_json_nesting_is_bounded_before_parsing(tmp_path):
    assert jsonfile.nesting_depth('{"a": [[1], "[[[[\\"[["], "b": {}}') == 3
    assert jsonfile.nesting_depth("plain") == 0
    p = tmp_path / "chain.json"
    p.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ArtifactError, match="chain.json: expected a chain nested at most 64 levels deep, got 100000"):
        jsonfile.read_json(p, "a chain")
    os.mkfifo(tmp_path / "fifo.json")
    with pytest.raises(ArtifactError, match="fifo.json: expected a chain .*a FIFO"):
        jsonfile.read_json(tmp_path / "fifo.json", "a chain")


def test_reader_refuses_special_files_and_deep_headers(tmp_path):
    os.mkfifo(tmp_path / "fifo.safetensors")
    with pytest.raises(ArtifactError, match="fifo.safetensors: expected a safetensors file .*a FIFO"):
        ArtifactReader(tmp_path / "fifo.safetensors")
    with pytest.raises(ArtifactError, match="a character device"):
        ArtifactReader("/dev/zero")
    body = b"{" + b'"a":[' * 200 + b"]" * 200 + b"}"
    (tmp_path / "deep.safetensors").write_bytes(struct.pack("<Q", len(body)) + body)
    with pytest.raises(ArtifactError, match="deep.safetensors: expected a JSON header nested at most 64 levels deep"):
        ArtifactReader(tmp_path / "deep.safetensors")


def test_data_files_are_regular_and_fit_in_memory(tmp_path, monkeypatch):
    os.mkfifo(tmp_path / "corpus.txt")
    with pytest.raises(DataError, match=r"corpus.txt: expected a corpus file \(a regular file\), got a FIFO"):
        data_files.read_bytes(tmp_path / "corpus.txt", "corpus")
    with pytest.raises(DataError, match="/dev/zero: expected a corpus file .*got a character device"):
        data_files.read_bytes(tmp_path.joinpath("/dev/zero"), "corpus")
    big = tmp_path / "big.txt"
    big.write_bytes(b"x" * 100)
    monkeypatch.setattr(data_files, "memory_limit", lambda: (99, 99 * 16))
    with pytest.raises(
        DataError,
        match=r"big.txt: expected a corpus file of at most 99 bytes \(1/16 of this machine's 1584 bytes of memory.*got 100 bytes",
    ):
        data_files.read_bytes(big, "corpus")
    assert data_files.read_bytes(big, "token cache", guard_memory=False) == b"x" * 100


def test_a_config_file_that_is_a_fifo_is_refused_without_blocking(tmp_path):
    from flannel_repro.config import ExperimentConfig
    from flannel_repro.errors import ConfigError

    os.mkfifo(tmp_path / "flannel.toml")
    with pytest.raises(
        ConfigError, match=r"flannel.toml: expected a config file \(TOML\) \(a regular file\), got a FIFO"
    ):
        ExperimentConfig.from_toml(tmp_path / "flannel.toml")
