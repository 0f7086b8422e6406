"""One exception family for everything flannel-repro raises on purpose.

Every message names the thing that is wrong, what was expected and what was got, so a user can fix
the input without reading our source.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path


class FlannelError(Exception):
    """Base class of every error flannel-repro raises deliberately."""


class ConfigError(FlannelError, ValueError):
    """A configuration value is unknown, of the wrong type, or impossible."""


class UsageError(ConfigError):
    """A command-line option or argument cannot be used as given (the command line exits 2)."""


class DataError(FlannelError, ValueError):
    """A tokenizer, corpus or token-mask file is missing, malformed or inconsistent with the config."""


class ArtifactError(FlannelError):
    """A trajectory artifact is missing, incomplete, corrupt or does not match what was asked for."""


class ResumeError(ArtifactError):
    """A checkpoint, or the partial artifact it continues, failed verification: the run is not resumed from it."""


class RunMissing(ArtifactError):
    """A run a claim needs is not in the store, and this session may not train it (`--flannel-no-train`)."""


class DeterminismError(FlannelError):
    """A run did not behave as the determinism settings promise (e.g. the data order drifted)."""


class NumericsError(FlannelError):
    """The numerics a run asked for are not the numerics it would get (too late, or this CPU lacks them)."""


class TrainingStopped(Exception):
    """Raised by a run told to stop after a step (`stop_at`): its checkpoint and partial file are kept.

    Not a FlannelError: no fault, but the stop a test of resume asked for (`training.resume`)."""

    def __init__(self, step: int, checkpoint_path: Path) -> None:
        super().__init__(f"stopped after step {step}; checkpoint {checkpoint_path}")
        self.step = step
        self.checkpoint_path = checkpoint_path


class ArtifactWarning(UserWarning):
    """An artifact was set aside (it failed verification) and its run is trained again."""


class DataCacheWarning(UserWarning):
    """A derived-data cache entry (tokenised corpus) could not be written; the data is used all the same."""


class DataWarning(UserWarning):
    """The data is usable but not as clean as it should be (e.g. unknown tokens accepted by the config)."""


class DeterminismWarning(UserWarning):
    """A determinism setting is missing or came too late to have an effect."""
