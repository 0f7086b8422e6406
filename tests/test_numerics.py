"""Numerics classes: naming from probed kernels (with faked logs and CPU features), the run key,
portable mode arranged before first use and refused when too late (subprocesses)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

from flannel_repro.training import numerics
from flannel_repro.config import RunConfig
from flannel_repro.training.numerics import (
    NumericsError,
    cpu_class,
    cuda_class,
    mps_class,
    mkl_short,
    onednn_short,
    parse_probe_log,
)

# Verbose lines as oneDNN 3.12 and oneMKL 2024.0 print them (abridged to the parts the parser reads).
INTEL_NATIVE = """\
onednn_verbose,v1,info,cpu,isa:Intel AVX10.1 and Intel AMX with bfloat16 and 8-bit integer support
onednn_verbose,v1,primitive,exec,cpu,matmul,brg_matmul:avx10_1_512_amx,undef,src:bf16::blocked:ab::f0,,64x256:256x96,0.01
MKL_VERBOSE oneMKL 2024.0 Update 2 Product build 20240605 for Intel(R) 64 architecture Intel(R) Advanced Vector \
Extensions 512 (Intel(R) AVX-512) with support for INT8, BF16, FP16 (limited) instructions, and Intel(R) Advanced \
Matrix Extensions (Intel(R) AMX) with INT8 and BF16, Lnx 2.60GHz lp64 gnu_thread
MKL_VERBOSE GEMM_BF16BF16F32(T,N,128,32,32,0x1,0x2,32,0x3,32,0x4,0x5,128) 674.80us CNR:OFF Dyn:0 FastMM:1 TID:0  NThr:1
"""
INTEL_PORTABLE = """\
onednn_verbose,v1,info,cpu,isa:Intel AVX-512 with Intel DL Boost and bfloat16 support
onednn_verbose,v1,primitive,exec,cpu,matmul,brg_matmul:avx512_core_bf16,undef,src:bf16::blocked:ab::f0,,64x256:256x96,0.01
MKL_VERBOSE oneMKL 2024.0 Update 2 Product build 20240605 for Intel(R) 64 architecture Intel(R) Advanced Vector \
Extensions 2 (Intel(R) AVX2) enabled processors, Lnx 2.60GHz lp64 gnu_thread
MKL_VERBOSE GEMM_BF16BF16F32(N,N,32,32,128,0x1,0x2,32,0x3,128,0x4,0x5,32) 13.38us CNR:AVX2,STRICT Dyn:0 FastMM:1 TID:0  NThr:1
"""
# An AMD EPYC in portable mode as MKL documents it: branches other than AUTO/COMPATIBLE are Intel-only,
# so MKL falls back to AUTO (its AVX2 dispatch on this CPU), still strict.
AMD_PORTABLE = INTEL_PORTABLE.replace("CNR:AVX2,STRICT", "CNR:AUTO,STRICT")
AVX512_NO_BF16 = """\
onednn_verbose,v1,info,cpu,isa:Intel AVX-512 with Intel DL Boost
onednn_verbose,v1,primitive,exec,cpu,matmul,gemm:jit:bf16,undef,src:bf16::blocked:ab::f0,,64x64:64x64,0.01
"""


def _probe(
    log: str = "", digest: str = "3f09a1c2deadbeef", *, aten: str = "AVX512", mode: str = "native", threads: int = 1
) -> numerics.CpuProbe:
    p = parse_probe_log(log, digest)
    return numerics.CpuProbe(**{**p.to_json(), "aten": aten, "mode": mode, "threads": threads})


@pytest.mark.parametrize(
    "probe, expected",
    [
        (_probe(INTEL_NATIVE), "cpu-native_avx512_amx-3f09a1c2-t1"),
        (_probe(INTEL_PORTABLE, mode="avx512bf16"), "cpu-avx512bf16-3f09a1c2-t1"),
        # the same arithmetic on AMD, whose MKL reports another branch: one name (from the digest, not the label)
        (_probe(AMD_PORTABLE, mode="avx512bf16"), "cpu-avx512bf16-3f09a1c2-t1"),
        (_probe("", aten="AVX2", mode="portable", threads=2), "cpu-portable-3f09a1c2-t2"),
        (_probe(AVX512_NO_BF16), "cpu-native_avx512_avx512-3f09a1c2-t1"),
        (_probe("", aten="AVX2"), "cpu-native_avx2_nodnn-3f09a1c2-t1"),
        # other bits, other name, whatever the libraries say
        (_probe(INTEL_PORTABLE, digest="0badc0de00000000", mode="avx512bf16"), "cpu-avx512bf16-0badc0de-t1"),
    ],
)
def test_class_from_mode_and_probe_digest(probe, expected):
    assert cpu_class(probe) == expected


def test_probe_log_fields():
    p = parse_probe_log(INTEL_NATIVE, "abc")
    assert p.onednn_isa == "avx10_1_512_amx" and p.mkl_cnr == "OFF" and p.digest == "abc"
    assert p.mkl_arch == "AVX-512, AMX" and parse_probe_log(INTEL_PORTABLE).mkl_arch == "AVX2"
    assert p.onednn_max_isa == "AVX10.1 and AMX with bfloat16 and 8-bit integer support"


@pytest.mark.parametrize(
    "isa, max_isa, short",
    [
        ("avx512_core_amx", "", "amx"),
        ("avx10_1_512_amx", "", "amx"),
        ("avx512_core_bf16", "", "avx512bf16"),
        ("avx512_core", "", "avx512"),
        ("avx512_core_vnni", "", "avx512vnni"),
        ("avx2", "", "avx2"),
        ("avx2_vnni_2", "", "avx2vnni"),
        ("jit:bf16", "Intel AVX2", "avx2"),
        ("", "", "nodnn"),
    ],
)
def test_onednn_short_names(isa, max_isa, short):
    assert onednn_short(isa, max_isa) == short


@pytest.mark.parametrize(
    "arch, cnr, short",
    [
        ("Intel(R) AMX with INT8 and BF16", "OFF", "amx"),
        ("(Intel(R) AVX-512) with support", "OFF", "avx512"),
        ("Intel(R) AVX2 enabled processors", "OFF", "avx2"),
        ("anything", "AVX2,STRICT", "avx2strict"),
        ("anything", "AVX512", "avx512"),
        ("x", "COMPATIBLE", "compat"),
        ("Intel(R) AVX2", "AUTO,STRICT", "avx2strict"),
        ("", "", "nomkl"),
    ],
)
def test_mkl_short_names(arch, cnr, short):
    assert mkl_short(arch, cnr) == short


def test_gpu_class_names_carry_what_decides_the_bits_and_no_dots():
    info = {"name": "NVIDIA H200", "capability": "9.0", "cuda": "12.8", "cublas": "12.8.4.1", "cudnn": "91002"}
    assert cuda_class(info, deterministic=True) == "cuda-nvidia_h200-sm90-cuda12_8-cublas12_8_4_1-cudnn91002-det1"
    assert cuda_class({**info, "cublas": None}, deterministic=False) == "cuda-nvidia_h200-sm90-cuda12_8-cudnn91002-det0"
    assert mps_class({"chip": "Apple M2 Pro", "macos": "14.5"}) == "mps-apple_m2_pro-macos14_5"
    for name in (cuda_class(info, True), mps_class({}), cpu_class(_probe(INTEL_NATIVE, threads=8))):
        assert "." not in name and " " not in name


def _fake_probe(monkeypatch, log: str, flags: dict[str, bool | None], aten: str = "AVX512") -> None:
    monkeypatch.setattr(numerics, "probe_cpu", lambda threads, mode: _probe(log, aten=aten, mode=mode))
    monkeypatch.setattr(numerics, "cpu_has", lambda flag: flags.get(flag))
    monkeypatch.setattr(numerics.platform, "machine", lambda: "x86_64")


def test_check_refuses_a_mode_the_cpu_cannot_run(monkeypatch):
    _fake_probe(monkeypatch, AVX512_NO_BF16, {"avx512_bf16": False, "avx2": True})
    with pytest.raises(
        NumericsError, match="avx512bf16 numerics needs an x86-64 CPU with AVX-512 BF16, which this CPU"
    ):
        numerics.check("avx512bf16")
    numerics.check("native")  # native takes whatever the CPU has
    numerics.check("avx512bf16", "cuda")  # the modes pin CPU libraries only
    _fake_probe(monkeypatch, "", {"avx2": False})
    with pytest.raises(NumericsError, match="portable numerics needs an x86-64 CPU with AVX2.*Use numerics = 'native'"):
        numerics.check("portable")
    monkeypatch.setattr(numerics.platform, "machine", lambda: "aarch64")  # ARM: no x86 kernels to pin
    with pytest.raises(NumericsError, match="needs an x86-64 CPU with AVX2"):
        numerics.check("portable")


def test_check_says_too_late_when_the_cpu_has_it_but_the_libraries_started_first(monkeypatch):
    _fake_probe(monkeypatch, INTEL_NATIVE, {"avx512_bf16": True, "avx2": True})
    with pytest.raises(NumericsError, match="did not take effect: ATen runs AVX512 .* matmul runs avx10_1_512_amx"):
        numerics.check("avx512bf16")
    # portable: ATen at AVX512 where AVX2 was pinned is too late, whatever oneDNN did
    _fake_probe(monkeypatch, "", {"avx2": True}, aten="AVX512")
    with pytest.raises(NumericsError, match="did not take effect: ATen runs AVX512 \\(expected AVX2\\)"):
        numerics.check("portable")


def test_check_accepts_the_modes_as_intel_and_amd_report_them(monkeypatch):
    for log in (INTEL_PORTABLE, AMD_PORTABLE):
        _fake_probe(monkeypatch, log, {"avx512_bf16": True, "avx2": True})
        numerics.check("avx512bf16")
    # portable runs no oneDNN bf16 matmul at all (explicit products), at ATen AVX2
    _fake_probe(monkeypatch, AMD_PORTABLE.split("\n", 2)[2], {"avx2": True}, aten="AVX2")
    numerics.check("portable")
    # MKL pins branches on Intel CPUs only: elsewhere whatever it reports is accepted (the digest names the class)
    amd_unpinned = INTEL_PORTABLE.replace("CNR:AVX2,STRICT", "CNR:OFF")
    _fake_probe(monkeypatch, amd_unpinned, {"avx512_bf16": True})
    monkeypatch.setattr(numerics, "cpu_vendor", lambda: "AuthenticAMD")
    numerics.check("avx512bf16")
    monkeypatch.setattr(numerics, "cpu_vendor", lambda: "GenuineIntel")
    with pytest.raises(NumericsError, match="did not take effect"):
        numerics.check("avx512bf16")


def test_arrange_sets_the_environment_and_never_overrides_a_conflicting_value(monkeypatch):
    for key in numerics.PORTABLE_ENV:
        monkeypatch.delenv(key, raising=False)
    numerics.arrange("native")
    assert all(k not in os.environ for k in numerics.PORTABLE_ENV)
    numerics.arrange("portable")
    assert {k: os.environ[k] for k in numerics.PORTABLE_ENV} == numerics.PORTABLE_ENV
    monkeypatch.setenv("MKL_CBWR", "COMPATIBLE")
    with pytest.raises(NumericsError, match="needs MKL_CBWR=AVX2,STRICT, but the environment has MKL_CBWR=COMPATIBLE"):
        numerics.arrange("portable")
    monkeypatch.delenv("MKL_CBWR")
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "AVX2")  # the same value in another case is no conflict
    numerics.arrange("portable")
    with pytest.raises(NumericsError, match="avx512bf16 numerics needs ATEN_CPU_CAPABILITY=avx512"):
        numerics.arrange("avx512bf16")
    with pytest.raises(NumericsError, match="expected one of native, portable, avx512bf16, got 'fast'"):
        numerics.arrange("fast")


def test_config_field_is_validated_and_not_in_the_fingerprint():
    from flannel_repro.errors import ConfigError

    assert RunConfig(numerics="portable").fingerprint() == RunConfig().fingerprint()
    assert RunConfig(numerics="avx512bf16").fingerprint() == RunConfig().fingerprint()
    with pytest.raises(ConfigError, match="'numerics' must be one of 'native', 'portable', 'avx512bf16'"):
        RunConfig(numerics="fast")


def test_run_key_changes_with_the_numerics_class(monkeypatch):
    from flannel_repro.runs import store

    def fake(name):
        return lambda device, **kw: {"class": name, "mode": "native", "probe": {"digest": "0"}}

    cfg = RunConfig(steps=2)
    monkeypatch.setattr(numerics, "numerics_info", fake("cpu-native_avx512_amx-3f09a1c2-t1"))
    amx = store.run_key_material(cfg, {"corpus": "x"}, 0)
    monkeypatch.setattr(numerics, "numerics_info", fake("cpu-portable-0badc0de-t1"))
    portable = store.run_key_material(cfg, {"corpus": "x"}, 0)
    assert amx["numerics"]["class"] == "cpu-native_avx512_amx-3f09a1c2-t1"
    assert store.key_of(amx) != store.key_of(portable)


# --- real processes: the libraries read their settings once ----------------------------------------------

TRAIN = """
import json, sys
from pathlib import Path
{before}
from flannel_repro.config import RunConfig
from flannel_repro.training.harness import train
from flannel_repro.analysis.trajectory import Trajectory
cfg = RunConfig(dataset="tiny", vocab_size=512, steps=2, batch_size=4, seq_len=32, threads=1, numerics="portable")
out = Path(sys.argv[1]) / "run.safetensors"
try:
    train(cfg, out)
except Exception as exc:
    print(json.dumps({{"error": type(exc).__name__, "message": str(exc)}}))
    raise SystemExit(0)
print(json.dumps({{"numerics": Trajectory(out).env["numerics"]}}))
"""
TOO_EARLY = """
import torch
x = torch.randn(64, 64).to(torch.bfloat16)
x @ x   # oneDNN and MKL start here, with whatever the environment says
"""


def _run_in_clean_process(tmp_path, before: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in numerics.PORTABLE_ENV}
    script = tmp_path / "train.py"
    script.write_text(TRAIN.format(before=textwrap.dedent(before)))
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_train_arranges_portable_mode_before_first_use(tmp_path):
    got = _run_in_clean_process(tmp_path, "")
    assert "error" not in got, got
    info = got["numerics"]
    assert info["mode"] == "portable" and info["env"] == numerics.PORTABLE_ENV
    assert info["probe"]["aten"] == "AVX2" and info["probe"]["onednn_isa"] == ""  # no oneDNN bf16 kernel ran
    assert re.fullmatch(r"cpu-portable-[0-9a-f]{8}-t1", info["class"])
    if numerics.cpu_vendor() == "GenuineIntel":  # MKL pins its branch on Intel CPUs only (documented)
        assert info["probe"]["mkl_cnr"] == "AVX2,STRICT"


def test_train_refuses_portable_mode_when_too_late(tmp_path):
    """ATen fixes its capability at its first dispatch: a process that computed before the pins refuses."""
    got = _run_in_clean_process(tmp_path, TOO_EARLY)
    assert got.get("error") == "NumericsError", got
    if numerics.cpu_has("avx2") is False:
        assert "lacks" in got["message"]
    else:
        assert "did not take effect" in got["message"] and "before any torch computation" in got["message"]
    assert not (tmp_path / "run.safetensors").exists()  # nothing half-written is left behind


PROBE_CLASS = """
import json, sys
from flannel_repro.training import numerics
mode = sys.argv[1]
numerics.apply(mode)
print(json.dumps(numerics.numerics_info("cpu", threads=1, deterministic=False, mode=mode)))
"""


def _class_in_process(mode: str, env_extra: dict[str, str]) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in numerics.NUMERICS_ENV}
    env.update(env_extra)
    proc = subprocess.run(
        [sys.executable, "-c", PROBE_CLASS, mode], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(
    numerics.cpu_has("avx512f") is not True, reason="needs an AVX-512 CPU to run ATen at two capabilities"
)
def test_the_probe_separates_aten_capabilities_and_portable_ignores_them():
    """Issue 21, item 3: ATen at AVX512 and at AVX2 compute other bits, and the probe (a training step) tells
    them apart; in portable mode ATen is pinned, so setting its capability to AVX2 changes nothing."""
    wide = _class_in_process("native", {})
    narrow = _class_in_process("native", {"ATEN_CPU_CAPABILITY": "avx2"})
    assert wide["probe"]["aten"] == "AVX512" and narrow["probe"]["aten"] == "AVX2"
    assert wide["class"] != narrow["class"] and wide["probe"]["digest"] != narrow["probe"]["digest"]
    portable = _class_in_process("portable", {})
    assert _class_in_process("portable", {"ATEN_CPU_CAPABILITY": "avx2"})["class"] == portable["class"]
    # and oneDNN's ISA does not enter portable arithmetic at all
    assert _class_in_process("portable", {"ONEDNN_MAX_CPU_ISA": "AVX2"})["class"] == portable["class"]
