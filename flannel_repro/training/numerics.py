"""Numerics classes: the arithmetic a run actually gets, and the portable CPU mode.

"cpu" is not one arithmetic. On CPU the bits of a bf16 training step are decided by

* the ISA of oneDNN's bf16 matmul kernels (AMX tiles, AVX-512 BF16 dot products, or an AVX2/AVX-512
  emulation): every `nn.Linear` and the LM head;
* MKL's code path for its bf16 GEMM (SDPA's backward on CPU calls `cblas_gemm_bf16bf16f32`); and
* the thread count (how the reductions are split).

None of the first two can be read back through a torch API, so they are *probed*: a small bf16
matmul and an SDPA forward/backward run once per process with oneDNN's and MKL's verbose logs on,
and the kernels the libraries report having dispatched name the class. The same computation's
output bits are hashed into a probe digest, so two processes whose class names agree but whose
arithmetic does not are still told apart (the digest is in every artifact and in the run key).

A class name is short and readable: ``cpu-amx-mklamx-t1`` (an Intel Xeon with AMX, native),
``cpu-avx512bf16-mklavx2strict-t1`` (portable mode, on Intel and AMD alike), ``cuda-nvidia_h200-sm90-
cuda12_8-cudnn91002-det1``. It never contains a dot: snapshot names append ``.N`` or ``.name``.

**Portable mode** (`numerics = "portable"`) pins oneDNN to AVX-512 BF16 (``ONEDNN_MAX_CPU_ISA``) and
MKL to its AVX2 branch in strict CNR mode (``MKL_CBWR=AVX2,STRICT``). Both libraries read these once,
at their first call, so the settings must be in the environment before the process's first bf16
matmul: the pytest plugin sets them at configure time (xdist workers inherit them), and `train()`
sets them itself when nothing has run yet, and otherwise refuses (`NumericsError`). Measured: an
Intel Xeon with AMX in portable mode reproduces an AMD EPYC (Zen 4, no AMX) trajectory bit for bit.
A CPU without AVX-512 BF16 cannot run the pinned path; there portable mode refuses rather than
silently producing other bits.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import re
import sys
import tempfile
from dataclasses import asdict, dataclass
from typing import Any, Iterator, Mapping

from flannel_repro.config import NUMERICS
from flannel_repro.devices import parse_device
from flannel_repro.errors import FlannelError
from flannel_repro.training.determinism import cpu_name, cpuinfo_field, device_description, torch_threads

MODES = NUMERICS  # the config field's choices: one source
# What portable mode pins. oneDNN: the bf16 kernels of AVX-512 BF16, which both Intel Xeons (Cooper
# Lake and later) and AMD Zen 4 run; AMX would otherwise win on Intel. MKL: its AVX2 branch, strict CNR
# (the AVX2 branch without STRICT still parted from the AMD trajectory at step 5 on an AMX Xeon).
PORTABLE_ENV = {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16", "MKL_CBWR": "AVX2,STRICT"}
PORTABLE_ONEDNN = "avx512bf16"  # the short name the probe must report in portable mode
NUMERICS_ENV = tuple(PORTABLE_ENV)  # environment variables that steer the CPU kernels (recorded)

# Arithmetic variants for deriving noise bands (flannel_repro.noise): each an environment for a fresh
# process. None removes the variable. Only paths a CPU may actually take, none of which changes what
# the run computes, only how the kernels round.
VARIANT_ENV: dict[str, dict[str, str | None]] = {
    "native": {"ONEDNN_MAX_CPU_ISA": None, "MKL_CBWR": None},
    "portable": dict(PORTABLE_ENV),
    "avx512": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE", "MKL_CBWR": "AVX512,STRICT"},
    "avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2,STRICT"},
}


class NumericsError(FlannelError):
    """The numerics a run asked for are not the numerics it would get (too late, or this CPU lacks them)."""


# --- probing the CPU libraries ---------------------------------------------------------------------


@dataclass(frozen=True)
class CpuProbe:
    """What oneDNN and MKL reported while running the probe computation, and its output bits."""

    onednn_isa: str  # ISA suffix of the bf16 matmul implementation oneDNN dispatched ('' if none ran)
    onednn_max_isa: str  # oneDNN's own description of the ISA it may use ('' if it printed none)
    mkl_arch: str  # MKL's description of the code path it dispatches ('' without MKL)
    mkl_cnr: str  # MKL's CNR mode as it reports it per call: 'OFF', 'AVX2,STRICT', ... ('' without MKL)
    digest: str  # blake2b of the probe's outputs (16 hex): equal digests, equal kernels on these shapes

    def to_json(self) -> dict[str, str]:
        return asdict(self)


_IMPL = re.compile(r"onednn_verbose,(?:v\d+,)?primitive,exec,cpu,matmul,([^,]+),")
_MAX_ISA = re.compile(r"onednn_verbose,(?:v\d+,)?info,cpu,isa:(.*)")
_MKL_HEADER = re.compile(r"MKL_VERBOSE (?:oneMKL|Intel\(R\) MKL)[^\n]*? for (.*)")
_MKL_CNR = re.compile(r"MKL_VERBOSE \S+\(.*\) .* CNR:(\S+)")


def parse_probe_log(text: str, digest: str = "") -> CpuProbe:
    """A CpuProbe from the verbose lines oneDNN and MKL printed (pure: unit-tested on recorded logs)."""
    impls = [m.group(1) for m in _IMPL.finditer(text)]
    isa = ""
    for impl in impls:  # e.g. 'brg_matmul:avx10_1_512_amx', 'gemm:jit:bf16'
        if ":" in impl:
            isa = impl.split(":", 1)[1]
            break
        isa = impl
    max_isa = _MAX_ISA.search(text)
    header = _MKL_HEADER.search(text)
    cnr = _MKL_CNR.search(text)
    return CpuProbe(onednn_isa=isa, onednn_max_isa=max_isa.group(1).strip().replace("Intel ", "") if max_isa else "",
                    mkl_arch=_compact_mkl_arch(header.group(1)) if header else "", mkl_cnr=cnr.group(1) if cnr else "",
                    digest=digest)


def _compact_mkl_arch(text: str) -> str:
    """'Intel(R) 64 architecture Intel(R) Advanced Vector Extensions 512 (Intel(R) AVX-512) with ... Intel(R)
    Advanced Matrix Extensions (Intel(R) AMX) ..., Lnx 2.60GHz lp64 gnu_thread' -> 'AVX-512, AMX': the
    instruction sets MKL names in parentheses (the whole text, shortened, when it names none)."""
    names = re.findall(r"\((?:Intel\(R\) )?([A-Z][A-Z0-9.-]+)\)", text)
    if names:
        return ", ".join(dict.fromkeys(names))
    return text.split(", Lnx", 1)[0].replace("Intel(R) ", "")[:80]


def _probe_compute() -> bytes:
    """The probe: the kernel families a bf16 training step of the model runs, on small fixed inputs."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(20251130)
    a = torch.randn(64, 256, generator=g).to(torch.bfloat16)
    b = torch.randn(256, 96, generator=g).to(torch.bfloat16)
    mm = a @ b  # oneDNN bf16 matmul (nn.Linear, the LM head)
    q, k, v = (torch.randn(1, 2, 128, 32, generator=g).to(torch.bfloat16).requires_grad_() for _ in range(3))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # flash attention (oneDNN brgemm on AMX)
    weight = torch.randn(out.shape, generator=g)
    (out.float() * weight).sum().backward()  # SDPA backward: MKL's bf16 GEMM
    h = hashlib.blake2b(digest_size=8)
    for t in (mm, out, q.grad, k.grad, v.grad):
        h.update(t.detach().contiguous().view(torch.int16).numpy().tobytes())
    return h.hexdigest().encode()


@contextlib.contextmanager
def _stdout_to(path_fd: int) -> Iterator[None]:
    """Send file descriptor 1 (where oneDNN and MKL print their verbose lines) to `path_fd`."""
    libc = ctypes.CDLL(None)
    sys.stdout.flush()
    libc.fflush(None)
    saved = os.dup(1)
    os.dup2(path_fd, 1)
    try:
        yield
    finally:
        libc.fflush(None)
        os.dup2(saved, 1)
        os.close(saved)


@functools.lru_cache(maxsize=1)
def probe_cpu() -> CpuProbe:
    """Run the probe once per process (on one thread) and report what the libraries dispatched.

    The libraries fix their code paths at their first call: this result holds for the whole process.
    """
    import torch

    mkldnn_verbose = torch.backends.mkldnn.verbose if torch.backends.mkldnn.is_available() else None
    mkl_verbose = torch.backends.mkl.verbose if torch.backends.mkl.is_available() else None
    with tempfile.TemporaryFile() as log:
        with contextlib.ExitStack() as stack:
            stack.enter_context(_stdout_to(log.fileno()))
            stack.enter_context(torch_threads(1))
            if mkldnn_verbose is not None:
                stack.enter_context(mkldnn_verbose(torch.backends.mkldnn.VERBOSE_ON))
            if mkl_verbose is not None:
                stack.enter_context(mkl_verbose(torch.backends.mkl.VERBOSE_ON))
            digest = _probe_compute().decode()
        log.seek(0)
        text = log.read().decode("utf-8", errors="replace")
    return parse_probe_log(text, digest)


# --- naming ------------------------------------------------------------------------------------------


def onednn_short(isa: str, max_isa: str = "") -> str:
    """'avx10_1_512_amx' -> 'amx', 'avx512_core_bf16' -> 'avx512bf16', 'avx512_core' -> 'avx512', ...

    An implementation that does not name its ISA ('gemm:jit:bf16') is named by oneDNN's reported
    maximum ISA; no oneDNN matmul at all (torch keeps bf16 matmuls off oneDNN on CPUs without AVX-512)
    is 'nodnn'.
    """
    s = isa.lower()
    if not s:
        return "nodnn"
    if not any(tag in s for tag in ("amx", "avx", "sse")) and max_isa:
        m = max_isa.upper()
        s = ("amx" if "AMX" in m else "avx512_bf16" if "BFLOAT16" in m and "AVX-512" in m else
             "avx10" if "AVX10" in m else "avx512" if "AVX-512" in m else "avx2" if "AVX2" in m else s)
    if "amx" in s:
        return "amx"
    if "bf16" in s and ("avx512" in s or "avx10" in s):
        return "avx512bf16"
    if "avx10" in s:
        return "avx10"
    if "avx512" in s:
        return "avx512vnni" if "vnni" in s else "avx512"
    if "avx2" in s:
        return "avx2vnni" if "vnni" in s else "avx2"
    return _slug(s) or "unknown"


def mkl_short(arch: str, cnr: str) -> str:
    """MKL's effective code path: the CNR branch when one is pinned, else the ISA it dispatches by.

    'AVX2,STRICT' -> 'avx2strict'; 'OFF' with an AMX header -> 'amx'. MKL falls back to its AUTO branch
    on a CPU that lacks the pinned one (and on non-Intel CPUs), so AUTO is named by the header too.
    """
    if not arch and not cnr:
        return "nomkl"
    parts = [p.strip().upper() for p in cnr.split(",") if p.strip()] if cnr else []
    strict = "STRICT" in parts
    branch = next((p.removeprefix("BRANCH=") for p in parts if p not in ("STRICT", "OFF")), "")
    if branch and branch != "AUTO":
        name = {"COMPATIBLE": "compat"}.get(branch, _slug(branch.lower()))
    else:
        a = arch.upper()
        if "AMX" in a:
            name = "amx"
        elif "AVX-512" in a or "AVX512" in a:
            name = "avx512"
        elif "AVX2" in a:
            name = "avx2"
        elif "ADVANCED VECTOR EXTENSIONS" in a or "AVX" in a:
            name = "avx"
        elif "SSE" in a:
            name = "sse"
        else:
            name = "unknown"
    return name + ("strict" if strict else "")


def _slug(text: str) -> str:
    """Lowercase letters, digits and '_' only (no '-', which separates the parts of a class, and no '.')."""
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def cpu_class(probe: CpuProbe, threads: int) -> str:
    mkl = mkl_short(probe.mkl_arch, probe.mkl_cnr)
    return f"cpu-{onednn_short(probe.onednn_isa, probe.onednn_max_isa)}-{mkl if mkl == 'nomkl' else 'mkl' + mkl}-t{threads}"


def cuda_class(info: Mapping[str, Any], deterministic: bool) -> str:
    """From a device description (determinism.device_description): GPU model, compute capability,
    CUDA, cuBLAS and cuDNN versions, and the deterministic flag."""
    parts = ["cuda", _slug(str(info.get("name", "unknown"))) or "unknown"]
    cap = str(info.get("capability", ""))
    if cap:
        parts.append("sm" + cap.replace(".", ""))
    for key in ("cuda", "cublas", "cudnn"):
        value = info.get(key)
        if value not in (None, "", "None"):
            parts.append(key + _slug(str(value)))
    parts.append("det1" if deterministic else "det0")
    return "-".join(parts)


def mps_class(info: Mapping[str, Any]) -> str:
    parts = ["mps", _slug(str(info.get("chip") or info.get("name") or "apple")) or "apple"]
    if info.get("macos"):
        parts.append("macos" + _slug(str(info["macos"])))
    return "-".join(parts)


def class_kind(numerics_class: str) -> str:
    """'cpu-amx-mklamx-t1' -> 'cpu'; a bare device class ('cuda') is its own kind."""
    return numerics_class.split("-", 1)[0]


# --- the class of this process -----------------------------------------------------------------------


def numerics_info(device: str, *, threads: int, deterministic: bool, mode: str = "native") -> dict[str, Any]:
    """The numerics class of a run on `device` in this process, with what it was derived from.

    Recorded in every artifact's environment (`env["numerics"]`) and part of the run key.
    """
    kind = parse_device(device).kind
    info: dict[str, Any] = {"mode": mode}
    if kind == "cpu":
        probe = probe_cpu()
        info.update({"class": cpu_class(probe, threads), "probe": probe.to_json(),
                     "env": {k: os.environ[k] for k in NUMERICS_ENV if k in os.environ}})
    elif kind == "cuda":
        info["class"] = cuda_class(device_description(device), deterministic)
    else:
        info["class"] = mps_class(device_description(device))
    return info


def cpu_vendor() -> str | None:
    """/proc/cpuinfo's vendor_id ('GenuineIntel', 'AuthenticAMD'), None where there is none."""
    return cpuinfo_field("vendor_id")


def cpu_has(flag: str) -> bool | None:
    """Whether /proc/cpuinfo lists `flag` (None where there is no /proc/cpuinfo)."""
    flags = cpuinfo_field("flags")
    return None if flags is None else flag in flags.split()


def arrange(mode: str) -> None:
    """Put `mode`'s settings into this process's environment (they take effect only if oneDNN and MKL
    have not started yet: see `check`). 'native' changes nothing. A conflicting value already in the
    environment is an error, never silently overridden."""
    if mode not in MODES:
        raise NumericsError(f"numerics: expected one of {', '.join(MODES)}, got {mode!r}.")
    if mode == "native":
        return
    for key, value in PORTABLE_ENV.items():
        current = os.environ.get(key)
        if current not in (None, "", value):
            raise NumericsError(f"portable numerics needs {key}={value}, but the environment has {key}={current}. "
                                f"Unset {key} (or use numerics = 'native' to keep your setting).")
        os.environ[key] = value


def check(mode: str, device: str = "cpu") -> None:
    """Refuse a run whose requested numerics did not take effect in this process.

    Portable mode on CPU must find oneDNN dispatching AVX-512 BF16 kernels and MKL in strict CNR mode.
    Otherwise either this CPU lacks AVX-512 BF16, or the libraries started before the settings were
    in place (they read them once); both are errors, never a silent change of arithmetic.
    """
    if mode != "portable" or parse_device(device).kind != "cpu":
        return
    probe = probe_cpu()
    got_dnn, got_mkl = onednn_short(probe.onednn_isa, probe.onednn_max_isa), mkl_short(probe.mkl_arch, probe.mkl_cnr)
    # MKL pins a CNR branch on Intel CPUs only; elsewhere it documents a fallback to its AUTO branch.
    # There the class records whatever MKL reports, and a class that differs is compared tolerantly.
    mkl_ok = got_mkl.endswith("strict") or got_mkl == "nomkl" or cpu_vendor() not in ("GenuineIntel", None)
    if got_dnn == PORTABLE_ONEDNN and mkl_ok:
        return
    if cpu_has("avx512_bf16") is False:
        raise NumericsError(
            f"portable numerics pins oneDNN's bf16 kernels to AVX-512 BF16, which this CPU ({cpu_name()}) lacks "
            f"(no avx512_bf16 in /proc/cpuinfo): its matmuls run {probe.onednn_isa or 'no oneDNN kernel'} and would "
            "give other bits. Use numerics = 'native' here; its class differs, so compare with the portable "
            "snapshots through a tolerant comparison (--flannel-missing-class=tolerant).")
    pinned = ", ".join(f"{k}={v}" for k, v in PORTABLE_ENV.items())
    raise NumericsError(
        f"portable numerics did not take effect: oneDNN runs {probe.onednn_isa or '(nothing)'} (expected "
        f"avx512_core_bf16) and MKL reports CNR {probe.mkl_cnr or '(none)'} (expected AVX2,STRICT). oneDNN and MKL "
        f"read {pinned} once, at their first call, and this process had already run a bf16 matmul before they "
        "were set. Set them in the environment before starting Python, run under the pytest plugin "
        "(--flannel-numerics=portable arranges them at start-up), or call flannel_repro.numerics.arrange('portable') "
        "before any torch computation.")


def apply(mode: str, device: str = "cpu") -> None:
    """Arrange `mode` if it is not in place yet, then check that it took effect (NumericsError if not)."""
    arrange(mode)
    check(mode, device)


def machine_line() -> str:
    """One line naming the CPU and whether it has AMX, for results and notes."""
    amx = cpu_has("amx_bf16")
    return f"{cpu_name()} ({'with' if amx else 'without'} AMX{'' if amx is not None else '?'}, {platform.machine()})"
