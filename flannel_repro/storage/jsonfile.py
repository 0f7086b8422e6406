"""Small JSON files of our own (op logs, digest chains, noise bands): read with named errors, written atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from flannel_repro.errors import ArtifactError

_MISSING: Any = object()


def read_json(path: str | os.PathLike[str], what: str, *, missing: Any = _MISSING) -> Any:
    """The parsed JSON of `path`; `what` names the file in errors ("a digest chain JSON file"). A missing
    file returns `missing` when given, else it is an ArtifactError like every unreadable one."""
    p = Path(path)
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        if missing is not _MISSING:
            return missing
        raise ArtifactError(f"{p}: expected {what}, found no such file.") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise ArtifactError(f"{p}: expected {what}, got unparsable text ({exc}).") from None
    except OSError as exc:
        raise ArtifactError(f"{p}: expected {what}, could not read it ({exc.strerror or exc}).") from None


def write_text_atomic(path: str | os.PathLike[str], text: str, what: str) -> Path:
    """Write `text` to `path` through a temporary file in the same folder and a rename: a reader never
    sees half a file. An OSError is an ArtifactError naming the file; the temporary file is removed."""
    return write_bytes_atomic(path, text.encode("utf-8"), what)


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes, what: str) -> Path:
    """`write_text_atomic` for bytes."""
    out = Path(path)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ArtifactError(f"{out}: could not write {what} ({exc.strerror or exc}).") from None
    return out
