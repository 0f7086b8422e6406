"""Partial files: the temporary name an artifact is written under, and the cleanup of those killed writers left.

A writer writes ``<final>.partial-<pid>-<random>`` in the final file's directory and renames it into
place when done (`storage.writer`); a writer that was killed leaves the partial file behind.
"""

from __future__ import annotations

import os
import re
import secrets
import time
from pathlib import Path

PARTIAL_RE = re.compile(r"\.partial-(\d+)-[0-9a-f]+$")


def partial_path(final: Path) -> Path:
    """A fresh temporary name for `final`, in its directory: ``<final>.partial-<pid>-<random>``."""
    return final.with_name(f"{final.name}.partial-{os.getpid()}-{secrets.token_hex(4)}")


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return True  # not a pid we can judge: treat as alive (keep the file)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def stale_partials(directory: str | os.PathLike[str], *, older_than_s: float = 60.0) -> list[Path]:
    """The ``*.partial-<pid>-*`` files of `directory` left by killed writers.

    A partial file is stale when its writer pid is not running on this machine AND it was last
    modified at least ``older_than_s`` seconds ago (a live writer on another machine sharing the
    directory keeps its mtime fresh). Files of this process are never stale.
    """
    stale: list[Path] = []
    now = time.time()
    for p in sorted(Path(directory).glob("*.partial-*")):
        m = PARTIAL_RE.search(p.name)
        if m is None or not p.is_file():
            continue
        pid = int(m.group(1))
        if pid == os.getpid() or _pid_alive(pid):
            continue
        try:
            if now - p.stat().st_mtime < older_than_s:
                continue
        except FileNotFoundError:
            continue
        stale.append(p)
    return stale


def cleanup_partials(directory: str | os.PathLike[str], *, older_than_s: float = 60.0) -> list[Path]:
    """Remove the stale partial files of `directory` (`stale_partials`); returns the removed paths."""
    removed: list[Path] = []
    for p in stale_partials(directory, older_than_s=older_than_s):
        try:
            p.unlink()
        except FileNotFoundError:
            continue
        removed.append(p)
    return removed
