"""Numerics classes: what decides a CPU run's bits, measured, and the modes that pin it.

"cpu" is not one arithmetic. On CPU the bits of a bf16 training step are decided by

* ATen's CPU capability (AVX512 / AVX2 / DEFAULT): its own kernels (layer norm, softmax, GELU's tanh,
  the reductions, the optimizer's foreach ops) are compiled once per capability and chosen at start-up;
* the ISA of oneDNN's bf16 matmul kernels (AMX tiles, AVX-512 BF16 dot products, or a slow AVX2 path);
* MKL's code path (its bf16 GEMM in SDPA's backward, and every float32 GEMM);
* the thread count (how the reductions are split).

**The class is measured.** Each process runs a probe once per thread count: two bf16 training steps of
a small GPT-2 (embedding, layer norm, the attention and MLP products, SDPA, GELU, the loss, clipping,
AdamW), in the mode's arithmetic, and hashes every gradient and parameter into the probe digest. The
class name is the mode, that digest and the thread count: ``cpu-portable-3f09a1c2-t1``. Two processes
that compute the probe to the same bits get one name, on Intel and AMD alike; two that do not get two
names, whatever the libraries report about themselves. What the libraries report (oneDNN's ISA, MKL's
branch, ATen's capability) is recorded beside the class, for the reader.

**Modes** (config field ``numerics``):

* ``native``: nothing pinned; this CPU's fastest kernels. The class is named ``cpu-native_<aten>_<onednn>-...``.
* ``portable`` (every x86-64 CPU with AVX2: Intel since Haswell, AMD since Zen 1): ATen pinned to AVX2
  (``ATEN_CPU_CAPABILITY``), oneDNN capped at AVX2 and MKL at its strict AVX2 branch, and every bf16
  product computed as a float32 GEMM with the rounding written out (`training.explicit`), so no
  oneDNN bf16 kernel, whose choice of instructions would decide the bits, is ever called.
* ``avx512bf16`` (the faster class for servers with AVX-512 BF16: Intel Cooper Lake and later, AMD
  Zen 4 and later): ATen at AVX512, oneDNN's bf16 kernels at AVX-512 BF16 (never AMX), MKL strict AVX2.

The libraries read these settings once, at their first call, so they must be in the environment
before the process's first torch computation: the pytest plugin sets them at configure time (xdist
workers inherit them), and `train()` sets them when nothing has run yet and otherwise refuses
(`NumericsError`), as it refuses a mode the CPU cannot run.
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
from flannel_repro.errors import NumericsError
from flannel_repro.training.determinism import cpu_name, cpuinfo_field, device_description, torch_threads

MODES = NUMERICS  # the config field's choices: one source
# What each pinned mode sets. ATen reads ATEN_CPU_CAPABILITY at its first dispatch, oneDNN reads
# ONEDNN_MAX_CPU_ISA at its first primitive, MKL reads MKL_CBWR at its first call.
PINS: dict[str, dict[str, str]] = {
    # every x86-64 CPU with AVX2; bf16 products never reach oneDNN (training.explicit), which is capped anyway.
    # MKL honours a CNR branch on Intel CPUs; on AMD it keeps its AUTO branch (strict), measured to give the
    # same bits on Zen 4 with the AVX2, AVX512 and unset branches (COMPATIBLE alone differs, at half the speed).
    "portable": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2,STRICT"},
    # AVX-512 BF16 servers: oneDNN's AVX-512 BF16 kernels, which Intel (Cooper Lake on) and AMD (Zen 4 on) both
    # run (AMX would otherwise win on Intel); MKL's AVX2 branch, strict (without STRICT it parted at step 5).
    "avx512bf16": {
        "ATEN_CPU_CAPABILITY": "avx512",
        "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16",
        "MKL_CBWR": "AVX2,STRICT",
    },
}
PORTABLE_ENV = PINS["portable"]
EXPLICIT_MODES = ("portable",)  # modes whose bf16 products are float32 GEMMs with explicit rounding
EXPECTED_ATEN = {"portable": "AVX2", "avx512bf16": "AVX512"}  # torch.backends.cpu.get_cpu_capability()
REQUIRED_FLAG = {"portable": ("avx2", "AVX2"), "avx512bf16": ("avx512_bf16", "AVX-512 BF16")}  # /proc/cpuinfo, name
NUMERICS_ENV = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_CBWR")  # what steers the CPU kernels (recorded)

# Arithmetic variants for deriving noise bands (analysis.noise, runs.variants): each a mode and an
# environment for a fresh process (None removes the variable). Each is a path some CPU actually takes;
# the capped ones are how an AVX-512 machine runs the kernels of a CPU without AVX-512 (BF16).
_UNPINNED = dict.fromkeys(NUMERICS_ENV)
VARIANT_MODE: dict[str, str] = {
    "native": "native",
    "portable": "portable",
    "avx512bf16": "avx512bf16",
    "avx512": "native",
    "avx2": "native",
}
VARIANT_ENV: dict[str, dict[str, str | None]] = {
    "native": dict(_UNPINNED),
    "portable": dict(PINS["portable"]),
    "avx512bf16": dict(PINS["avx512bf16"]),
    # AVX-512 without BF16 (Cascade Lake, Ice Lake), native kernels
    "avx512": {"ATEN_CPU_CAPABILITY": "avx512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE", "MKL_CBWR": "AVX512,STRICT"},
    # AVX2 only (Zen 3 runners, laptops), native kernels: oneDNN's bf16 path there is ~10x slower
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2,STRICT"},
}


# --- probing the CPU libraries ---------------------------------------------------------------------


@dataclass(frozen=True)
class CpuProbe:
    """What oneDNN and MKL reported while running the probe computation, and its output bits."""

    onednn_isa: str  # ISA suffix of the bf16 matmul implementation oneDNN dispatched ('' if none ran)
    onednn_max_isa: str  # oneDNN's own description of the ISA it may use ('' if it printed none)
    mkl_arch: str  # MKL's description of the code path it dispatches ('' without MKL)
    mkl_cnr: str  # MKL's CNR mode as it reports it per call: 'OFF', 'AVX2,STRICT', ... ('' without MKL)
    digest: str  # blake2b of the probe's outputs (16 hex): equal digests, equal arithmetic of a training step
    aten: str = ""  # ATen's CPU capability in force ('AVX512', 'AVX2', 'DEFAULT', ...)
    mode: str = "native"  # the numerics mode the probe ran in (its arithmetic: explicit products or not)
    threads: int = 1  # the thread count it ran at

    def to_json(self) -> dict[str, Any]:
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
    return CpuProbe(
        onednn_isa=isa,
        onednn_max_isa=max_isa.group(1).strip().replace("Intel ", "") if max_isa else "",
        mkl_arch=_compact_mkl_arch(header.group(1)) if header else "",
        mkl_cnr=cnr.group(1) if cnr else "",
        digest=digest,
    )


def _compact_mkl_arch(text: str) -> str:
    """'Intel(R) 64 architecture Intel(R) Advanced Vector Extensions 512 (Intel(R) AVX-512) with ... Intel(R)
    Advanced Matrix Extensions (Intel(R) AMX) ..., Lnx 2.60GHz lp64 gnu_thread' -> 'AVX-512, AMX': the
    instruction sets MKL names in parentheses (the whole text, shortened, when it names none)."""
    names = re.findall(r"\((?:Intel\(R\) )?([A-Z][A-Z0-9.-]+)\)", text)
    if names:
        return ", ".join(dict.fromkeys(names))
    return text.split(", Lnx", 1)[0].replace("Intel(R) ", "")[:80]


PROBE_SEED = 20251204


def _probe_compute(mode: str) -> str:
    """The probe: two bf16 training steps of a small GPT-2, as the harness trains (bf16 parameters under
    bf16 autocast, the model's own loss, gradient clipping, AdamW), on fixed inputs; the blake2b of every
    gradient, every updated parameter and the losses. It covers each kernel family a step runs: the
    embedding and its backward, layer norm, the attention and MLP products (Conv1D's addmm), SDPA forward
    and backward, GELU's tanh, log-softmax and cross-entropy, the norms of clipping, the foreach AdamW
    update. Hidden width 64, 2 heads and 128 positions are the notebook's, so the products and the
    attention take the shapes' code paths; the vocabulary is smaller (4096) to keep it quick."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    config = GPT2Config(
        vocab_size=4096,
        n_positions=128,
        n_embd=64,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
    )
    h = hashlib.blake2b(digest_size=8)

    def feed(t: torch.Tensor) -> None:
        t = t.detach().contiguous()
        h.update((t.view(torch.int16) if t.dtype == torch.bfloat16 else t.view(torch.int32)).numpy().tobytes())

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the model's harmless notices (loss_type) are not the caller's business
    try:
        with torch.random.fork_rng(devices=[]):  # the caller's global RNG is left as it was
            torch.manual_seed(PROBE_SEED)
            # transformers' PreTrainedModel.to is functools.wraps'd: typeshed types it as taking the model as argument 1
            model = GPT2LMHeadModel(config).to(torch.bfloat16)  # type: ignore[arg-type]
        g = torch.Generator().manual_seed(PROBE_SEED)
        batches = [torch.randint(0, config.vocab_size, (2, 128), generator=g) for _ in range(2)]
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
        with arithmetic(mode):
            for ids in batches:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                feed(loss.float())
                for p in model.parameters():
                    feed(p.grad)
                optimizer.step()
                optimizer.zero_grad()
        for p in model.parameters():
            feed(p)
    finally:
        hf_logging.set_verbosity(verbosity)
    return h.hexdigest()


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


def probe_cpu(threads: int, mode: str) -> CpuProbe:
    """Run the probe (once per process, thread count and mode) and report what it computed and what the
    libraries said they dispatched. The libraries fix their code paths at their first call, so the result
    holds for the whole process."""
    return _probe_cpu(max(1, int(threads)), mode)


@functools.lru_cache(maxsize=None)
def _probe_cpu(threads: int, mode: str) -> CpuProbe:
    import torch

    mkldnn_verbose = torch.backends.mkldnn.verbose if torch.backends.mkldnn.is_available() else None
    mkl_verbose = torch.backends.mkl.verbose if torch.backends.mkl.is_available() else None
    with tempfile.TemporaryFile() as log:
        with contextlib.ExitStack() as stack:
            stack.enter_context(_stdout_to(log.fileno()))
            stack.enter_context(torch_threads(threads))
            if mkldnn_verbose is not None:
                stack.enter_context(mkldnn_verbose(torch.backends.mkldnn.VERBOSE_ON))
            if mkl_verbose is not None:
                stack.enter_context(mkl_verbose(torch.backends.mkl.VERBOSE_ON))
            digest = _probe_compute(mode)
        log.seek(0)
        text = log.read().decode("utf-8", errors="replace")
    probe = parse_probe_log(text, digest)
    return CpuProbe(**{**probe.to_json(), "aten": aten_capability(), "mode": mode, "threads": threads})


def aten_capability() -> str:
    """ATen's CPU capability in force in this process ('AVX512', 'AVX2', 'DEFAULT', ...; '' if unknown).
    Asking fixes it: ATen computes it once, from the CPU and ATEN_CPU_CAPABILITY."""
    import torch

    getter = getattr(torch.backends.cpu, "get_cpu_capability", None)
    return str(getter()) if getter is not None else ""


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
        s = (
            "amx"
            if "AMX" in m
            else "avx512_bf16"
            if "BFLOAT16" in m and "AVX-512" in m
            else "avx10"
            if "AVX10" in m
            else "avx512"
            if "AVX-512" in m
            else "avx2"
            if "AVX2" in m
            else s
        )
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


def cpu_label(probe: CpuProbe) -> str:
    """The readable part of a CPU class: the pinned mode ('portable', 'avx512bf16'), or for native numerics
    ATen's capability and oneDNN's bf16 ISA as probed ('native_avx512_amx', 'native_avx2_nodnn')."""
    if probe.mode in PINS:
        return probe.mode
    aten = _slug(probe.aten) or "unknown"
    return f"native_{aten}_{onednn_short(probe.onednn_isa, probe.onednn_max_isa)}"


def cpu_class(probe: CpuProbe, threads: int | None = None) -> str:
    """'cpu-<label>-<first 8 hex of the probe digest>-t<threads>': one name per arithmetic, whatever the
    CPU's vendor and whatever its libraries call their code paths."""
    n = probe.threads if threads is None else threads
    return f"cpu-{cpu_label(probe)}-{probe.digest[:8] or 'nodigest'}-t{n}"


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
        probe = probe_cpu(threads, mode)
        info.update(
            {
                "class": cpu_class(probe),
                "probe": probe.to_json(),
                "env": {k: os.environ[k] for k in NUMERICS_ENV if k in os.environ},
            }
        )
    elif kind == "cuda":
        info["class"] = cuda_class(device_description(device), deterministic)
    else:
        info["class"] = mps_class(device_description(device))
    return info


def arithmetic(mode: str, device: str = "cpu") -> contextlib.AbstractContextManager[Any]:
    """The context a run of `mode` computes in: explicit bf16 products for the portable mode on CPU
    (`training.explicit`), nothing otherwise. Engines, replay and the probe all enter it."""
    from flannel_repro.training.explicit import explicit_bf16_matmul

    return explicit_bf16_matmul(mode in EXPLICIT_MODES and parse_device(device).kind == "cpu")


def cpu_vendor() -> str | None:
    """/proc/cpuinfo's vendor_id ('GenuineIntel', 'AuthenticAMD'), None where there is none."""
    return cpuinfo_field("vendor_id")


def cpu_has(flag: str) -> bool | None:
    """Whether /proc/cpuinfo lists `flag` (None where there is no /proc/cpuinfo)."""
    flags = cpuinfo_field("flags")
    return None if flags is None else flag in flags.split()


def arrange(mode: str) -> None:
    """Put `mode`'s settings into this process's environment (they take effect only if ATen, oneDNN and
    MKL have not started yet: see `check`). 'native' changes nothing. A conflicting value already in the
    environment is an error, never silently overridden."""
    if mode not in MODES:
        raise NumericsError(f"numerics: expected one of {', '.join(MODES)}, got {mode!r}.")
    if mode == "native":
        return
    for key, value in PINS[mode].items():
        current = os.environ.get(key)
        if current not in (None, "") and current.lower() != value.lower():
            raise NumericsError(
                f"{mode} numerics needs {key}={value}, but the environment has {key}={current}. "
                f"Unset {key} (or use numerics = 'native' to keep your setting)."
            )
        os.environ[key] = value


def check(mode: str, device: str = "cpu") -> None:
    """Refuse a run whose requested numerics did not take effect in this process.

    A pinned mode must find ATen at its pinned capability, oneDNN's bf16 matmuls (where any run) at the
    pinned ISA, and MKL in strict CNR mode (on Intel; MKL keeps its AUTO branch elsewhere). Otherwise
    either this CPU lacks the instructions, or the libraries started before the settings were in place
    (they read them once); both are errors, never a silent change of arithmetic.
    """
    if mode not in PINS or parse_device(device).kind != "cpu":
        return
    flag, needs = REQUIRED_FLAG[mode]
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86") or cpu_has(flag) is False:
        raise NumericsError(
            f"{mode} numerics needs an x86-64 CPU with {needs}, which this CPU ({cpu_name()}, {platform.machine()}) "
            f"lacks. Use numerics = 'native' here (--flannel-numerics=native): its class differs, so the gate "
            f"compares with the stored snapshots within the measured noise band."
        )
    probe = probe_cpu(1, mode)
    aten = probe.aten.upper()
    dnn = onednn_short(probe.onednn_isa, probe.onednn_max_isa)
    mkl = mkl_short(probe.mkl_arch, probe.mkl_cnr)
    aten_ok = not aten or aten == EXPECTED_ATEN[mode]
    dnn_ok = dnn in (("nodnn", "avx2") if mode == "portable" else ("avx512bf16",))
    # MKL pins a CNR branch on Intel CPUs only; elsewhere it documents a fallback to its AUTO branch, still strict.
    mkl_ok = mkl.endswith("strict") or mkl == "nomkl" or cpu_vendor() not in ("GenuineIntel", None)
    if aten_ok and dnn_ok and mkl_ok:
        return
    pinned = ", ".join(f"{k}={v}" for k, v in PINS[mode].items())
    raise NumericsError(
        f"{mode} numerics did not take effect: ATen runs {aten or '?'} (expected {EXPECTED_ATEN[mode]}), oneDNN's bf16 "
        f"matmul runs {probe.onednn_isa or '(nothing)'} and MKL reports CNR {probe.mkl_cnr or '(none)'} (expected "
        f"{PINS[mode]['MKL_CBWR']}). ATen, oneDNN and MKL read {pinned} once, at their first call, and this process "
        "had already computed with torch before they were set. Set them in the environment before starting Python, "
        f"run under the pytest plugin (--flannel-numerics={mode} arranges them at start-up), or call "
        f"flannel_repro.training.numerics.arrange({mode!r}) before any torch computation."
    )


def apply(mode: str, device: str = "cpu") -> None:
    """Arrange `mode` if it is not in place yet, then check that it took effect (NumericsError if not)."""
    arrange(mode)
    check(mode, device)


def machine_line() -> str:
    """One line naming the CPU and whether it has AMX, for results and notes."""
    amx = cpu_has("amx_bf16")
    return f"{cpu_name()} ({'with' if amx else 'without'} AMX{'' if amx is not None else '?'}, {platform.machine()})"
