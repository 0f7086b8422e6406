"""Digest chains: the per-step digests of a run's W as short hex prefixes, and where two chains part.

A chain is a few kilobytes even for 1000 steps: exchange these, not the trajectories, to find the step
where two machines' runs part. `DigestChain` is written and read as JSON (`CHAIN_FORMAT`, one row of
`CHAIN_ROW` prefixes per line); summaries carry the same packed rows (`pack_prefixes`). Chains are
compared step by step on the shorter of the two prefix lengths (`compare_prefixes`).

This module imports only the standard library at import time.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from flannel_repro.analysis.provenance import RunFileOrPath, config_fingerprint, environment_subset, open_run
from flannel_repro.errors import ArtifactError
from flannel_repro.storage.format import DIGEST_ALGO
from flannel_repro.storage.jsonfile import read_json, write_text_atomic

if TYPE_CHECKING:
    from flannel_repro.storage.run import RunFile

__all__ = [
    "CHAIN_FORMAT",
    "PREFIX_HEX",
    "CHAIN_ROW",
    "ChainComparison",
    "DigestChain",
    "compare_prefixes",
    "pack_prefixes",
    "unpack_prefixes",
    "digest_hex",
    "chain_sha256",
]

CHAIN_FORMAT = "flannel-repro/digest-chain/1"
PREFIX_HEX = 16  # hex characters kept per step in a digest chain (64 bits: collisions are not a concern)
CHAIN_ROW = 8  # prefixes per line of a chain as written: keeps a 1000-step chain at ~126 short lines


def pack_prefixes(prefixes: Sequence[str]) -> list[str]:
    """The prefixes as lines of `CHAIN_ROW` space-separated prefixes."""
    return [" ".join(prefixes[i : i + CHAIN_ROW]) for i in range(0, len(prefixes), CHAIN_ROW)]


def unpack_prefixes(rows: Any, where: str) -> list[str]:
    """The prefixes of packed lines; ArtifactError (naming `where`) for anything else."""
    if not isinstance(rows, list) or not all(isinstance(r, str) for r in rows):
        raise ArtifactError(
            f"{where}: expected a list of strings of space-separated hex digests, got {type(rows).__name__}."
        )
    prefixes = [p for row in rows for p in row.split()]
    for i, p in enumerate(prefixes):
        if not p or any(c not in "0123456789abcdef" for c in p):
            raise ArtifactError(f"{where}: step {i}: expected lowercase hex, got {p!r}.")
    return prefixes


def digest_hex(traj: "RunFile") -> list[str]:
    """The run's per-step W digests in full, as hex."""
    return [bytes(row).hex() for row in traj.digests.numpy().tolist()]


def chain_sha256(full_hex: Sequence[str]) -> str:
    """sha256 over the whole chain of full digests."""
    h = hashlib.sha256()
    for d in full_hex:
        h.update(bytes.fromhex(d))
    return h.hexdigest()


@dataclass(frozen=True)
class ChainComparison:
    """Where two digest chains (stored, obtained) part.

    `first_step` is the first step, among the steps both chains have, whose digests differ (None if
    they agree on all of them). Digests are compared on the shorter of the two prefix lengths.
    """

    first_step: int | None
    stored_steps: int  # number of entries (steps + 1) in the stored chain
    obtained_steps: int
    stored_digest: str | None = None  # the digests at first_step
    obtained_digest: str | None = None

    @property
    def identical(self) -> bool:
        return self.first_step is None and self.stored_steps == self.obtained_steps

    @property
    def common(self) -> int:
        return min(self.stored_steps, self.obtained_steps)

    def describe(self) -> str:
        """One line: identical, the step they part at, or a length difference."""
        if self.first_step is not None:
            k = self.first_step
            agree = "no step agrees (step 0, the initial W, already differs)" if k == 0 else (f"steps 0..{k - 1} agree")
            return (
                f"the trajectories part at step {k} ({agree}; at step {k} stored {self.stored_digest}, "
                f"obtained {self.obtained_digest})"
            )
        if self.stored_steps != self.obtained_steps:
            return (
                f"steps 0..{self.common - 1} agree, but the stored chain has {self.stored_steps - 1} steps and "
                f"the obtained one {self.obtained_steps - 1}"
            )
        return f"digest chains identical over all {self.stored_steps} entries (steps 0..{self.stored_steps - 1})"


@dataclass(frozen=True)
class DigestChain:
    """The per-step digests of one run (step 0 = W_initial .. step S), as hex prefixes.

    A few kilobytes even for 1000 steps: exchange these, not the trajectories, to find where two
    machines' runs part. `info` carries what identifies the run (label, config fingerprint,
    environment, full first/last digests); it is written along but not compared.
    """

    prefixes: tuple[str, ...]
    algorithm: str = DIGEST_ALGO
    info: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if not self.prefixes:
            raise ArtifactError("digest chain: expected at least one step (step 0), got none.")

    def __len__(self) -> int:
        return len(self.prefixes)

    @property
    def steps(self) -> int:
        return len(self.prefixes) - 1

    @classmethod
    def from_run(cls, run: RunFileOrPath, *, prefix_hex: int = PREFIX_HEX) -> "DigestChain":
        """The chain of a recorded run, from the digests stored in its artifact."""
        traj = open_run(run)
        if not 1 <= prefix_hex <= 64:
            raise ValueError(f"prefix_hex: expected 1..64 hex characters, got {prefix_hex}.")
        full = digest_hex(traj)
        info = {
            "run": traj.label,
            "config_fingerprint": config_fingerprint(traj),
            "steps": traj.steps,
            "first": full[0],
            "last": full[-1],
            "chain_sha256": chain_sha256(full),
            "environment": environment_subset(traj.env),
        }
        algo = traj.metadata.get("digest_algo", DIGEST_ALGO)
        return cls(tuple(d[:prefix_hex] for d in full), algorithm=algo, info=info)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": CHAIN_FORMAT,
            "algorithm": self.algorithm,
            "prefix_hex": len(self.prefixes[0]),
            "digests": pack_prefixes(self.prefixes),
            **{k: v for k, v in self.info.items() if k not in ("format",)},
        }

    @classmethod
    def from_json(cls, data: Any, *, source: str = "digest chain") -> "DigestChain":
        if not isinstance(data, dict):
            raise ArtifactError(f"{source}: expected a JSON object, got {type(data).__name__}.")
        if data.get("format") != CHAIN_FORMAT:
            raise ArtifactError(
                f"{source}: expected format {CHAIN_FORMAT!r}, got {data.get('format')!r} "
                "(not written by `flannel-repro digests -o`?)."
            )
        prefixes = unpack_prefixes(data.get("digests"), f"{source}: 'digests'")
        info = {k: v for k, v in data.items() if k not in ("format", "algorithm", "prefix_hex", "digests")}
        return cls(tuple(prefixes), algorithm=str(data.get("algorithm", DIGEST_ALGO)), info=info)

    def write(self, path: str | os.PathLike[str]) -> Path:
        """Write the chain as JSON (sorted keys, one row of prefixes per line)."""
        return write_text_atomic(path, json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n", "the digest chain")

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> "DigestChain":
        return cls.from_json(read_json(path, "a digest chain JSON file"), source=str(path))

    def compare(self, obtained: "DigestChain") -> ChainComparison:
        """Compare `obtained` against this (stored) chain, step by step."""
        if self.algorithm != obtained.algorithm:
            raise ArtifactError(
                f"digest chains: expected the same algorithm, got {self.algorithm!r} (stored) and "
                f"{obtained.algorithm!r} (obtained)."
            )
        return compare_prefixes(self.prefixes, obtained.prefixes)


def compare_prefixes(stored: Sequence[str], obtained: Sequence[str]) -> ChainComparison:
    """Where two chains of prefixes part, each step compared on the shorter of its two prefixes."""
    for t, (s, o) in enumerate(zip(stored, obtained)):
        n = min(len(s), len(o))
        if s[:n] != o[:n]:
            return ChainComparison(t, len(stored), len(obtained), s, o)
    return ChainComparison(None, len(stored), len(obtained))
