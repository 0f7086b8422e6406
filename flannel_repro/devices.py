"""Device strings: one parser for 'cpu', 'cuda', 'cuda:N' and 'mps', and whether a device is present.

Every module that takes a device string goes through `parse_device`, so a bad one ('cuda:x', 'cpu:1',
'tpu') is the same clear `ConfigError` everywhere, at configuration time, never a bare `ValueError`
from torch on the one machine that has the device.
"""

from __future__ import annotations

from dataclasses import dataclass

from flannel_repro.errors import ConfigError

DEVICE_KINDS = ("cpu", "cuda", "mps")
EXPECTED = "'cpu', 'cuda', 'cuda:N' (N = 0, 1, ...) or 'mps'"


@dataclass(frozen=True)
class Device:
    kind: str  # cpu, cuda or mps
    index: int | None = None  # cuda:N; None for cpu, mps and plain 'cuda' (the current device)

    def __str__(self) -> str:
        return self.kind if self.index is None else f"{self.kind}:{self.index}"


def parse_device(text: object) -> Device:
    """'cuda:1' -> Device('cuda', 1). Anything else than the expected forms is a ConfigError."""
    if not isinstance(text, str):
        raise ConfigError(f"device: expected {EXPECTED}, got {text!r} ({type(text).__name__}).")
    kind, sep, index = text.strip().partition(":")
    if kind not in DEVICE_KINDS or (sep and (kind != "cuda" or not index.isdigit())):
        raise ConfigError(f"device: expected {EXPECTED}, got {text!r}.")
    return Device(kind, int(index) if sep else None)


def device_kind(text: str) -> str:
    """'cuda:1' -> 'cuda' (validated)."""
    return parse_device(text).kind


def device_present(text: str) -> tuple[bool, str]:
    """Whether this machine has the device, and if not, why (for skip messages)."""
    device = parse_device(text)
    if device.kind == "cpu":
        return True, ""
    import torch

    if device.kind == "cuda":
        if not torch.cuda.is_available():
            return False, "CUDA is not available (torch.cuda.is_available() is False)"
        index = device.index or 0
        if index >= torch.cuda.device_count():
            return False, f"{device} asked for but only {torch.cuda.device_count()} CUDA device(s) present"
        return True, ""
    if not torch.backends.mps.is_available():
        return False, "MPS is not available (torch.backends.mps.is_available() is False)"
    return True, ""
