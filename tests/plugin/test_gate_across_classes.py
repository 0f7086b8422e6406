"""The repository's gate across numerics classes, at CI scale, on real runs.

The gate's snapshots were written in the portable class. Here seed 42 is trained in this machine's
*native* class (AMX on an Intel Xeon; AVX-512 BF16 with ATen at AVX512 on an AMD EPYC), which has no
snapshot, so the tolerant comparison with the committed noise band (tests/gate/flannel_noise_bands.json)
decides. The band was measured from other arithmetic variants (threads, the AVX-512 BF16 mode, ATen and
oneDNN capped at AVX-512 or AVX2), never from the native class: this is a held-out check. The same run with W_initial moved by one bf16
ulp must fail it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from flannel_repro.training.numerics import NUMERICS_ENV
from tests.plugin.test_gate_catches_one_ulp import ONE_ULP

GATE = Path(__file__).resolve().parents[1] / "gate"
# the class the gate's snapshots were committed in (cpu-portable-<digest>-t1), read from the file name
SNAPSHOT = next(
    (GATE / "__snapshots__" / "test_gate").glob("test_run_summary_did_not_move[[]cpu-seed42[]][[]cpu-portable-*")
).name
PORTABLE_CLASS = SNAPSHOT.rsplit("[", 1)[1].split("]", 1)[0]
TEST = """
def test_run_summary_did_not_move(trajectory, train_seed, device, flannel_snapshot):
    assert flannel_snapshot == trajectory(train_seed).summary()
"""


@pytest.fixture
def gate_copy(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    """The gate's seed-42 snapshot and noise bands in a fresh project that trains natively."""
    snaps = pytester.path / "__snapshots__" / "test_gate"
    snaps.mkdir(parents=True)
    shutil.copy(GATE / "__snapshots__" / "test_gate" / SNAPSHOT, snaps / SNAPSHOT)
    shutil.copy(GATE / "flannel_noise_bands.json", pytester.path / "flannel_noise_bands.json")
    pytester.makepyfile(test_gate=TEST)
    pytester.makeini(
        "[pytest]\nflannel_progress = 0\nflannel_threads = 1\nflannel_numerics = native\n"
        "flannel_missing_class = tolerant\nflannel_seeds = 42\n"
    )
    for key in NUMERICS_ENV:  # the subprocess starts unpinned: ATen, oneDNN and MKL pick this CPU's fastest paths
        monkeypatch.delenv(key, raising=False)
    return pytester


def test_native_class_passes_within_the_band_and_a_one_ulp_change_fails(gate_copy):
    native = gate_copy.runpytest_subprocess()
    native.assert_outcomes(passed=1)
    native.stdout.fnmatch_lines(
        [
            "snapshots stored only for other numerics classes (--flannel-missing-class=tolerant):",
            f"  PASSED  test_run_summary_did_not_move[[]cpu-seed42[]][[]cpu-*-t1[]]: this run cpu-*-t1, "
            f"nearest stored {PORTABLE_CLASS}",
        ]
    )
    assert f"this run {PORTABLE_CLASS}," not in native.stdout.str()  # a native class, not the portable one

    gate_copy.makeconftest(ONE_ULP)
    moved = gate_copy.runpytest_subprocess("--flannel-fresh")
    moved.assert_outcomes(failed=1)
    moved.stdout.fnmatch_lines(
        [
            "E*moved beyond the noise band: * of * compared values differ by more than arithmetic alone moves them*",
            f"E*compared with the nearest stored class {PORTABLE_CLASS}*",
            "E*compared within the noise band for scale * 2 x the largest deviation of *; digest chains exact through step *",
            "E*the trajectories part at step 0*",
        ]
    )
    moved.stdout.fnmatch_lines(["E*W.frobenius @ step 0 * exact (band 0)*"])
