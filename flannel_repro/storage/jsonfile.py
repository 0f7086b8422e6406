"""Small JSON files of our own (op logs, digest chains, noise bands): read with named errors, written atomically."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from flannel_repro.errors import ArtifactError, FlannelError
from flannel_repro import safeio

_MISSING: Any = object()
MAX_DEPTH = 64  # arrays and objects nested deeper than this are refused before json parses them
MAX_JSON_BYTES = 100_000_000  # a JSON file of ours larger than this is not one
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.S)


def nesting_depth(text: bytes | str) -> int:
    """How deep JSON text nests arrays and objects; brackets inside strings do not count."""
    import numpy as np

    raw = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else bytes(text)
    if b"[" not in raw and b"{" not in raw:
        return 0
    a = np.frombuffer(_STRING.sub(b'""', raw), dtype=np.uint8)
    step = (a == ord("[")).astype(np.int64) + (a == ord("{")) - (a == ord("]")) - (a == ord("}"))
    return int(np.cumsum(step).max(initial=0))


def check_depth(text: bytes | str, where: str, what: str, error: type[FlannelError] = ArtifactError) -> None:
    """Refuse JSON nested deeper than MAX_DEPTH (json would fail with RecursionError), naming `where`."""
    depth = nesting_depth(text)
    if depth > MAX_DEPTH:
        raise error(f"{where}: expected {what} nested at most {MAX_DEPTH} levels deep, got {depth} levels of nesting.")


def read_json(path: str | os.PathLike[str], what: str, *, missing: Any = _MISSING) -> Any:
    """The parsed JSON of `path`; `what` names the file in errors ("a digest chain JSON file"). A missing
    file returns `missing` when given, else it is an ArtifactError like every unreadable one."""
    p = Path(path)
    try:
        raw = safeio.read_regular(p, what, max_bytes=MAX_JSON_BYTES)
        check_depth(raw, str(p), what)
        return json.loads(raw.decode("utf-8"))
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
    """`write_text_atomic` for bytes (`safeio.write_bytes_atomic`: a fresh, unpredictable temporary name;
    a link or special file at `path` is refused)."""
    return safeio.write_bytes_atomic(path, data, what)
