"""Seeding, the deterministic-mode switch, thread settings and the environment fingerprint.

Every global flag changed here is put back on exit: a test that asks for deterministic mode must
not leak it into the next test.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import platform
import sys
import warnings
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, Iterator

from flannel_repro.devices import parse_device
from flannel_repro.errors import DeterminismWarning

PACKAGES = ("torch", "transformers", "accelerate", "tokenizers", "safetensors", "numpy")
ALLOCATOR_ENV = (
    "LD_PRELOAD",
    "MALLOC_CONF",
    "MALLOC_ARENA_MAX",
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_TOP_PAD_",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "KMP_AFFINITY",
    "CUBLAS_WORKSPACE_CONFIG",
)


@contextlib.contextmanager
def deterministic_mode(enabled: bool = True, *, warn_only: bool = False) -> Iterator[None]:
    """Make torch pick deterministic kernels inside the block, and restore every flag afterwards.

    - `torch.use_deterministic_algorithms`: raise (or warn) on ops without a deterministic kernel.
    - `cudnn.deterministic = True`, `cudnn.benchmark = False`: benchmark mode picks kernels by timing,
      which can differ from run to run.
    - TF32 off for matmul and cuDNN: TF32 changes the numbers, and its use depends on the GPU.
    - cuBLAS needs `CUBLAS_WORKSPACE_CONFIG=:4096:8` (or `:16:8`) set before CUDA initialises for
      deterministic reductions; we can only warn when it is missing or set too late.
    """
    import torch

    if not enabled:
        yield
        return
    saved = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
    )
    for message in cuda_determinism_warnings():
        warnings.warn(message, DeterminismWarning, stacklevel=3)
    try:
        torch.use_deterministic_algorithms(True, warn_only=warn_only)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.deterministic = saved[2]
        torch.backends.cudnn.benchmark = saved[3]
        torch.backends.cuda.matmul.allow_tf32 = saved[4]
        torch.backends.cudnn.allow_tf32 = saved[5]


_CUBLAS_AT_IMPORT = os.environ.get("CUBLAS_WORKSPACE_CONFIG")


def cuda_determinism_warnings() -> list[str]:
    """What is wrong with the cuBLAS workspace setting for deterministic CUDA runs (empty when fine or no CUDA)."""
    import torch

    if not torch.cuda.is_available():
        return []
    value = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    if value not in (":4096:8", ":16:8"):
        return [
            "deterministic mode on CUDA needs CUBLAS_WORKSPACE_CONFIG=:4096:8 (or :16:8) in the environment "
            f"before CUDA starts; it is {value!r}. Set it in the shell or in pytest's env before running."
        ]
    if value != _CUBLAS_AT_IMPORT and torch.cuda.is_initialized():
        return [
            f"CUBLAS_WORKSPACE_CONFIG was set to {value!r} after CUDA was initialised: cuBLAS read the old value "
            f"({_CUBLAS_AT_IMPORT!r}), so the setting has no effect in this process."
        ]
    return []


# The CPUs this process may use before an xdist worker was pinned to its share (plugin.session.pin_worker).
ALLOWED_CPUS: list[frozenset[int]] = []


def remember_allowed_cpus() -> None:
    """Note the CPUs this process may use, before pinning it to fewer (once)."""
    if not ALLOWED_CPUS and hasattr(os, "sched_getaffinity"):
        ALLOWED_CPUS.append(frozenset(os.sched_getaffinity(0)))


@contextlib.contextmanager
def _room_for(n: int) -> Iterator[None]:
    """Let a run of `n` threads use up to `n` of the CPUs the process had before it was pinned.

    A worker pinned to 1 CPU that trains a 2-thread run would put both OpenMP threads on that one CPU,
    where each spins at every barrier waiting for the other (measured: 0.11 steps/s against 1.6 for a
    1-thread run). Placement changes no arithmetic; the thread count does, and it is unchanged.
    """
    if not ALLOWED_CPUS or not hasattr(os, "sched_setaffinity"):
        yield
        return
    try:
        current = os.sched_getaffinity(0)
    except OSError:
        yield
        return
    if n <= len(current) or len(ALLOWED_CPUS[0]) <= len(current):
        yield
        return
    extra = sorted(ALLOWED_CPUS[0] - current)[: n - len(current)]
    try:
        os.sched_setaffinity(0, current | set(extra))
    except OSError:
        yield
        return
    try:
        yield
    finally:
        try:
            os.sched_setaffinity(0, current)
        except OSError:
            pass


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[int]:
    """Use `n` intra-op threads inside the block (0 keeps the current count); yields the count in force.
    A process pinned to fewer CPUs than `n` (an xdist worker) gets room for them while inside."""
    import torch

    before = torch.get_num_threads()
    with _room_for(n or before):
        if n and n != before:
            torch.set_num_threads(n)
        try:
            yield torch.get_num_threads()
        finally:
            if torch.get_num_threads() != before:
                torch.set_num_threads(before)


def package_versions() -> dict[str, str]:
    """Versions of the packages that can change a trajectory (a copy: callers may modify it)."""
    return dict(_package_versions())


@functools.lru_cache(maxsize=1)
def _package_versions() -> dict[str, str]:
    """Read once per process: importlib.metadata scans every sys.path entry on each call."""
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """Hash of the package's own source files: any edit to the code changes every run key."""
    h = hashlib.sha256()
    root = Path(__file__).resolve().parents[1]  # the flannel_repro package, every subpackage included
    for path in sorted(root.rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode())
        h.update(b"\0")
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=None)
def cpuinfo_field(field: str) -> str | None:
    """The first value of `field` in /proc/cpuinfo (None where there is no such file or field)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == field:
            return value.strip()
    return None


def cpu_name() -> str:
    return cpuinfo_field("model name") or platform.processor() or platform.machine()


def device_description(device: str) -> dict[str, Any]:
    import torch

    parsed = parse_device(device)
    kind = parsed.kind
    info: dict[str, Any] = {"device": device, "kind": kind}
    if kind == "cpu":
        info["name"] = cpu_name()
        info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    elif kind == "cuda" and torch.cuda.is_available():
        index = parsed.index or 0
        props = torch.cuda.get_device_properties(index)
        info.update(
            name=props.name,
            capability=f"{props.major}.{props.minor}",
            cuda=torch.version.cuda,
            cublas=cublas_version(),
            cudnn=str(torch.backends.cudnn.version()),
        )
    elif kind == "mps":
        info.update(name="Apple MPS", chip=_mac_chip(), macos=platform.mac_ver()[0] or None)
    return info


def cublas_version() -> str | None:
    """The cuBLAS that torch loads, from its wheel's package (None when it is not a separate package)."""
    for name in ("nvidia-cublas-cu12", "nvidia-cublas-cu13", "nvidia-cublas", "nvidia-cublas-cu11"):
        try:
            return importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            continue
    return None


@functools.lru_cache(maxsize=1)
def _mac_chip() -> str | None:
    import subprocess

    try:
        out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def environment_fingerprint(device: str, *, numerics: dict[str, Any]) -> dict[str, Any]:
    """Everything about this process that may change a trajectory's numbers (stored with every artifact).

    `numerics` is the run's numerics class with what it was derived from (`numerics.numerics_info`).
    """
    import torch

    from flannel_repro.version import __version__
    from flannel_repro.training.allocator import malloc_state

    return {
        "flannel_repro": __version__,
        "code_version": code_version(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": package_versions(),
        "device": device_description(device),
        "threads": torch.get_num_threads(),
        "cpu_affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "cudnn_deterministic": torch.backends.cudnn.deterministic,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "env": {k: os.environ[k] for k in ALLOCATOR_ENV if k in os.environ},
        "malloc": malloc_state(),
        "numerics": numerics,
    }
