"""Fault probes, second pass (issue 22): files. Registered into tests.faults.probes.PROBES on import."""

from __future__ import annotations

import contextlib
import os
import shutil
import struct
import threading
import warnings
from pathlib import Path
from typing import Callable

from flannel_repro.data import files as data_files
from flannel_repro.data.embedded import embedded_paths
from flannel_repro.errors import ArtifactWarning
from flannel_repro.runs.store import RunStore
from tests.faults.probes import (
    CFG,
    PROBES,
    Outcome,
    Probe,
    _env,
    _header,
    _quiet,
    _tiny_files,
    artifact_fault,
    cli,
    copy_store,
    edit_meta,
    good_store,
    load_data,
    named,
    probe,
)

HANG_S = 60.0  # an action still running after this long is a hang


def _bounded(action: Callable[[], object], fifos: tuple[Path, ...] = (), seconds: float = HANG_S) -> dict | None:
    """Run `action` in a thread: {"value": ...} or {"error": exc}; None when it still runs after `seconds` (a
    hang: the `fifos` are then opened from here, so a thread blocked opening one goes on and ends)."""
    box: dict = {}

    def target() -> None:
        try:
            box["value"] = action()
        except BaseException as exc:  # noqa: BLE001
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if not thread.is_alive():
        return box
    for fifo in fifos:
        with contextlib.suppress(OSError):
            os.close(os.open(fifo, os.O_RDWR | os.O_NONBLOCK))
    return None


def _expect_bounded(action: Callable[[], object], *needles: str, fifos: tuple[Path, ...] = ()) -> Outcome:
    box = _bounded(action, fifos)
    if box is None:
        return Outcome("hang", f"hung: still running after {HANG_S:.0f} s")
    if "error" in box:
        return named(box["error"], *needles)
    return Outcome("silent", "accepted without an error")


def _cli_bounded(argv: list[str], fifos: tuple[Path, ...] = ()) -> tuple[int, str, str] | Outcome:
    box = _bounded(lambda: _quiet(lambda: cli.main(argv)), fifos)
    if box is None:
        return Outcome("hang", f"hung: flannel-repro {' '.join(argv)} still running after {HANG_S:.0f} s")
    if "error" in box:
        return Outcome("crash", f"{type(box['error']).__name__}: {box['error']}")
    return box["value"]


def _outside(workdir: Path, data: bytes = b"a file outside the folder\n") -> Path:
    outside = workdir / "outside" / "precious.txt"
    outside.parent.mkdir()
    outside.write_bytes(data)
    return outside


def _kept(outcome: Outcome, outside: Path, data: bytes) -> Outcome:
    """`outcome`, unless the file outside the folder changed (silent)."""
    if not outside.is_file() or outside.is_symlink() or outside.read_bytes() != data:
        return Outcome("outside", f"{outside}, outside the folder, was written through the link")
    return outcome


def _run_name() -> str:
    return good_store()[1].name  # the run CFG gets in any store of this process (same key)


# --- links planted in the folders --------------------------------------------------------------------------


@probe("links", "training.log a link to a file outside the artifacts folder")
def _log_link(workdir: Path) -> Outcome:
    root = workdir / "artifacts"
    root.mkdir()
    data = b"a file outside the folder\n"
    outside = _outside(workdir, data)
    (root / "training.log").symlink_to(outside)
    outcome = _expect_bounded(lambda: RunStore(root).obtain(CFG), str(root / "training.log"), "symbolic link")
    return _kept(outcome, outside, data)


@probe("links", "training.log becomes a link while the run trains")
def _log_link_late(workdir: Path) -> Outcome:
    root = workdir / "artifacts"
    root.mkdir()
    data = b"a file outside the folder\n"
    outside = _outside(workdir, data)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        got = RunStore(root).obtain(CFG, on_train_start=lambda p: (root / "training.log").symlink_to(outside))
    problems = got.trajectory.verify()
    got.trajectory.close()
    if problems:
        return Outcome("silent", f"the published run does not verify: {problems}")
    said = [str(w.message) for w in seen if issubclass(w.category, ArtifactWarning)]
    if not any(str(root / "training.log") in s and "symbolic link" in s for s in said):
        return _kept(Outcome("unclear", f"no warning naming the link: {said}"), outside, data)
    return _kept(Outcome("fine", "the run is used; a warning says the log is a link, not followed"), outside, data)


@probe("links", "a run's lock file a link to itself (a loop)")
def _lock_loop(workdir: Path) -> Outcome:
    root = workdir / "artifacts"
    root.mkdir()
    lock = root / f"{_run_name()}.lock"
    lock.symlink_to(lock)
    return _expect_bounded(lambda: RunStore(root).obtain(CFG), str(lock), "symbolic link")


@probe("links", "a run's lock file a link to a file outside the artifacts folder")
def _lock_outside(workdir: Path) -> Outcome:
    root = workdir / "artifacts"
    root.mkdir()
    data = b"a file outside the folder\n"
    outside = _outside(workdir, data)
    lock = root / f"{_run_name()}.lock"
    lock.symlink_to(outside)
    return _kept(_expect_bounded(lambda: RunStore(root).obtain(CFG), str(lock), "symbolic link"), outside, data)


@probe("links", "the run's path a link to a sound artifact outside the folder")
def _run_link(workdir: Path) -> Outcome:
    root = workdir / "artifacts"
    root.mkdir()
    outside = workdir / "outside" / _run_name()
    outside.parent.mkdir()
    shutil.copyfile(good_store()[1], outside)
    data = outside.read_bytes()
    (root / _run_name()).symlink_to(outside)
    return _kept(
        _expect_bounded(lambda: RunStore(root).obtain(CFG), str(root / _run_name()), "symbolic link"), outside, data
    )


def _report(workdir: Path, *argv: str) -> tuple[int, str, str] | Outcome:
    root, _ = copy_store(workdir)
    return _cli_bounded(["report", str(root), "-o", str(workdir / "report"), *argv])


_REPORT_FILES = ("index.html", "report.md", "report.json", "divergence.csv", "steps.csv")


@probe("links", "links at the report's former temporary names (.index.html.tmp-<pid>)")
def _report_tmp_links(workdir: Path) -> Outcome:
    data = b"a file outside the folder\n"
    outside = _outside(workdir, data)
    out = workdir / "report"
    out.mkdir()
    for name in _REPORT_FILES:
        (out / f".{name}.tmp-{os.getpid()}").symlink_to(outside)
    got = _report(workdir)
    if isinstance(got, Outcome):
        return got
    code, _, err = got
    if code != 0:
        return Outcome("unclear", f"exit {code}: {err[-300:]}")
    if (out / "index.html").is_symlink() or not (out / "index.html").is_file():
        return Outcome("silent", "index.html is not a regular file")
    return _kept(
        Outcome("fine", "the report is written under fresh temporary names; the links are not used"), outside, data
    )


@probe("links", "the report's index.html a link to a file outside the folder")
def _report_page_link(workdir: Path) -> Outcome:
    from flannel_repro.report import write_report

    data = b"a file outside the folder\n"
    outside = _outside(workdir, data)
    out = workdir / "report"
    out.mkdir()
    (out / "index.html").symlink_to(outside)
    root, _ = copy_store(workdir)
    outcome = _expect_bounded(lambda: write_report([root], out), str(out / "index.html"), "symbolic link")
    if outcome.kind == "clear" and sorted(p.name for p in out.iterdir()) != ["index.html"]:
        return Outcome("unclear", f"refused, but wrote {sorted(p.name for p in out.iterdir())} first")
    return _kept(outcome, outside, data)


def _chain_of_good_run(workdir: Path, name: str) -> tuple[Path, Path]:
    _, path = copy_store(workdir)
    chain = workdir / name
    code, _, err = _quiet(lambda: cli.main(["digests", str(path), "-o", str(chain)]))
    assert code == 0, err
    return path, chain


@probe("links", "digests -o: a link at the former temporary name (.chain.json.tmp-<pid>)")
def _digests_tmp_link(workdir: Path) -> Outcome:
    data = b"a file outside the folder\n"
    outside = _outside(workdir, data)
    _, path = copy_store(workdir)
    chain = workdir / "chain.json"
    (workdir / f".chain.json.tmp-{os.getpid()}").symlink_to(outside)
    got = _cli_bounded(["digests", str(path), "-o", str(chain)])
    if isinstance(got, Outcome):
        return got
    if got[0] != 0:
        return Outcome("unclear", f"exit {got[0]}: {got[2][-300:]}")
    if chain.is_symlink() or not chain.is_file():
        return Outcome("silent", "chain.json is not a regular file")
    return _kept(Outcome("fine", "written under a fresh temporary name; the link is not used"), outside, data)


@probe("links", "digests -o OUT where OUT is a link to a chain outside the folder")
def _digests_out_link(workdir: Path) -> Outcome:
    path, kept = _chain_of_good_run(workdir, "kept-chain.json")
    outside = workdir / "outside" / "chain.json"
    outside.parent.mkdir()
    kept.rename(outside)
    data = outside.read_bytes()
    chain = workdir / "chain.json"
    chain.symlink_to(outside)
    got = _cli_bounded(["digests", str(path), "-o", str(chain), "--force"])
    if isinstance(got, Outcome):
        return got
    code, _, err = got
    if code not in (cli.EXIT_USAGE, cli.EXIT_INPUT) or str(chain) not in err or "Traceback" in err:
        return _kept(Outcome("unclear" if code else "silent", f"exit {code}: {err[-300:]}"), outside, data)
    return _kept(Outcome("clear", err.strip()[:300]), outside, data)


# --- special files: FIFOs and devices where a file is expected --------------------------------------------


@probe("special files", "a FIFO at a run's path")
def _run_fifo(workdir: Path) -> Outcome:
    root = workdir / "artifacts"
    root.mkdir()
    fifo = root / _run_name()
    os.mkfifo(fifo)
    outcome = _expect_bounded(lambda: RunStore(root).obtain(CFG), str(fifo), "FIFO", fifos=(fifo,))
    if outcome.ok and not stat_is_fifo(fifo):
        return Outcome("silent", "the store trained over the FIFO")
    return outcome


def stat_is_fifo(path: Path) -> bool:
    import stat

    return stat.S_ISFIFO(os.lstat(path).st_mode)


@probe("special files", "a FIFO as a run's lock file")
def _lock_fifo(workdir: Path) -> Outcome:
    root = workdir / "artifacts"
    root.mkdir()
    fifo = root / f"{_run_name()}.lock"
    os.mkfifo(fifo)
    return _expect_bounded(lambda: RunStore(root).obtain(CFG), str(fifo), "FIFO", fifos=(fifo,))


@probe("special files", "training.log a FIFO")
def _log_fifo(workdir: Path) -> Outcome:
    root = workdir / "artifacts"
    root.mkdir()
    fifo = root / "training.log"
    os.mkfifo(fifo)

    def action() -> list[str]:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            got = RunStore(root).obtain(CFG)
        problems = got.trajectory.verify()
        got.trajectory.close()
        if problems:
            raise AssertionError(f"the published run does not verify: {problems}")
        return [str(w.message) for w in seen]

    box = _bounded(action, (fifo,))
    if box is None:
        return Outcome("hang", f"hung: still running after {HANG_S:.0f} s")
    if "error" in box:
        return Outcome("crash", f"{type(box['error']).__name__}: {box['error']}")
    if not any("could not append" in s and "FIFO" in s for s in box["value"]):
        return Outcome("unclear", f"no warning naming the FIFO: {box['value']}")
    return Outcome("fine", "the run is used; a warning says the log is a FIFO")


def _verify_special(path: Path, what: str) -> Outcome:
    got = _cli_bounded(["verify", str(path)], (path,) if what == "FIFO" else ())
    if isinstance(got, Outcome):
        return got
    code, out, err = got
    if code != cli.EXIT_NEGATIVE or what not in out or str(path) not in out:
        return Outcome("unclear", f"verify exited {code}: {out[-300:]} {err[-300:]}")
    got = _cli_bounded(["digests", str(path)], (path,) if what == "FIFO" else ())
    if isinstance(got, Outcome):
        return got
    code, _, err = got
    if code != cli.EXIT_INPUT or what not in err or str(path) not in err or "Traceback" in err:
        return Outcome("unclear", f"digests exited {code}: {err[-300:]}")
    return Outcome("clear", out.strip().splitlines()[0][:300])


@probe("special files", "flannel-repro verify and digests on a FIFO")
def _verify_fifo(workdir: Path) -> Outcome:
    fifo = workdir / "run.safetensors"
    os.mkfifo(fifo)
    return _verify_special(fifo, "FIFO")


@probe("special files", "flannel-repro verify and digests on /dev/zero")
def _verify_zero(workdir: Path) -> Outcome:
    return _verify_special(Path("/dev/zero"), "character device")


@probe("special files", "prune on a folder holding a FIFO named as a run")
def _prune_fifo(workdir: Path) -> Outcome:
    root, _ = copy_store(workdir)
    fifo = root / "seed7-cpu-torch-r0-0123456789ab.safetensors"
    os.mkfifo(fifo)
    for argv in (["prune", "--dry-run", "--artifacts", str(root)], ["prune", "--artifacts", str(root)]):
        got = _cli_bounded(argv, (fifo,))
        if isinstance(got, Outcome):
            return got
        code, out, err = got
        if code != 0:
            return Outcome("unclear", f"{' '.join(argv)} exited {code}: {err[-300:]}")
        if not stat_is_fifo(fifo):
            return Outcome("silent", f"{' '.join(argv)} removed a FIFO it did not make")
    return Outcome("fine", "listed and kept; no hang")


def _data_special(
    workdir: Path, which: str, special: Callable[[Path], Path], *needles: str, writer: bool = False
) -> Outcome:
    """Put a special file in place of one of the tiny data's files (`which`: tokenizer, corpus, mask)."""
    tok, corpus, mask = _tiny_files(workdir)
    given = {"tokenizer": tok, "corpus": corpus, "mask": mask}[which]
    given.unlink()
    target = special(given)
    paths = {"tokenizer": tok, "corpus": corpus, "mask": mask, which: target}
    cfg = CFG.replace(
        tokenizer_path=str(paths["tokenizer"]), corpus_path=str(paths["corpus"]), token_mask_path=str(paths["mask"])
    )
    fifos = (target,) if target.parent == workdir else ()
    if writer:  # someone writes to the FIFO: text, then it is closed

        def write() -> None:
            with contextlib.suppress(OSError):
                fd = os.open(target, os.O_WRONLY)  # blocks until a reader opens it
                try:
                    os.write(fd, b"the cat sat on the mat " * 100)
                finally:
                    os.close(fd)

        threading.Thread(target=write, daemon=True).start()
    with _env(FLANNEL_REPRO_CACHE=str(workdir / "cache")):
        outcome = _expect_bounded(
            lambda: RunStore(workdir / "artifacts").obtain(cfg), str(target), *needles, fifos=fifos
        )
    if writer:  # release a writer still waiting for a reader
        with contextlib.suppress(OSError):
            os.close(os.open(target, os.O_RDONLY | os.O_NONBLOCK))
    return outcome


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


@probe("special files", "corpus a FIFO nobody writes to")
def _corpus_fifo(workdir: Path) -> Outcome:
    return _data_special(workdir, "corpus", _fifo, "FIFO")


@probe("special files", "corpus a FIFO with a writer")
def _corpus_fifo_written(workdir: Path) -> Outcome:
    return _data_special(workdir, "corpus", _fifo, "FIFO", writer=True)


@probe("special files", "corpus /dev/null")
def _corpus_null(workdir: Path) -> Outcome:
    return _data_special(workdir, "corpus", lambda p: Path("/dev/null"), "character device")


@probe("special files", "corpus /dev/zero")
def _corpus_zero(workdir: Path) -> Outcome:
    return _data_special(workdir, "corpus", lambda p: Path("/dev/zero"), "character device")


@probe("special files", "tokenizer a FIFO")
def _tokenizer_fifo(workdir: Path) -> Outcome:
    return _data_special(workdir, "tokenizer", _fifo, "FIFO")


@probe("special files", "token mask a FIFO")
def _mask_fifo(workdir: Path) -> Outcome:
    return _data_special(workdir, "mask", _fifo, "FIFO")


@probe("special files", "corpus larger than the memory guard (1/16 of physical memory)")
def _corpus_too_big(workdir: Path) -> Outcome:
    tok, corpus, mask = _tiny_files(workdir)
    limit = (tok.stat().st_size + corpus.stat().st_size) // 2  # the tokenizer and the mask fit, the corpus does not
    cfg = CFG.replace(tokenizer_path=str(tok), corpus_path=str(corpus), token_mask_path=str(mask))
    real = data_files.memory_limit
    data_files.memory_limit = lambda: (limit, limit * data_files.MEMORY_SHARE)  # type: ignore[assignment]
    try:
        with _env(FLANNEL_REPRO_CACHE=str(workdir / "cache")):  # a fresh cache: the corpus is read
            return _expect_bounded(
                lambda: RunStore(workdir / "artifacts").obtain(cfg),
                str(corpus),
                f"{corpus.stat().st_size} bytes",
                f"at most {limit} bytes",
            )
    finally:
        data_files.memory_limit = real  # type: ignore[assignment]


@probe("special files", "a FIFO in place of the token cache entry")
def _token_cache_fifo(workdir: Path) -> Outcome:
    import torch

    from flannel_repro.data.files import file_sha256

    paths = embedded_paths("tiny")
    cache = workdir / "cache"
    (cache / "tokens").mkdir(parents=True)
    entry = cache / "tokens" / f"{file_sha256(paths.tokenizer)[:24]}-{file_sha256(paths.corpus)[:24]}.ids"
    os.mkfifo(entry)
    with _env(FLANNEL_REPRO_CACHE=str(cache)):
        box = _bounded(lambda: load_data(CFG), (entry,))
    if box is None:
        return Outcome("hang", f"hung: still running after {HANG_S:.0f} s")
    if "error" in box:
        return named(box["error"], str(entry))
    from tests.faults.probes import _reference_ids

    if not torch.equal(box["value"].ids.to(torch.long), _reference_ids()):
        return Outcome("silent", "other token ids")
    return Outcome("fine", "the FIFO is skipped and the entry rebuilt; ids equal")


# --- artifact structure: nesting --------------------------------------------------------------------------


def _nested_header(path: Path) -> None:
    _, data = _header(path)
    body = b"[" * 100_000 + b"]" * 100_000
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)


for _name, _mutate in (
    ("header JSON nested 100000 levels deep", _nested_header),
    ("metadata 'config' JSON nested 5000 levels deep", edit_meta("config", lambda text: "[" * 5000 + "]" * 5000)),
):
    PROBES.append(Probe("artifact structure", _name, artifact_fault(_mutate)))


@probe("artifact structure", "digests --compare: a chain nested 100000 levels deep")
def _chain_nested(workdir: Path) -> Outcome:
    _, path = copy_store(workdir)
    chain = workdir / "chain.json"
    chain.write_text("[" * 100_000 + "]" * 100_000)
    got = _cli_bounded(["digests", str(path), "--compare", str(chain)])
    if isinstance(got, Outcome):
        return got
    code, _, err = got
    if code != cli.EXIT_INPUT or str(chain) not in err or "nest" not in err or "Traceback" in err:
        return Outcome("unclear", f"exit {code}: {err[-300:]}")
    return Outcome("clear", err.strip()[:300])
