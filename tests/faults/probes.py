"""Fault probes: what a new user, a full disk, a killed process or a damaged file does to flannel-repro.

Each probe sets up one fault in a fresh directory, drives the real surface (the run store, the data
loader, the command line, a pytest session in a subprocess) and classifies what happened:

- ``clear``: refused with a named error (FlannelError, a pytest usage error, a CLI exit code of 2 or 3)
  whose message names the thing that is wrong; nothing half-written is left;
- ``fine``: the fault is harmless and the result is checked to be the right one (e.g. a damaged cache
  entry rebuilt, a killed run's partial file removed and the run trained again bitwise equal);
- ``silent``: it went through and the result is wrong (or not checked to be right);
- ``unclear``: an error, but not a named one, or one that does not name the thing;
- ``crash``: a traceback or a signal;
- ``hang``: still running when the probe's time was up (a FIFO read, a lock never released);
- ``outside``: something outside the probe's folder was written or deleted (through a planted link).

`tests/faults/test_faults.py` asserts every probe is clear or fine; ``python -m tests.faults`` runs
them all and prints the table recorded in tests/faults/README.md.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from flannel_repro import cli
from flannel_repro.config import ExperimentConfig, RunConfig
from flannel_repro.data.corpus import load_data
from flannel_repro.data.embedded import embedded_paths
from flannel_repro.data.files import compute_token_mask, load_token_mask, save_token_mask
from flannel_repro.errors import FlannelError
from flannel_repro.storage.run import RunFile
from flannel_repro.runs.store import RunStore

REPO = Path(__file__).resolve().parents[2]
# The tiny embedded data set (512 tokens); 4 steps train in a fraction of a second once torch is warm.
CFG = RunConfig(dataset="tiny", vocab_size=512, steps=4, batch_size=8, seq_len=32, threads=1)
KINDS = ("clear", "fine", "silent", "unclear", "crash", "hang", "outside")


@dataclass(frozen=True)
class Outcome:
    kind: str  # one of KINDS
    detail: str

    @property
    def ok(self) -> bool:
        return self.kind in ("clear", "fine")


@dataclass(frozen=True)
class Probe:
    group: str
    name: str
    run: Callable[[Path], Outcome]  # gets a fresh, empty directory

    @property
    def id(self) -> str:
        return f"{self.group}: {self.name}"


PROBES: list[Probe] = []


def probe(group: str, name: str) -> Callable[[Callable[[Path], Outcome]], Callable[[Path], Outcome]]:
    def register(fn: Callable[[Path], Outcome]) -> Callable[[Path], Outcome]:
        PROBES.append(Probe(group, name, fn))
        return fn

    return register


def run_probe(p: Probe, workdir: Path) -> Outcome:
    """Run one probe; an exception escaping the probe is itself a finding (crash)."""
    try:
        return p.run(workdir)
    except Exception as exc:  # noqa: BLE001
        return Outcome("crash", f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=6)}")


def named(exc: BaseException, *needles: str) -> Outcome:
    """A FlannelError that names every needle is clear; any other exception, or one missing a needle, is not."""
    text = str(exc)
    if not isinstance(exc, FlannelError):
        return Outcome("unclear", f"not a named error: {type(exc).__name__}: {text}")
    missing = [n for n in needles if n not in text]
    if missing:
        return Outcome("unclear", f"{type(exc).__name__} does not name {missing}: {text}")
    return Outcome("clear", f"{type(exc).__name__}: {text[:300]}")


def expect_error(action: Callable[[], object], *needles: str) -> Outcome:
    try:
        action()
    except Exception as exc:  # noqa: BLE001
        return named(exc, *needles)
    return Outcome("silent", "accepted without an error")


# --- a good artifact, trained once per process ---------------------------------------------------------

_GOOD: dict[str, object] = {}


def good_store() -> tuple[Path, Path, dict[str, bytes]]:
    """(store root, the artifact's path, the reference: digests, losses, batch starts, live mask as bytes)."""
    if not _GOOD:
        root = Path(tempfile.mkdtemp(prefix="flannel-faults-good-"))
        got = RunStore(root / "artifacts").obtain(CFG)
        traj = got.trajectory
        _GOOD.update(root=root / "artifacts", path=traj.path, ref=_reference(traj))
        other = RunStore(root / "artifacts").obtain(CFG.with_train_seed(43)).trajectory
        _GOOD["other"] = other.path
        traj.close()
        other.close()
    return _GOOD["root"], _GOOD["path"], _GOOD["ref"]  # type: ignore[return-value]


def _reference(traj: RunFile) -> dict[str, bytes]:
    return {
        "digests": bytes(traj.digests.numpy()),
        "losses": traj.losses.numpy().tobytes(),
        "batch_starts": traj.reader.read("batch_starts").numpy().tobytes(),
        "live_mask": traj.live_mask.numpy().tobytes(),
        "W": traj.reader.read("W").view(torch.uint16).numpy().tobytes(),
        "config": traj.config.fingerprint().encode(),
    }


def copy_store(workdir: Path) -> tuple[Path, Path]:
    root, path, _ = good_store()
    dest = workdir / "artifacts"
    shutil.copytree(root, dest)
    return dest, dest / path.name


def _quiet(fn: Callable[[], int]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = fn()
    return code, out.getvalue(), err.getvalue()


def artifact_fault(
    mutate: Callable[[Path], None], *, harmless: bool = False, valid_other: bool = False
) -> Callable[[Path], Outcome]:
    """A probe that damages the stored artifact with `mutate`, then checks three things:

    1. reading it: RunFile raises a named ArtifactError or `verify()` lists the problem (a file that
       reads and verifies must hold the reference's bytes: else silent);
    2. the command line: `verify` exits 1 and `digests` exits 3 naming the file, no traceback;
    3. the store: it sets the file aside and trains the run again, bitwise equal to the reference
       (or, for a `harmless` change, reuses it).

    `valid_other`: the file is a sound artifact of another run; only the store must not take it.
    """

    def run(workdir: Path) -> Outcome:
        _, _, ref = good_store()
        root, path = copy_store(workdir)
        mutate(path)
        detected = ""
        try:
            traj = RunFile(path)
        except FlannelError as exc:
            if str(path) not in str(exc):
                return Outcome("unclear", f"ArtifactError does not name the file: {exc}")
            detected = str(exc)
        except Exception as exc:  # noqa: BLE001
            return Outcome("unclear", f"reading it: {type(exc).__name__}: {exc}")
        else:
            try:
                problems = traj.verify()
                if problems:
                    detected = "; ".join(problems)
                elif not valid_other:
                    if _reference(traj) != ref:
                        return Outcome("silent", "the damaged file reads and verifies, and its contents differ")
                    if not harmless:
                        return Outcome("silent", "the damaged file reads and verifies as the original")
            except FlannelError as exc:
                detected = str(exc)
            except Exception as exc:  # noqa: BLE001
                return Outcome("unclear", f"verify(): {type(exc).__name__}: {exc}")
            finally:
                traj.close()
        if detected:
            code, out, err = _quiet(lambda: cli.main(["verify", str(path)]))
            if code != cli.EXIT_NEGATIVE or "FAILED" not in out:
                return Outcome("unclear", f"flannel-repro verify exited {code}: {out} {err}")
            code, out, err = _quiet(lambda: cli.main(["digests", str(path)]))
            if code != cli.EXIT_INPUT or str(path) not in err or "Traceback" in err:
                return Outcome("unclear", f"flannel-repro digests exited {code}: {err[:300]}")
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                got = RunStore(root).obtain(CFG)
            except Exception as exc:  # noqa: BLE001
                return (
                    named(exc, str(path))
                    if isinstance(exc, FlannelError)
                    else Outcome("crash", f"the store: {type(exc).__name__}: {exc}")
                )
        if _reference(got.trajectory) != ref or got.trajectory.verify():
            return Outcome("silent", "the store returned a run that is not the reference")
        got.trajectory.close()
        if detected or valid_other:
            if not got.trained:
                return Outcome("silent", "the store reused the damaged file")
            return Outcome(
                "clear", f"detected ({detected[:200] or 'another run under this name'}); retrained, bitwise equal"
            )
        return Outcome("fine", f"harmless; the store {'reused' if not got.trained else 'retrained'} it, bitwise equal")

    return run


# --- byte-level helpers --------------------------------------------------------------------------------


def _header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def rewrite_header(edit: Callable[[dict], object]) -> Callable[[Path], None]:
    """Parse the header, let `edit` change it in place (or return a replacement), write it back
    (its length may change: offsets are relative to the data)."""

    def mutate(path: Path) -> None:
        header, data = _header(path)
        new = edit(header)
        body = json.dumps(header if new is None else new).encode()
        body += b" " * ((-(8 + len(body))) % 8)
        path.write_bytes(struct.pack("<Q", len(body)) + body + data)

    return mutate


def edit_meta(key: str, fn: Callable[[str | None], str | None]) -> Callable[[Path], None]:
    def edit(header: dict) -> None:
        meta = header["__metadata__"]
        value = fn(meta.get(key))
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value

    return rewrite_header(edit)


def edit_config(**changes: object) -> Callable[[Path], None]:
    def fn(text: str | None) -> str:
        cfg = json.loads(text or "{}")
        cfg.update(changes)
        return json.dumps(cfg, sort_keys=True)

    return edit_meta("config", fn)


def flip_bit(tensor: str, where: float, bit: int = 0) -> Callable[[Path], None]:
    """Flip one bit of `tensor`'s data at relative position `where` (0 = first byte, 1 = last)."""

    def mutate(path: Path) -> None:
        header, _ = _header(path)
        n = struct.unpack("<Q", path.read_bytes()[:8])[0]
        begin, end = header[tensor]["data_offsets"]
        at = 8 + n + begin + min(int(where * (end - begin)), end - begin - 1)
        with open(path, "r+b") as f:
            f.seek(at)
            byte = f.read(1)[0]
            f.seek(at)
            f.write(bytes([byte ^ (1 << bit)]))

    return mutate


def set_field(tensor: str, **changes: object) -> Callable[[Path], None]:
    def edit(header: dict) -> None:
        header[tensor].update(changes)

    return rewrite_header(edit)


def truncate_to(size_of: Callable[[int, int], int]) -> Callable[[Path], None]:
    """Truncate to size_of(file size, header length)."""

    def mutate(path: Path) -> None:
        n = struct.unpack("<Q", path.read_bytes()[:8])[0]
        os.truncate(path, size_of(path.stat().st_size, n))

    return mutate


def write_length(value: Callable[[int], int]) -> Callable[[Path], None]:
    def mutate(path: Path) -> None:
        with open(path, "r+b") as f:
            f.write(struct.pack("<Q", value(path.stat().st_size)))

    return mutate


def _replace_with(payload: Callable[[Path], bytes]) -> Callable[[Path], None]:
    def mutate(path: Path) -> None:
        data = payload(path)
        path.write_bytes(data)

    return mutate


def _to_directory(path: Path) -> None:
    path.unlink()
    path.mkdir()
    (path / "inside").write_text("x")


def _to_dangling_link(path: Path) -> None:
    path.unlink()
    path.symlink_to(path.with_name("nowhere.safetensors"))


def _other_run(path: Path) -> None:
    shutil.copyfile(_GOOD["other"], path)  # type: ignore[arg-type]


def _touch(path: Path) -> None:
    os.utime(path, (time.time() + 5, time.time() + 5))


def _read_only(path: Path) -> None:
    path.chmod(0o444)


def _leftover(suffix: str, age_s: float = 3600) -> Callable[[Path], None]:
    def mutate(path: Path) -> None:
        extra = path.with_name(path.name + suffix)
        extra.write_bytes(b"\0" * 64)
        os.utime(extra, (time.time() - age_s, time.time() - age_s))

    return mutate


def _swap_offsets(a: str, b: str) -> Callable[[Path], None]:
    def edit(header: dict) -> None:
        header[a]["data_offsets"], header[b]["data_offsets"] = header[b]["data_offsets"], header[a]["data_offsets"]

    return rewrite_header(edit)


def _swap_W_rows(i: int, j: int) -> Callable[[Path], None]:
    def mutate(path: Path) -> None:
        header, _ = _header(path)
        n = struct.unpack("<Q", path.read_bytes()[:8])[0]
        begin, end = header["W"]["data_offsets"]
        row = (end - begin) // header["W"]["shape"][0]
        raw = bytearray(path.read_bytes())
        a, b = 8 + n + begin + i * row, 8 + n + begin + j * row
        raw[a : a + row], raw[b : b + row] = raw[b : b + row], raw[a : a + row]
        path.write_bytes(bytes(raw))

    return mutate


def _rename_tensor(old: str, new: str) -> Callable[[Path], None]:
    def edit(header: dict) -> None:
        header[new] = header.pop(old)

    return rewrite_header(edit)


def _extra_tensor(header: dict) -> None:
    begin, _ = header["live_mask"]["data_offsets"]
    header["extra"] = {"dtype": "U8", "shape": [1], "data_offsets": [begin, begin + 1]}


def _shape_times(tensor: str, transform: Callable[[list[int]], list[int]]) -> Callable[[Path], None]:
    def edit(header: dict) -> None:
        header[tensor]["shape"] = transform(header[tensor]["shape"])

    return rewrite_header(edit)


def _meta_value(key: str, value: object) -> Callable[[Path], None]:
    def edit(header: dict) -> None:
        header["__metadata__"][key] = value

    return rewrite_header(edit)


def _material(**changes: object) -> Callable[[str | None], str]:
    def fn(text: str | None) -> str:
        m = json.loads(text or "{}")
        m.update(changes)
        return json.dumps(m, sort_keys=True)

    return fn


_STRUCTURAL: list[tuple[str, Callable[[Path], None], dict]] = [
    ("empty file", _replace_with(lambda p: b""), {}),
    ("7 bytes, shorter than the length field", truncate_to(lambda size, n: 7), {}),
    ("length field 0 (what a partial file holds)", write_length(lambda size: 0), {}),
    ("length field beyond the end of the file", write_length(lambda size: size), {}),
    ("length field 2**63", write_length(lambda size: 2**63), {}),
    ("truncated inside the header", truncate_to(lambda size, n: 8 + n // 2), {}),
    ("truncated inside the data", truncate_to(lambda size, n: size - (size - 8 - n) // 3), {}),
    ("one byte short", truncate_to(lambda size, n: size - 1), {}),
    ("trailing bytes appended", lambda p: p.write_bytes(p.read_bytes() + b"\0" * 100), {}),
    ("header bytes not JSON", lambda p: p.write_bytes(p.read_bytes()[:8] + b"x" * 40 + p.read_bytes()[48:]), {}),
    ("header is a JSON list", rewrite_header(lambda h: [h]), {}),
    ("tensor offsets past the end", set_field("losses", data_offsets=[0, 10**12]), {}),
    (
        "two tensors overlap",
        rewrite_header(
            lambda h: h["losses"].update(
                data_offsets=[h["W"]["data_offsets"][0], h["W"]["data_offsets"][0] + 4 * h["losses"]["shape"][0]]
            )
        ),
        {},
    ),
    ("unknown dtype", set_field("W", dtype="Q8"), {}),
    ("shape disagrees with the offsets", _shape_times("losses", lambda s: [s[0] + 1]), {}),
    ("__metadata__ not an object", rewrite_header(lambda h: h.__setitem__("__metadata__", 5)), {}),
    ("a metadata value that is not a string", _meta_value("repeat", 0), {}),
    ("random bytes", _replace_with(lambda p: random.Random(7).randbytes(p.stat().st_size)), {}),
    ("not a safetensors file (text)", _replace_with(lambda p: b"hello, this is not an artifact\n"), {}),
    ("a directory at the run's path", _to_directory, {}),
    ("a dangling symlink at the run's path", _to_dangling_link, {}),
    ("metadata format changed", edit_meta("format", lambda v: "flannel-repro/run/0"), {}),
]

_CONTENT: list[tuple[str, Callable[[Path], None], dict]] = [
    ("a bit of W flipped at step 0", flip_bit("W", 0.0), {}),
    ("a bit of W flipped mid-run", flip_bit("W", 0.5, 3), {}),
    ("a bit of W flipped at the last step", flip_bit("W", 0.999, 6), {}),
    ("a loss flipped", flip_bit("losses", 0.9, 2), {}),
    ("a batch start flipped", flip_bit("batch_starts", 0.5, 1), {}),
    ("a live-mask entry flipped", flip_bit("live_mask", 0.5, 0), {}),
    ("a stored digest flipped", flip_bit("digests", 0.6, 4), {}),
    ("config: lr edited", edit_config(lr=0.002), {}),
    ("config: steps edited", edit_config(steps=5), {}),
    ("config: a seed edited", edit_config(data_seed=7), {}),
    ("config deleted", edit_meta("config", lambda v: None), {}),
    ("config not JSON", edit_meta("config", lambda v: "{not json"), {}),
    ("config a JSON list", edit_meta("config", lambda v: "[1, 2]"), {}),
    ("config with an unknown field", edit_config(colour="blue"), {}),
    ("config with a wrong type", edit_config(steps="four"), {}),
    ("run_key edited", edit_meta("run_key", lambda v: "0" * 20), {}),
    ("run-key material deleted", edit_meta("run_key_material", lambda v: None), {}),
    ("run-key material edited (threads)", edit_meta("run_key_material", _material(threads=9)), {}),
    ("run-key material not JSON", edit_meta("run_key_material", lambda v: "{"), {}),
    ("data description: n_live edited", edit_meta("data", lambda v: json.dumps({**json.loads(v), "n_live": 1})), {}),
    ("data description deleted", edit_meta("data", lambda v: None), {}),
    ("environment not JSON", edit_meta("env", lambda v: "{"), {}),
    (
        "environment: numerics class edited",
        edit_meta("env", lambda v: json.dumps({**json.loads(v), "numerics": {"class": "cpu-amx-mklamx-t1"}})),
        {},
    ),
    ("wall time edited", edit_meta("wall_time_s", lambda v: "0.001"), {}),
    ("repeat index edited", edit_meta("repeat", lambda v: "3"), {}),
    ("checksums deleted", edit_meta("checksums", lambda v: None), {}),
    ("checksums edited", edit_meta("checksums", lambda v: json.dumps({k: "0" * 64 for k in json.loads(v)})), {}),
    ("checksums not JSON", edit_meta("checksums", lambda v: "["), {}),
    ("W dtype BF16 -> F16", set_field("W", dtype="F16"), {}),
    ("W shape transposed", _shape_times("W", lambda s: [s[0], s[2], s[1]]), {}),
    ("live_mask dtype BOOL -> U8", set_field("live_mask", dtype="U8"), {}),
    ("digests dtype U8 -> I8", set_field("digests", dtype="I8"), {}),
    ("losses dtype F32 -> I32", set_field("losses", dtype="I32"), {}),
    ("losses reshaped (1, S+1)", _shape_times("losses", lambda s: [1, s[0]]), {}),
    ("a tensor renamed", _rename_tensor("losses", "lossez"), {}),
    ("two steps of W swapped", _swap_W_rows(1, 2), {}),
    ("the offsets of two tensors swapped", _swap_offsets("losses", "live_mask"), {}),
    ("an extra tensor added", rewrite_header(_extra_tensor), {}),
]

_BESIDE: list[tuple[str, Callable[[Path], None], dict]] = [
    ("another run's artifact under this run's name", _other_run, {"valid_other": True}),
    ("modification time changed", _touch, {"harmless": True}),
    ("made read-only", _read_only, {"harmless": True}),
    ("a stale partial file beside it", _leftover(".partial-999999999-0badf00d"), {"harmless": True}),
    ("a lock file left by a killed process", _leftover(".lock"), {"harmless": True}),
    ("a progress file left by a killed worker", _leftover(".progress"), {"harmless": True}),
]

for _group, _items in (
    ("artifact structure", _STRUCTURAL),
    ("artifact contents", _CONTENT),
    ("beside the artifact", _BESIDE),
):
    for _name, _mutate, _kw in _items:
        PROBES.append(Probe(_group, _name, artifact_fault(_mutate, **_kw)))


# --- data ------------------------------------------------------------------------------------------------


def _tiny_files(workdir: Path) -> tuple[Path, Path, Path]:
    paths = embedded_paths("tiny")
    tok, corpus, mask = workdir / "tok.json", workdir / "corpus.txt", workdir / "mask.safetensors"
    shutil.copyfile(paths.tokenizer, tok)
    shutil.copyfile(paths.corpus, corpus)
    shutil.copyfile(paths.token_mask, mask)
    return tok, corpus, mask


def data_fault(
    setup: Callable[[Path, Path, Path], None], *needles: str, mask: bool = True, cfg_changes: dict | None = None
) -> Callable[[Path], Outcome]:
    """Damage a copy of the tiny data's files with `setup(tokenizer, corpus, mask)`; loading must be a
    named error that names every needle (`{tok}`, `{corpus}`, `{mask}` stand for the files' paths)."""

    def run(workdir: Path) -> Outcome:
        tok, corpus, mask_path = _tiny_files(workdir)
        setup(tok, corpus, mask_path)
        cfg = CFG.replace(
            tokenizer_path=str(tok),
            corpus_path=str(corpus),
            token_mask_path=str(mask_path) if mask else None,
            **(cfg_changes or {}),
        )
        names = [n.format(tok=tok, corpus=corpus, mask=mask_path) for n in needles]
        return expect_error(lambda: RunStore(workdir / "artifacts").obtain(cfg), *names)

    return run


def _write(text: str | bytes) -> Callable[[Path], None]:
    return lambda p: p.write_bytes(text if isinstance(text, bytes) else text.encode())


def _insert_char(ch: str, at: int) -> Callable[[Path], None]:
    def mutate(p: Path) -> None:
        text = p.read_text(encoding="utf-8")
        p.write_text(text[:at] + ch + text[at:], encoding="utf-8")

    return mutate


def _mask_edit(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[Path], None]:
    def mutate(p: Path) -> None:
        live = load_token_mask(p, 512).live_mask.clone()
        save_token_mask(compute_token_mask(fn(live).nonzero().flatten(), 512), p)

    return mutate


def _mask_raw(tensors: Callable[[dict], dict]) -> Callable[[Path], None]:
    def mutate(p: Path) -> None:
        from safetensors.torch import load_file, save_file

        save_file(tensors(load_file(str(p))), str(p))

    return mutate


def _drop_live(live: torch.Tensor) -> torch.Tensor:
    live[int(live.nonzero()[0])] = False
    return live


def _tokenizer_vocab(size: int) -> Callable[[Path], None]:
    def mutate(p: Path) -> None:
        spec = json.loads(p.read_text())
        vocab = spec["model"]["vocab"]
        spec["model"]["vocab"] = {k: v for k, v in vocab.items() if v < size}
        p.write_text(json.dumps(spec))

    return mutate


_DATA: list[tuple[str, Callable[[Path], Outcome]]] = [
    ("tokenizer file missing", data_fault(lambda t, c, m: t.unlink(), "{tok}", "does not exist")),
    ("tokenizer path is a directory", data_fault(lambda t, c, m: (t.unlink(), t.mkdir()), "{tok}", "directory")),
    ("tokenizer not JSON", data_fault(lambda t, c, m: _write("{nope")(t), "{tok}")),
    ("tokenizer JSON but not a tokenizer", data_fault(lambda t, c, m: _write('{"a": 1}')(t), "{tok}")),
    (
        "tokenizer vocabulary smaller than vocab_size",
        data_fault(lambda t, c, m: _tokenizer_vocab(300)(t), "{tok}", "512"),
    ),
    ("corpus missing", data_fault(lambda t, c, m: c.unlink(), "{corpus}", "does not exist")),
    ("corpus empty", data_fault(lambda t, c, m: _write("")(c), "{corpus}", "empty")),
    (
        "corpus not UTF-8",
        data_fault(lambda t, c, m: _write(b"abc\xff\xfedef" * 100)(c), "{corpus}", "UTF-8", "offset 3"),
    ),
    (
        "corpus with a character the tokenizer lacks",
        data_fault(lambda t, c, m: _insert_char("\u2603", 100)(c), "{corpus}", "unknown token", "character 100"),
    ),
    ("corpus shorter than one example", data_fault(lambda t, c, m: _write("the cat")(c), "{corpus}", mask=False)),
    ("corpus binary zeros", data_fault(lambda t, c, m: _write(b"\0" * 4000)(c), "{corpus}", mask=False)),
    ("token mask missing", data_fault(lambda t, c, m: m.unlink(), "{mask}", "does not exist")),
    ("token mask not safetensors", data_fault(lambda t, c, m: _write("not a mask")(m), "{mask}")),
    (
        "token mask of another vocabulary size",
        data_fault(
            lambda t, c, m: _mask_raw(lambda d: {k: v[:300] if v.numel() == 512 else v[v < 300] for k, v in d.items()})(
                m
            ),
            "{mask}",
        ),
    ),
    (
        "token mask self-consistent but not this corpus's",
        data_fault(lambda t, c, m: _mask_edit(_drop_live)(m), "{mask}", "{corpus}", "does not match"),
    ),
    (
        "token mask keys disagree (dead != not live)",
        data_fault(lambda t, c, m: _mask_raw(lambda d: {**d, "dead_mask": d["live_mask"].clone()})(m), "{mask}"),
    ),
    (
        "token mask without its keys",
        data_fault(lambda t, c, m: _mask_raw(lambda d: {"x": torch.zeros(1)})(m), "{mask}"),
    ),
    (
        "vocab_size larger than the tokenizer's",
        data_fault(lambda t, c, m: None, "{tok}", "vocab_size", mask=False, cfg_changes={"vocab_size": 600}),
    ),
]
for _name, _run in _DATA:
    PROBES.append(Probe("data", _name, _run))


@probe("data", "token cache entry with a flipped bit")
def _token_cache_flip(workdir: Path) -> Outcome:
    return _token_cache(workdir, lambda raw: raw[:-5] + bytes([raw[-5] ^ 1]) + raw[-4:])


@probe("data", "token cache entry truncated")
def _token_cache_short(workdir: Path) -> Outcome:
    return _token_cache(workdir, lambda raw: raw[: len(raw) // 2])


@probe("data", "token cache folder not writable (a file in its place)")
def _token_cache_blocked(workdir: Path) -> Outcome:
    import warnings

    cache = workdir / "cache"
    cache.mkdir()
    with _env(FLANNEL_REPRO_CACHE=str(cache)):
        (cache / "tokens").write_text("blocked")
        load_data.__globals__["_LOADED"].clear()
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            data = load_data(CFG)
        ref = _reference_ids()
    if not torch.equal(data.ids, ref):
        return Outcome("silent", "other token ids")
    if not any("could not cache" in str(w.message) for w in seen):
        return Outcome("unclear", "no warning that the cache could not be written")
    return Outcome("fine", "loaded with a warning; ids equal")


def _reference_ids() -> torch.Tensor:
    from flannel_repro.data.files import load_corpus_text, load_tokenizer, tokenize

    paths = embedded_paths("tiny")
    return torch.from_numpy(
        tokenize(load_tokenizer(paths.tokenizer, 512), load_corpus_text(paths.corpus), vocab_size=512)
    ).to(torch.long)


def _token_cache(workdir: Path, damage: Callable[[bytes], bytes]) -> Outcome:
    cache = workdir / "cache"
    with _env(FLANNEL_REPRO_CACHE=str(cache)):
        load_data.__globals__["_LOADED"].clear()
        load_data(CFG)
        (entry,) = (cache / "tokens").glob("*.ids")
        entry.write_bytes(damage(entry.read_bytes()))
        load_data.__globals__["_LOADED"].clear()
        data = load_data(CFG)
        if not torch.equal(data.ids.to(torch.long), _reference_ids()):
            return Outcome("silent", "the damaged cache entry was used")
    return Outcome("fine", "the damaged entry was rebuilt; ids equal")


@contextlib.contextmanager
def _env(**values: str):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        load_data.__globals__["_LOADED"].clear()


_CONFIGS: list[tuple[str, str, tuple[str, ...]]] = [
    ("config file: TOML syntax error", "steps = = 3\n", ("exp.toml",)),
    ("config file: not UTF-8", "steps = 3 # \udcff\n", ("exp.toml",)),
    ("config file: unknown key", "stepz = 3\n", ("exp.toml", "stepz")),
    ("config file: wrong type", 'steps = "ten"\n', ("exp.toml", "steps")),
    ("config file: lr = nan", "lr = nan\n", ("exp.toml", "lr")),
    ("config file: steps = 0", "steps = 0\n", ("exp.toml", "steps")),
    ("config file: threads = 100000", "threads = 100000\n", ("exp.toml", "threads", "256")),
    ("config file: unknown preset", 'preset = "huge"\n', ("exp.toml", "preset")),
    ("config file: unknown choice", 'engine = "jax"\n', ("exp.toml", "engine", "jax")),
    ("config file: [experiment] n_runs = 0", "[experiment]\nn_runs = 0\n", ("exp.toml", "n_runs")),
    (
        "config file: seeds running past int64",
        "[experiment]\nbase_train_seed = 9223372036854775807\nn_runs = 3\n",
        ("exp.toml", "seed"),
    ),
    ("config file: [run] and top level both set a field", "steps = 3\n[run]\nsteps = 4\n", ("exp.toml", "steps")),
]
for _name, _text, _needles in _CONFIGS:

    def _config_probe(workdir: Path, text: str = _text, needles: tuple[str, ...] = _needles) -> Outcome:
        path = workdir / "exp.toml"
        path.write_bytes(text.encode("utf-8", "surrogateescape"))
        return expect_error(lambda: ExperimentConfig.from_toml(path).run.replace(), *needles)

    PROBES.append(Probe("config", _name, _config_probe))


# --- options of a pytest session (a real session in a subprocess) ---------------------------------------

_OPTIONS: list[tuple[str, list[str], str]] = [
    ("--flannel-threads=0", ["--flannel-threads=0"], "accepts an integer in 1..256; got '0'"),
    ("--flannel-threads=100000", ["--flannel-threads=100000"], "accepts an integer in 1..256; got '100000'"),
    ("--flannel-threads=many", ["--flannel-threads=many"], "accepts an integer in 1..256; got 'many'"),
    ("--flannel-devices=tpu", ["--flannel-devices=tpu"], "got 'tpu'"),
    ("--flannel-devices=cuda:x", ["--flannel-devices=cuda:x"], "got 'cuda:x'"),
    ("--flannel-devices=cpu:1", ["--flannel-devices=cpu:1"], "got 'cpu:1'"),
    ("--flannel-devices=cpu,cpu", ["--flannel-devices=cpu,cpu"], "got 'cpu,cpu'"),
    ("--flannel-devices=,", ["--flannel-devices=,"], "got ','"),
    ("--flannel-progress=nan", ["--flannel-progress=nan"], "accepts a number of seconds >= 0; got 'nan'"),
    ("--flannel-progress=-1", ["--flannel-progress=-1"], "accepts a number of seconds >= 0; got '-1'"),
    ("--flannel-seeds=2**63", ["--flannel-seeds=9223372036854775808"], "--flannel-seeds"),
    ("--flannel-seeds=42-4200000000", ["--flannel-seeds=42-4200000000"], "--flannel-seeds"),
    ("--flannel-seeds=50-42", ["--flannel-seeds=50-42"], "--flannel-seeds"),
    ("--flannel-seeds=abc", ["--flannel-seeds=abc"], "--flannel-seeds"),
    ("--flannel-steps=0", ["--flannel-steps=0"], "accepts an integer >= 1; got '0'"),
    ("--flannel-engine=jax", ["--flannel-engine=jax"], "got 'jax'"),
    ("--flannel-preset=huge", ["--flannel-preset=huge"], "got 'huge'"),
    ("--flannel-config=missing.toml", ["--flannel-config=missing.toml"], "missing.toml"),
    ("--flannel-tokenizer without a corpus", ["--flannel-tokenizer=tok.json"], "--flannel-tokenizer"),
    ("--flannel-numerics=fast", ["--flannel-numerics=fast"], "--flannel-numerics"),
    ("--flannel-missing-class=maybe", ["--flannel-missing-class=maybe"], "got 'maybe'"),
    ("--flannel-noise-bands=absent.json", ["--flannel-noise-bands=absent.json"], "absent.json"),
    ("--flannel-rtol=nan", ["--flannel-rtol=nan"], "--flannel-rtol"),
    ("--flannel-artifacts under a file", ["--flannel-artifacts=afile.txt/runs"], "lies under a file"),
    ("--flannel-artifacts not writable (/sys)", ["--flannel-artifacts=/sys/flannel-runs"], "is not writable"),
]

_SESSION_TEST = "def test_nothing():\n    pass\n"


def option_fault(args: list[str], needle: str) -> Callable[[Path], Outcome]:
    def run(workdir: Path) -> Outcome:
        (workdir / "test_x.py").write_text(_SESSION_TEST)
        (workdir / "afile.txt").write_text("a file")
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", *args],
            cwd=workdir,
            capture_output=True,
            text=True,
            timeout=300,
            env={k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")},
        )
        text = done.stdout + done.stderr
        if "Traceback" in text:
            return Outcome("crash", text[-600:])
        if done.returncode != 4:
            kind = "silent" if done.returncode == 0 else "unclear"
            return Outcome(kind, f"pytest exited {done.returncode}, not 4 (usage error): {text[-300:]}")
        if needle not in text:
            return Outcome("unclear", f"the usage error does not say {needle!r}: {text[-300:]}")
        return Outcome("clear", next((line for line in text.splitlines() if needle in line), needle)[:300])

    return run


for _name, _args, _needle in _OPTIONS:
    PROBES.append(Probe("pytest option", _name, option_fault(_args, _needle)))


# --- the command line ------------------------------------------------------------------------------------


def cli_fault(args: Callable[[Path], list[str]], code: int, needle: str) -> Callable[[Path], Outcome]:
    def run(workdir: Path) -> Outcome:
        argv = args(workdir)
        try:
            got, out, err = _quiet(lambda: cli.main(argv))
        except SystemExit as exc:  # argparse's usage errors
            got, err = int(exc.code or 0), ""
        except Exception as exc:  # noqa: BLE001
            return Outcome("crash", f"{type(exc).__name__}: {exc}")
        if got != code:
            return Outcome("unclear" if got else "silent", f"exit {got}, expected {code}: {err[-300:]}")
        if code == cli.EXIT_INPUT and needle.format(w=workdir) not in err:
            return Outcome("unclear", f"stderr does not say {needle!r}: {err[-300:]}")
        return Outcome("clear", (err.strip() or f"usage error, exit {got}")[:300])

    return run


def _good_path(workdir: Path) -> str:
    return str(copy_store(workdir)[1])


def _chain(workdir: Path, text: str) -> str:
    p = workdir / "chain.json"
    p.write_text(text)
    return str(p)


_CLI: list[tuple[str, Callable[[Path], list[str]], int, str]] = [
    ("info: a missing file", lambda w: ["info", str(w / "absent.safetensors")], 3, "absent.safetensors"),
    ("info: a directory", lambda w: ["info", str(w)], 3, "{w}"),
    ("info: a text file", lambda w: ["info", _chain(w, "hello")], 3, "chain.json"),
    (
        "digests --compare: a missing chain",
        lambda w: ["digests", _good_path(w), "--compare", str(w / "c.json")],
        3,
        "c.json",
    ),
    (
        "digests --compare: a chain that is not JSON",
        lambda w: ["digests", _good_path(w), "--compare", _chain(w, "{")],
        3,
        "chain.json",
    ),
    (
        "digests --compare: a chain of another shape",
        lambda w: ["digests", _good_path(w), "--compare", _chain(w, '{"digests": 5}')],
        3,
        "chain.json",
    ),
    ("divergence: one run", lambda w: ["divergence", _good_path(w)], 3, "at least 2 runs"),
    (
        "export-notebook: into a missing folder",
        lambda w: ["export-notebook", _good_path(w), "-o", str(w / "no" / "nb.safetensors")],
        3,
        "nb.safetensors",
    ),
    ("numerics --threads 0", lambda w: ["numerics", "--threads", "0"], 2, ""),
    ("noise --margin nan", lambda w: ["noise", "--margin", "nan"], 2, ""),
    ("prune: a missing directory", lambda w: ["prune", "--artifacts", str(w / "none")], 3, "none"),
    ("bounds: a missing config", lambda w: ["bounds", "--config", str(w / "exp.toml")], 3, "exp.toml"),
    ("an unknown command", lambda w: ["frobnicate"], 2, ""),
]
for _name, _args, _code, _needle in _CLI:
    PROBES.append(Probe("command line", _name, cli_fault(_args, _code, _needle)))


# --- processes, disks, concurrency -----------------------------------------------------------------------

_CHILD = """
import signal, sys
from pathlib import Path
# Ctrl-C as in a terminal: a test process may ignore SIGINT, and an ignored signal stays ignored across exec
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.path.insert(0, {repo!r})
from tests.faults.probes import CFG
from flannel_repro.runs.store import RunStore
print("START", flush=True)
RunStore(Path(sys.argv[1])).obtain(CFG.replace(steps=int(sys.argv[2])))
print("DONE", flush=True)
"""


def child(root: Path, steps: int, **popen: object) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", _CHILD.format(repo=str(REPO)), str(root), str(steps)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )  # type: ignore[call-overload]


def _artifacts_read_as_whole_wrongly(root: Path, ref_digests: bytes | None) -> list[str]:
    """Files under `root` that read as a complete artifact but are not the whole, right run."""
    wrong = []
    for p in root.iterdir():
        if p.name.endswith((".lock", ".progress", ".log", ".TAG", ".gitignore")) or p.name in (
            "CACHEDIR.TAG",
            ".gitignore",
        ):
            continue
        try:
            traj = RunFile(p)
        except FlannelError:
            continue  # refused: fine
        try:
            if traj.verify() or (ref_digests is not None and bytes(traj.digests.numpy()) != ref_digests):
                wrong.append(p.name)
        finally:
            traj.close()
    return wrong


def kill_trials(workdir: Path, trials: int, steps: int = 30, seed: int = 0) -> dict[str, object]:
    """kill -9 a training subprocess at `trials` random moments; after each, no file may read as a
    whole artifact unless it is the whole, right run, and at the end the next session trains (or
    reuses) the run bitwise equal to an uninterrupted one."""
    rng = random.Random(seed)
    ref_root = workdir / "reference"
    ref = child(ref_root, steps)
    ref.stdout.readline()  # "START": imports done; from here on the child loads data, builds the model, trains
    t0 = time.perf_counter()
    writing_from = None  # when the reference run's partial artifact appeared: W is written from then on
    while ref.poll() is None and time.perf_counter() - t0 < 600:
        if writing_from is None and ref_root.exists() and any(".partial-" in p.name for p in ref_root.iterdir()):
            writing_from = time.perf_counter() - t0
        time.sleep(0.02)
    out, err = ref.communicate(timeout=600)
    full = time.perf_counter() - t0
    writing_from = full / 2 if writing_from is None else writing_from
    if ref.returncode != 0:
        raise RuntimeError(f"the uninterrupted run failed: {err[-500:]}")
    (ref_path,) = ref_root.glob("*.safetensors")
    ref_digests = bytes(RunFile(ref_path).digests.numpy())
    root = workdir / "killed"
    moments, wrong, completed, mid_write = [], [], 0, 0
    seen_partials: set[str] = set()
    for _ in range(trials):
        existing = {p.name for p in root.glob("*.partial-*")} if root.exists() else set()
        proc = child(root, steps)
        proc.stdout.readline()  # "START": imports done
        # Half the kills land anywhere after the imports (set-up, the numerics probe, training); half while W is
        # written: once this trial's partial file exists, within the reference run's writing time.
        if rng.random() < 0.5:
            delay = rng.uniform(0.0, full)
            time.sleep(delay)
        else:
            t1 = time.perf_counter()
            while proc.poll() is None and time.perf_counter() - t1 < 600:
                if root.exists() and {p.name for p in root.glob("*.partial-*")} - existing:
                    break
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.4 * (full - writing_from)))
            delay = time.perf_counter() - t1
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        moments.append(round(delay, 2))
        before = {p.name for p in root.glob("*.partial-*")} if root.exists() else set()
        wrong += _artifacts_read_as_whole_wrongly(root, ref_digests) if root.exists() else []
        completed += bool(list(root.glob("*.safetensors")))
        mid_write += len(before - seen_partials)  # this kill left a new partial: it landed while W was being written
        seen_partials |= before
        for p in root.glob("*.safetensors"):  # a run that finished before the kill: start the next trial clean
            p.unlink()
    from flannel_repro.runs.store import clean_leftovers

    partials_before = len(list(root.glob("*.partial-*")))
    removed = clean_leftovers(root, older_than_s=0)
    final = RunStore(root).obtain(CFG.replace(steps=steps))
    equal = bytes(final.trajectory.digests.numpy()) == ref_digests and not final.trajectory.verify()
    return {
        "trials": trials,
        "moments_s": moments,
        "run_after_imports_s": round(full, 2),
        "writing_from_s": round(writing_from, 2),
        "read_as_whole_wrongly": wrong,
        "killed_while_writing": mid_write,
        "finished_before_kill": completed,
        "partials_left": partials_before,
        "removed": len(removed),
        "next_session_bitwise_equal": equal,
    }


@probe("process", "Ctrl-C (SIGINT) while training")
def _sigint(workdir: Path) -> Outcome:
    root = workdir / "artifacts"
    proc = child(root, 2000)  # about 20 s of training: the interrupt lands while the artifact is written
    proc.stdout.readline()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:  # interrupt once the partial file exists
        if root.exists() and any(".partial-" in p.name for p in root.iterdir()):
            break
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    if "DONE" in out and proc.returncode == 0:  # a published, whole run is no fault
        return Outcome("unclear", "the run finished before the interrupt; nothing was tested")
    left = (
        [p.name for p in root.iterdir() if ".partial-" in p.name or p.name.endswith(".safetensors")]
        if root.exists()
        else []
    )
    if left:
        return Outcome("silent", f"left behind: {left}")
    return Outcome("fine", "interrupted; nothing left behind")


@probe("process", "three sessions ask for the same run at once")
def _concurrent(workdir: Path) -> Outcome:
    root = workdir / "artifacts"
    procs = [child(root, 12) for _ in range(3)]
    outs = [p.communicate(timeout=600) for p in procs]
    if any(p.returncode for p in procs):
        return Outcome("crash", " | ".join(e[-300:] for _, e in outs))
    trained = (root / "training.log").read_text().splitlines()
    if len(trained) != 1:
        return Outcome("silent", f"trained {len(trained)} times")
    return Outcome("fine", "trained once, read by the other two")


@probe("disk", "a file-size limit below the artifact's size (ulimit -f: a real kernel limit)")
def _fsize(workdir: Path) -> Outcome:
    script = (
        "import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (65536, resource.RLIM_INFINITY));"
        f"sys.path.insert(0, {str(REPO)!r});"
        "from tests.faults.probes import CFG; from flannel_repro.runs.store import RunStore;"
        "from flannel_repro.errors import ArtifactError\n"
        "try:\n    RunStore(sys.argv[1]).obtain(CFG)\n"
        "except ArtifactError as e:\n    print(e); raise SystemExit(3)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(workdir / "artifacts")],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "FLANNEL_REPRO_CACHE": str(workdir / "cache")},
    )
    if done.returncode != 3:
        return Outcome("crash" if "Traceback" in done.stderr else "unclear", done.stderr[-400:])
    left = [
        p.name for p in (workdir / "artifacts").iterdir() if ".partial-" in p.name or p.name.endswith(".safetensors")
    ]
    if left:
        return Outcome("silent", f"left behind: {left}")
    return Outcome("clear", done.stdout.strip()[:300])


@probe("disk", "the disk fills while writing (ENOSPC from pwrite, simulated)")
def _enospc(workdir: Path) -> Outcome:
    import errno

    from flannel_repro.storage import writer

    real, calls = os.pwrite, {"n": 0}

    def filling(fd, data, offset):
        calls["n"] += 1
        if calls["n"] > 6:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    writer.os.pwrite = filling  # type: ignore[attr-defined]
    try:
        outcome = expect_error(lambda: RunStore(workdir / "artifacts").obtain(CFG), "out of space while writing", "MB")
    finally:
        writer.os.pwrite = real  # type: ignore[attr-defined]
    left = [
        p.name for p in (workdir / "artifacts").iterdir() if ".partial-" in p.name or p.name.endswith(".safetensors")
    ]
    return Outcome("silent", f"left behind: {left}") if left else outcome


@probe("disk", "a disk too small for the artifact (free space below its size, simulated)")
def _too_small(workdir: Path) -> Outcome:
    from collections import namedtuple

    from flannel_repro.storage import writer

    real = writer.shutil.disk_usage
    writer.shutil.disk_usage = lambda p: namedtuple("U", "total used free")(10**9, 10**9 - 1000, 1000)  # type: ignore[assignment]
    try:
        return expect_error(lambda: RunStore(workdir / "artifacts").obtain(CFG), "the artifact needs", "free")
    finally:
        writer.shutil.disk_usage = real  # type: ignore[assignment]


@probe("disk", "training.log cannot be appended")
def _log_blocked(workdir: Path) -> Outcome:
    import warnings

    root = workdir / "artifacts"
    root.mkdir()
    (root / "training.log").mkdir()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        got = RunStore(root).obtain(CFG)
    if got.trajectory.verify():
        return Outcome("silent", "the published run does not verify")
    if not any("could not append" in str(w.message) for w in seen):
        return Outcome("unclear", "no warning")
    return Outcome("fine", "the run is used; a warning says the record could not be written")


@probe("disk", "artifacts directory on a read-only file system (/sys)")
def _store_read_only(workdir: Path) -> Outcome:
    return expect_error(lambda: RunStore("/sys/flannel-artifacts").obtain(CFG), "/sys/flannel-artifacts")


@probe("disk", "artifacts directory is a file")
def _store_is_file(workdir: Path) -> Outcome:
    (workdir / "artifacts").write_text("a file")
    return expect_error(lambda: RunStore(workdir / "artifacts").obtain(CFG), str(workdir / "artifacts"))


def table(results: list[tuple[Probe, Outcome]]) -> str:
    groups: dict[str, dict[str, int]] = {}
    for p, o in results:
        row = groups.setdefault(p.group, dict.fromkeys(KINDS, 0))
        row[o.kind] += 1
    lines = [
        f"| {'group':<22} | probes | " + " | ".join(KINDS) + " |",
        "| --- | ---: | " + " | ".join("---:" for _ in KINDS) + " |",
    ]
    total = dict.fromkeys(KINDS, 0)
    for g, row in groups.items():
        lines.append(f"| {g:<22} | {sum(row.values()):>6} | " + " | ".join(f"{row[k]:>{len(k)}}" for k in KINDS) + " |")
        for k in KINDS:
            total[k] += row[k]
    lines.append(
        f"| {'all':<22} | {sum(total.values()):>6} | " + " | ".join(f"{total[k]:>{len(k)}}" for k in KINDS) + " |"
    )
    return "\n".join(lines)


# The second pass's probes (issue 22) live in their own modules and register into PROBES on import; they
# import this module's helpers, which are all defined by now.
from tests.faults import probes_checkpoints, probes_files, probes_side  # noqa: E402,F401
