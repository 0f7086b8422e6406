"""Opening and writing files safely: regular files only, no link followed in our own folders, no
predictable temporary name, and nothing that blocks on a FIFO.

Two kinds of path:

* user-given inputs (an artifact to verify, a corpus): links are followed, but the target must be a
  regular file (`regular_file`, `read_regular`);
* files the tool owns in its folder (logs, locks, progress files, checkpoints, partial files): a link
  there is refused, as is anything but a regular file (`own_file`, `open_nofollow`,
  `write_bytes_atomic`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from pathlib import Path

from flannel_repro.errors import ArtifactError, FlannelError

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
NO_LINKS = "flannel-repro does not follow links in its folder"


def kind(mode: int) -> str:
    """What a stat mode is, in words: "a regular file", "a FIFO", "a directory", ..."""
    for test, name in (
        (stat.S_ISREG, "a regular file"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISLNK, "a symbolic link"),
    ):
        if test(mode):
            return name
    return "a special file"


def regular_file(path: str | os.PathLike[str], what: str, error: type[FlannelError] = ArtifactError) -> os.stat_result:
    """stat `path` (following links: a user's input may be a link to a file) and refuse anything but a
    regular file with `error` naming it, what was expected (`what`, e.g. "a run artifact") and what it is."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise error(f"{path}: expected {what} (a regular file), found no such file.") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise error(f"{path}: expected {what} (a regular file), got a loop of symbolic links.") from None
        raise error(
            f"{path}: expected {what} (a regular file), could not look at it ({exc.strerror or exc})."
        ) from None
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{path}: expected {what} (a regular file), got {kind(st.st_mode)}.")
    return st


def own_file(
    path: str | os.PathLike[str], what: str, error: type[FlannelError] = ArtifactError
) -> os.stat_result | None:
    """lstat a file the tool owns in its folder: None when there is none; a link or anything but a regular
    file is `error`."""
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        raise error(
            f"{path}: expected {what} (a regular file) or nothing, could not look at it ({exc.strerror or exc})."
        ) from None
    if stat.S_ISLNK(st.st_mode):
        raise error(f"{path}: expected {what} (a regular file) or nothing, got a symbolic link; {NO_LINKS}. Remove it.")
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{path}: expected {what} (a regular file) or nothing, got {kind(st.st_mode)}. Remove it.")
    return st


def open_nofollow(
    path: str | os.PathLike[str],
    flags: int,
    mode: int = 0o644,
    *,
    what: str = "a file",
    error: type[FlannelError] = ArtifactError,
) -> int:
    """os.open a file the tool owns: a link at `path` is `error` (O_NOFOLLOW); it is opened without blocking
    (O_NONBLOCK), must be a regular file, and is then switched back to blocking. Other OSErrors (no such
    file, permissions, a full disk) are raised as they are."""
    try:
        fd = os.open(path, flags | _NOFOLLOW | _NONBLOCK | _CLOEXEC, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP or (exc.errno == errno.EMLINK and _NOFOLLOW):  # EMLINK: FreeBSD's O_NOFOLLOW
            raise error(
                f"{path}: expected {what} (a regular file), got a symbolic link; {NO_LINKS}. Remove it."
            ) from None
        if exc.errno == errno.ENXIO:  # a FIFO with no reader, opened for writing, or a device that is not there
            with contextlib.suppress(OSError):
                own_file(path, what, error)
            raise error(f"{path}: expected {what} (a regular file), got a special file.") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{path}: expected {what} (a regular file), got {kind(st.st_mode)}.")
        if _NONBLOCK and not flags & _NONBLOCK:
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_regular(
    path: str | os.PathLike[str],
    what: str,
    error: type[FlannelError] = ArtifactError,
    *,
    max_bytes: int | None = None,
    limit_reason: str = "",
) -> bytes:
    """The bytes of a user-given file (links followed), which must be a regular file of at most `max_bytes`;
    opened without blocking, so a FIFO never hangs the process. A missing file is FileNotFoundError (the
    caller says what that means); other problems are `error`. `limit_reason` says where `max_bytes` comes from."""
    try:
        fd = os.open(path, os.O_RDONLY | _NONBLOCK | _CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as exc:
        if exc.errno == errno.EISDIR:
            raise error(f"{path}: expected {what} (a regular file), got a directory.") from None
        raise error(f"{path}: expected {what}, could not read it ({exc.strerror or exc}).") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{path}: expected {what} (a regular file), got {kind(st.st_mode)}.")
        if max_bytes is not None and st.st_size > max_bytes:
            raise error(f"{path}: expected {what} of at most {max_bytes} bytes{limit_reason}, got {st.st_size} bytes.")
        os.set_blocking(fd, True)
        chunks, size = [], 0
        while True:
            block = os.read(fd, 1 << 20)
            if not block:
                break
            chunks.append(block)
            size += len(block)
            if max_bytes is not None and size > max_bytes:  # grew while being read
                raise error(f"{path}: expected {what} of at most {max_bytes} bytes, got more.")
        return b"".join(chunks)
    except OSError as exc:
        raise error(f"{path}: expected {what}, could not read it ({exc.strerror or exc}).") from None
    finally:
        os.close(fd)


def _umask() -> int:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)  # not thread-safe, hence only where /proc is missing
    os.umask(old)
    return old


def write_bytes_atomic(
    path: str | os.PathLike[str],
    data: bytes,
    what: str,
    *,
    mode: int = 0o644,
    error: type[FlannelError] = ArtifactError,
) -> Path:
    """Write `data` to `path` through a fresh temporary file in the same folder (mkstemp: O_EXCL, an
    unpredictable name), fsync and an atomic rename: a reader never sees half a file. A link or a
    non-regular file at `path` is refused. An OSError is `error` naming the file; the temporary file is
    removed on any error."""
    out = Path(path)
    own_file(out, what, error)
    try:
        fd, tmp = tempfile.mkstemp(dir=out.parent if str(out.parent) else ".", prefix=f".{out.name}.", suffix=".tmp")
    except OSError as exc:
        raise error(f"{out}: could not write {what} ({exc.strerror or exc}).") from None
    try:
        try:
            os.fchmod(fd, mode & ~_umask())
            view = memoryview(data).cast("B")
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, out)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise error(f"{out}: could not write {what} ({exc.strerror or exc}).") from None
        raise
    return out
