"""glibc malloc settings that stop the training loop from mapping and unmapping memory every step.

Each step allocates and frees buffers of tens of megabytes (the (B*T, V) logits and their gradient).
glibc serves blocks above its mmap threshold with fresh mmap() calls and returns them with munmap(),
so every step page-faults its buffers in again: on the 2-core reference machine more than half the
CPU time of the notebook's loop is spent in the kernel. Raising the mmap and trim thresholds keeps
those blocks in the heap, where they are reused. `mallopt` changes this at run time, so nothing has
to be exported before the process starts.

Allocation does not change arithmetic: trajectories are bitwise identical with and without it
(tests/test_allocator.py). Set FLANNEL_REPRO_MALLOC=0 to leave glibc's defaults alone. The state
is recorded in every artifact's environment fingerprint.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

# mallopt parameter numbers from glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3

SETTINGS = {"mmap_threshold": 1 << 30, "trim_threshold": 1 << 30, "top_pad": 64 << 20}

_state: dict[str, object] = {"applied": False, "reason": "not requested yet"}


def tune_malloc() -> dict[str, object]:
    """Apply SETTINGS once per process (glibc only); returns what was done, for the fingerprint."""
    if _state["applied"] or _state.get("final"):
        return dict(_state)
    if os.environ.get("FLANNEL_REPRO_MALLOC", "1") == "0":
        _state.update(applied=False, final=True, reason="disabled by FLANNEL_REPRO_MALLOC=0")
        return dict(_state)
    libc_name = platform.libc_ver()[0]
    if platform.system() != "Linux" or libc_name != "glibc":
        _state.update(
            applied=False, final=True, reason=f"not glibc ({platform.system()} {libc_name or 'unknown libc'})"
        )
        return dict(_state)
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = all(
            libc.mallopt(param, value) == 1
            for param, value in (
                (_M_MMAP_THRESHOLD, SETTINGS["mmap_threshold"]),
                (_M_TRIM_THRESHOLD, SETTINGS["trim_threshold"]),
                (_M_TOP_PAD, SETTINGS["top_pad"]),
            )
        )
    except (OSError, AttributeError) as exc:
        _state.update(applied=False, final=True, reason=f"mallopt unavailable: {exc}")
        return dict(_state)
    _state.update(applied=ok, final=True, reason="mallopt" if ok else "mallopt refused a setting", **SETTINGS)
    return dict(_state)


def malloc_state() -> dict[str, object]:
    return {k: v for k, v in _state.items() if k != "final"}
