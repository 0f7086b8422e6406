"""The embedded data sets as files: where they live, their recorded hashes, and their verification and cache.

The files of each variant are committed under ``fixtures/<variant>/`` and their sha256 recorded in
`EMBEDDED_SHA256`. `embedded_paths` returns verified paths to them, or, where the fixtures are absent or
altered, regenerates them (`data.generator`) into the cache and verifies the result against the same hashes.
The command that writes or checks the committed files is `data.generate_cli`.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from flannel_repro.data import files as data
from flannel_repro.data import generator
from flannel_repro.data.generator import CORPUS_FILE, MASK_FILE, TOKENIZER_FILE
from flannel_repro.data.vocabulary import variant_spec
from flannel_repro.errors import DataError

__all__ = [
    "EMBEDDED_SHA256",
    "EmbeddedPaths",
    "embedded_paths",
    "fixtures_root",
    "write_embedded",
    "write_files",
]

# sha256 of the three files of each variant, as produced by `generator.render` (and committed under fixtures/).
EMBEDDED_SHA256: dict[str, dict[str, str]] = {
    "default": {
        TOKENIZER_FILE: "bf7f79f957a49a0fac05d66e993db4abcca0e0166cc5354190b02c5e8677c217",
        CORPUS_FILE: "4ccf226001461a830613e354c0eafe56f5aa21daadd088fda0e4b04f604da61a",
        MASK_FILE: "4cb06c0fe1f98558a743e57d8fa51602b2489b19e2fd02ba451dba4ac45a63f6",
    },
    "tiny": {
        TOKENIZER_FILE: "01abeb14302225d46a1773fd1a20e063ec37e468d6d057c89f6a4ba093addaa6",
        CORPUS_FILE: "891e9ee2b78fc5e358d2264e443411bab16044495a26e0b78bd10f1ccc6eafa0",
        MASK_FILE: "c9f73d9ddbe63d4c7e595fd664a404005dec918fc3c3e9056884ad64e887a251",
    },
}


# --- files on disk ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class EmbeddedPaths:
    """Where the three files of one variant live."""

    variant: str
    tokenizer: Path
    corpus: Path
    token_mask: Path

    @classmethod
    def in_dir(cls, variant: str, folder: Path) -> "EmbeddedPaths":
        return cls(variant, folder / TOKENIZER_FILE, folder / CORPUS_FILE, folder / MASK_FILE)

    def by_name(self) -> dict[str, Path]:
        return {TOKENIZER_FILE: self.tokenizer, CORPUS_FILE: self.corpus, MASK_FILE: self.token_mask}


def _sha256(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


def write_files(files: dict[str, bytes], folder: Path) -> None:
    """Write each file atomically and make it world-readable (mkstemp creates files with mode 0600)."""
    for name, payload in files.items():
        data.atomic_write_bytes(folder / name, payload)
        os.chmod(folder / name, 0o644)


def write_embedded(variant: str, out_dir: Path) -> EmbeddedPaths:
    """Generate `variant` and write its three files into `out_dir` (atomically, one by one)."""
    out = Path(out_dir)
    write_files(generator.render(variant), out)
    return EmbeddedPaths.in_dir(variant, out)


def fixtures_root() -> Path:
    """The repository's ``fixtures/`` folder (present in a source checkout, absent when installed)."""
    return Path(__file__).resolve().parents[2] / "fixtures"


# (path, expected sha256) -> (stat signature, actual sha256): files are re-hashed only when their stat changes.
_VERIFIED: dict[tuple[str, str], tuple[tuple[int, int, int], str]] = {}
_WARNED: set[tuple[str, tuple[int, int, int]]] = set()


def _check_file(path: Path, expected: str) -> tuple[bool, str | None]:
    """(matches, actual sha256 or None when missing); cached on the file's stat signature."""
    try:
        st = path.stat()
    except OSError:
        return False, None
    sig = (st.st_ino, st.st_size, st.st_mtime_ns)
    key = (str(path), expected)
    hit = _VERIFIED.get(key)
    if hit is not None and hit[0] == sig:
        return hit[1] == expected, hit[1]
    try:
        got = data.file_sha256(path)
    except OSError:
        return False, None
    _VERIFIED[key] = (sig, got)
    return got == expected, got


def _mismatches(paths: EmbeddedPaths, expected: dict[str, str]) -> list[tuple[str, str | None]]:
    """(file name, actual sha256 or None if missing) of every file that does not match."""
    bad = []
    for name, path in paths.by_name().items():
        ok, got = _check_file(path, expected[name])
        if not ok:
            bad.append((name, got))
    return bad


def embedded_paths(variant: str) -> EmbeddedPaths:
    """Verified paths to the embedded data of `variant`.

    The repository's ``fixtures/<variant>/`` files are used when all three match `EMBEDDED_SHA256`.
    Otherwise (installed package, missing or edited fixtures) the data is generated into
    ``cache_dir()/embedded/<variant>/`` (unless the cache already holds matching files) and checked
    against the same hashes; a generator whose output differs raises `DataError`. An edited fixture
    is never used: a warning names it and the cache is used instead.
    """
    spec = variant_spec(variant)
    expected = EMBEDDED_SHA256[spec.name]
    fixtures = fixtures_root() / spec.name
    if fixtures.is_dir():
        paths = EmbeddedPaths.in_dir(spec.name, fixtures)
        bad = _mismatches(paths, expected)
        if not bad:
            return paths
        _warn_fixtures(paths, bad, expected)
    cache = data.cache_dir() / "embedded" / spec.name
    paths = EmbeddedPaths.in_dir(spec.name, cache)
    if not _mismatches(paths, expected):
        return paths
    files = generator.render(spec.name)
    for name, payload in files.items():
        got = _sha256(payload)
        if got != expected[name]:
            raise DataError(
                f"the generated embedded data {spec.name!r} differs from the recorded hashes: {name} has sha256 "
                f"{got}, expected {expected[name]} (flannel_repro.data.embedded.EMBEDDED_SHA256). The generator or one of "
                f"its dependencies (numpy, tokenizers, safetensors, torch) changed; run "
                f"`python -m flannel_repro.data.generate_cli --check` and restore the committed fixtures/{spec.name}/ files."
            )
    write_files(files, cache)
    bad = _mismatches(paths, expected)
    if bad:
        name, found = bad[0]
        raise DataError(
            f"embedded data {spec.name!r} written to {str(cache)!r} does not verify: {name} has sha256 "
            f"{found}, expected {expected[name]}."
        )
    return paths


def _warn_fixtures(paths: EmbeddedPaths, bad: list[tuple[str, str | None]], expected: dict[str, str]) -> None:
    by_name = paths.by_name()
    for name, got in bad:
        path = by_name[name]
        try:
            st = path.stat()
            sig = (st.st_ino, st.st_size, st.st_mtime_ns)
        except OSError:
            sig = (0, -1, 0)
        if (str(path), sig) in _WARNED:
            continue
        _WARNED.add((str(path), sig))
        state = "is missing" if got is None else f"has sha256 {got}, expected {expected[name]}"
        warnings.warn(
            f"fixture {str(path)!r} {state}; it is not used: the embedded data {paths.variant!r} is "
            f"taken from the cache (generated and verified) instead.",
            stacklevel=3,
        )


if __name__ == "__main__":  # the command used to live here: say where it went rather than silently do nothing
    raise SystemExit(
        "the command that writes or checks the embedded data is now "
        "`python -m flannel_repro.data.generate_cli` (same options)."
    )
