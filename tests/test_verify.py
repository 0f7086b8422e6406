"""An artifact's contents are checked before anyone trusts them: a flipped bit in W, an edited config
in the metadata or an edited tensor dtype in the header is found, the store trains the run again
(bitwise equal to the original), and `flannel-repro digests` refuses the file."""

from __future__ import annotations

import json
import struct
import warnings
from pathlib import Path

import pytest

from flannel_repro import cli
from flannel_repro.errors import ArtifactWarning
from flannel_repro.storage.run import RunFile
from flannel_repro.runs.store import RunStore
from tests.conftest import TINY

CFG = TINY.replace(steps=3)


def _header(path) -> tuple[int, dict]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return n, json.loads(raw[8 : 8 + n])


def _patch_bytes(path, old: bytes, new: bytes) -> None:
    assert len(old) == len(new)
    raw = path.read_bytes()
    assert raw.count(old) >= 1, old
    path.write_bytes(raw.replace(old, new, 1))


def _flip_bit_of_W(path, step: int) -> None:
    n, header = _header(path)
    begin, end = header["W"]["data_offsets"]
    row = (end - begin) // (CFG.steps + 1)
    raw = bytearray(path.read_bytes())
    raw[8 + n + begin + step * row + 5] ^= 0x01
    path.write_bytes(bytes(raw))


@pytest.fixture
def trained(tmp_path):
    store = RunStore(tmp_path / "artifacts")
    got = store.obtain(CFG)
    digests = got.trajectory.digests.clone()
    path = got.trajectory.path
    got.trajectory.close()
    return store, path, digests


def test_a_good_artifact_verifies(trained):
    _, path, _ = trained
    assert RunFile(path).verify() == []


def test_a_flipped_bit_in_W_is_found_and_the_run_is_trained_again(trained, capsys):
    store, path, digests = trained
    _flip_bit_of_W(path, step=2)
    assert RunFile(path).verify() == [
        "W at step 2 does not hash to its stored digest (the file changed after it was written)"
    ]
    for command in (["digests"], ["info"], ["divergence", str(path)], ["export-notebook", "-o", str(path) + ".nb"]):
        assert cli.main([*command, str(path)]) == 3, command  # computed from the bytes, not from what the file claims
        assert "failed verification: W at step 2 does not hash" in capsys.readouterr().err
    assert not Path(str(path) + ".nb").exists()
    assert cli.main(["verify", str(path)]) == 1
    assert "FAILED: W at step 2 does not hash" in capsys.readouterr().out
    assert cli.main(["info", "--no-verify", str(path)]) == 0  # asked to trust it
    with pytest.warns(ArtifactWarning, match="failed verification .*W at step 2"):
        again = store.obtain(CFG)
    assert again.trained  # not reused
    assert bytes(again.trajectory.digests.numpy()) == bytes(digests.numpy())  # the same run, bit for bit
    assert again.trajectory.verify() == []
    with warnings.catch_warnings():
        warnings.simplefilter("error", ArtifactWarning)
        assert store.obtain(CFG).trained is False  # the retrained file is reused


def test_an_edited_config_or_dtype_in_the_header_is_found(trained):
    store, path, _ = trained
    _patch_bytes(path, b'\\"lr\\": 0.001', b'\\"lr\\": 0.002')
    problems = RunFile(path).verify()
    assert len(problems) == 1 and "is not the one its run key was made from" in problems[0]
    with pytest.warns(ArtifactWarning):
        assert store.obtain(CFG).trained
    path = next((store.root).glob("*.safetensors"))
    _patch_bytes(path, b'"dtype":"BF16"', b'"dtype":"F16" ')
    assert RunFile(path).verify() == [
        "W: expected bfloat16 of shape [4, 512, 64] (from the config), got float16 of shape [4, 512, 64]"
    ]
