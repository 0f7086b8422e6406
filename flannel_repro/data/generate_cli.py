"""Write the embedded data sets into fixtures/ (or another folder), or check them against the generator.

``python -m flannel_repro.data.generate_cli [--variant default|tiny|all] [--out DIR] [--check]``: without
--check it generates each variant (`data.generator`), writes its three files into ``DIR/<variant>/``
(default: the repository's ``fixtures/``) and prints their sha256 and the corpus statistics; with --check
it regenerates in memory and compares with the files there and with `EMBEDDED_SHA256` (exit status 1 on
any difference).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Sequence

from flannel_repro.data import files as data
from flannel_repro.data.embedded import EMBEDDED_SHA256, fixtures_root, write_files
from flannel_repro.data.generator import CORPUS_FILE, FILE_NAMES, corpus_stats, render
from flannel_repro.data.vocabulary import VARIANTS, variant_spec


def _resolve_variants(arg: str) -> list[str]:
    return list(VARIANTS) if arg == "all" else [variant_spec(arg).name]


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m flannel_repro.data.generate_cli``: write (or with --check, verify) the embedded data files."""
    parser = argparse.ArgumentParser(
        prog="python -m flannel_repro.data.generate_cli", description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument("--variant", default="all", choices=[*VARIANTS, "all"], help="which variant (default: all)")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder holding one sub-folder per variant (default: the repository's fixtures/)",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="regenerate in memory and compare with the files in --out and EMBEDDED_SHA256; exit 1 on any difference",
    )
    args = parser.parse_args(argv)
    root = args.out if args.out is not None else fixtures_root()
    failures = 0
    for variant in _resolve_variants(args.variant):
        files = render(variant)
        hashes = {name: hashlib.sha256(payload).hexdigest() for name, payload in files.items()}
        expected = EMBEDDED_SHA256[variant]
        folder = root / variant
        if args.check:
            for name in FILE_NAMES:
                problems = []
                if hashes[name] != expected[name]:
                    problems.append(f"generated sha256 {hashes[name]} != recorded {expected[name]}")
                path = folder / name
                if folder.is_dir():
                    if not path.is_file():
                        problems.append(f"{path} is missing")
                    elif (got := data.file_sha256(path)) != hashes[name]:
                        problems.append(f"{path} has sha256 {got}, generated {hashes[name]}")
                status = "ok" if not problems else "MISMATCH: " + "; ".join(problems)
                print(f"{variant}/{name}: {status}")
                failures += bool(problems)
            if not folder.is_dir():
                print(f"{variant}: no folder {folder}; compared with the recorded hashes only")
            continue
        write_files(files, folder)
        stats = corpus_stats(files[CORPUS_FILE].decode("utf-8"), variant_spec(variant).vocab_size)
        print(f"{variant}: wrote {folder}")
        for name in FILE_NAMES:
            note = "" if hashes[name] == expected[name] else "  (differs from EMBEDDED_SHA256)"
            print(f"  {name:32s} {len(files[name]):>10,d} bytes  sha256 {hashes[name]}{note}")
        top = " ".join(f"{ch!r}:{count}" for ch, count in stats["top"])
        print(
            f"  n_tokens {stats['n_tokens']:,}  n_live {stats['n_live']:,}  n_dead {stats['n_dead']:,}  "
            f"top-30 share {stats['top30_share']:.3f}  live below 5 occurrences {stats['n_live_below_5']:,}  "
            f"occurring once {stats['n_live_once']:,}"
        )
        print(f"  top characters: {top}")
        print(f"  EMBEDDED_SHA256[{variant!r}] = {json.dumps(hashes, indent=4)}".replace("\n}", "\n  }"))
    if args.check:
        if failures:
            print(
                f"{failures} file(s) differ: the generator's output does not match the committed data.", file=sys.stderr
            )
            return 1
        print("all embedded data matches.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
