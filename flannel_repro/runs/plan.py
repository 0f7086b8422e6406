"""The runs a session needs, known before any claim runs: one `RunRequest` per (config, repeat, resume_at).

A plan is what the local scheduler, CI shards and a distributed engine all work from: each trains requests
into the store, and the claims then read them from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from flannel_repro.config import EngineRunConfig, RunConfig, run_config_from_dict
from flannel_repro.errors import ConfigError


@dataclass(frozen=True)
class RunRequest:
    """One run the claims ask for: `RunStore.obtain(config, repeat=repeat, resume_at=resume_at)`."""

    config: RunConfig | EngineRunConfig
    repeat: int = 0
    resume_at: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON values only: what a task on another process or machine is sent."""
        return {"config": self.config.to_dict(), "repeat": self.repeat, "resume_at": self.resume_at}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "RunRequest":
        raw = data.get("config")
        if not isinstance(raw, Mapping):
            raise ConfigError(f"a run request: expected a 'config' table, got {type(raw).__name__}.")
        config = run_config_from_dict(raw, source="a run request")
        resume_at = data.get("resume_at")
        return cls(config, int(data.get("repeat", 0)), None if resume_at is None else int(resume_at))

    def sort_key(self) -> tuple[str, int, int]:
        """A stable order every process computes the same way (shards split by it)."""
        return (self.config.fingerprint(), self.repeat, -1 if self.resume_at is None else self.resume_at)
