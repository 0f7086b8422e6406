"""Bounds belong to the data they were derived on: the scale key carries the tokenizer's and corpus's
hashes, so a bound (or noise band) derived on the embedded data is never applied to other data. Every bound
states its method, the held-out pairs it came from and its nominal false-alarm rate; on data with no
committed bound the session derives one from held-out seeds and caches it beside the runs."""

from __future__ import annotations

import math
import random

import pytest

from flannel_repro.analysis.bounds import (
    FALSE_ALARM,
    LEGACY_METHOD,
    METHOD,
    LogFit,
    bound_for,
    data_hashes,
    derive,
    load_bounds,
    scale_key,
    t_quantile,
    to_toml,
)
from flannel_repro.config import PRESETS
from flannel_repro.data.embedded import embedded_paths
from flannel_repro.errors import ConfigError
from tests.flannel6.conftest import BOUNDS


def test_the_committed_ci_bound_is_found_for_the_embedded_data_only(tmp_path):
    run = PRESETS["ci"]().run
    assert bound_for(run, BOUNDS) is not None  # the repository's bound, on the data it was derived on
    paths = embedded_paths("default")
    other = tmp_path / "corpus.txt"
    other.write_text(paths.corpus.read_text(encoding="utf-8")[::-1], encoding="utf-8")  # same characters, other text
    theirs = run.replace(tokenizer_path=str(paths.tokenizer), corpus_path=str(other))
    assert theirs.fingerprint() == run.fingerprint()  # paths are not in the fingerprint ...
    assert scale_key(theirs, data_hashes(theirs)) != scale_key(run, data_hashes(run))  # ... the data's hashes are
    assert bound_for(theirs, BOUNDS) is None
    same_files = run.replace(tokenizer_path=str(paths.tokenizer), corpus_path=str(paths.corpus))
    assert bound_for(same_files, BOUNDS) is not None  # the same bytes under their own paths: the same data


def test_a_scale_key_needs_the_data():
    with pytest.raises(ConfigError, match="expected the tokenizer's sha256"):
        scale_key(PRESETS["ci"]().run, {})
    run = PRESETS["ci"]().run
    described = {f"{k}_sha256": v for k, v in data_hashes(run).items()}
    assert scale_key(run, described) == scale_key(run, data_hashes(run))  # an artifact's description keys the same


def test_t_quantiles_match_the_tables():
    # reference values: scipy.stats.t.ppf
    for p, df, want in [
        (0.9975, 15, 3.2860385709462347),
        (0.99875, 15, 3.6239176108577182),
        (0.999, 2, 22.327124770119866),
        (0.95, 5, 2.0150483733330233),
        (0.3, 7, -0.5491096579472854),
    ]:
        assert t_quantile(p, df) == pytest.approx(want, rel=1e-9)


def test_a_prediction_limit_is_exceeded_at_its_nominal_rate():
    """The method's promise, checked by simulation on log-normal values: a new value exceeds the upper
    limit derived from n others with probability `tail` (averaged over the derivation)."""
    rng = random.Random(7)
    n, tail, trials = 8, 0.05, 20000
    exceed = 0
    for _ in range(trials):
        values = [math.exp(rng.gauss(1.5, 0.3)) for _ in range(n)]
        exceed += math.exp(rng.gauss(1.5, 0.3)) > LogFit.of(values, "test").limit(tail, upper=True)
    assert abs(exceed / trials - tail) < 0.006  # 4 standard errors


def test_derived_bounds_state_method_pairs_and_rate_and_round_trip(tmp_path):
    frobs, shares = [4.2, 5.6, 4.2, 5.3, 6.2, 4.4, 5.6, 6.4], [0.23, 0.44, 0.39, 0.33, 0.33, 0.39, 0.37, 0.6]
    b = derive(frobs, shares, scale="k", measured="8 pairs", held_out="seed 42 vs 46..53")
    assert (b.method, b.n, b.false_alarm, b.comparisons) == (METHOD, 8, FALSE_ALARM, 4)
    assert b.max_frobenius > max(frobs) and b.order_share_min < min(shares) and b.order_share_max > max(shares)
    text = b.describe()
    assert (
        "n = 8 held-out pairs (seed 42 vs 46..53)" in text
        and b.share_raw_fit is not None
        and "0.01 per claim and clean session" in text
    )
    f = tmp_path / "b.toml"
    f.write_text(to_toml("x", b), encoding="utf-8")
    assert load_bounds(f)["k"] == b
    ten = b.for_session(10)  # more claim seeds: each comparison gets less of the 1%, the limits widen
    assert ten.comparisons == 10 and ten.max_frobenius > b.max_frobenius and ten.order_share_max > b.order_share_max
    with pytest.raises(ValueError, match="at least 3 held-out pairs"):
        derive(frobs[:2], shares[:2], scale="k", measured="")


def test_an_old_format_table_still_loads_without_a_stated_rate(tmp_path):
    f = tmp_path / "old.toml"
    f.write_text(
        '[ci]\nscale = "abc"\nmax_frobenius = 9.6\norder_share_min = 0.15\norder_share_max = 0.89\n'
        'measured = "16 pairs"\n',
        encoding="utf-8",
    )
    b = load_bounds(f)["abc"]
    assert b.method == LEGACY_METHOD and b.false_alarm is None and b.for_session(10) is b
    assert "no stated false-alarm rate" in b.describe()


_TABLE = '[ci]\nscale = "abc"\nmax_frobenius = 9.6\norder_share_min = 0.15\norder_share_max = 0.89\n'


@pytest.mark.parametrize(
    "edit, key",
    [
        ("max_frobenius = 9.6", "max_frobenius = inf"),
        ("max_frobenius = 9.6", "max_frobenius = 0.0"),
        ("max_frobenius = 9.6", "max_frobenius = nan"),
        ("order_share_min = 0.15", "order_share_min = -inf"),
        ("order_share_max = 0.89", "order_share_max = inf"),
        ("order_share_min = 0.15", "order_share_min = -0.1"),
        ("order_share_min = 0.15", "order_share_min = 0.95"),
    ],
    ids=["max inf", "max 0", "max nan", "share min -inf", "share max inf", "share min < 0", "share band reversed"],
)
def test_a_bound_out_of_range_is_refused_naming_the_file_and_key(tmp_path, edit, key):
    """A hand-edited bound (inf, nan, 0, a negative or reversed share band) is not loaded as if it were derived."""
    f = tmp_path / "bounds.toml"
    f.write_text(_TABLE.replace(edit, key), encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load_bounds(f)
    assert str(f) in str(err.value) and f"[ci] {key.split(' = ')[0]}: expected" in str(err.value)


def test_a_fit_out_of_range_is_refused(tmp_path):
    f = tmp_path / "bounds.toml"
    f.write_text(
        _TABLE + "n = 16\nfalse_alarm = 0.01\nfrobenius_log_mean = 1.0\nfrobenius_log_sd = inf\n"
        "share_log_mean = -1.0\nshare_log_sd = 0.3\n",
        encoding="utf-8",
    )
    with pytest.raises(ConfigError, match=r"\[ci\] frobenius_log_sd: expected a finite number >= 0, got inf"):
        load_bounds(f)


def test_the_committed_bounds_state_their_rate():
    for b in load_bounds(BOUNDS).values():
        assert b.method == METHOD and b.false_alarm == FALSE_ALARM and b.n >= 6 and b.held_out


def _session(root, tmp_path, *extra):
    import os
    import subprocess
    import sys

    exp = tmp_path / "exp.toml"  # the tiny embedded data set: no bound is committed for it
    exp.write_text(
        'dataset = "tiny"\nvocab_size = 512\nsteps = 2\nbatch_size = 8\nseq_len = 32\n[experiment]\nn_runs = 2\n'
    )
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        str(root / "tests" / "flannel6"),
        "-q",
        "-p",
        "no:xdist",
        "-p",
        "no:cacheprovider",
        "-rs",
        "-k",
        "bound or band",
        f"--flannel-config={exp}",
        f"--flannel-artifacts={tmp_path / 'a'}",
        "--flannel-progress=0",
        "--flannel-threads=1",
        *extra,
    ]
    env = {**os.environ, "FLANNEL_REPRO_CACHE": str(tmp_path / "cache")}
    return subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=900, env=env)


def test_a_session_on_other_data_derives_its_bound_from_held_out_seeds_and_caches_it(tmp_path):
    """The Flannel 6 bound claims on data with no committed bound: by default the session derives the bound
    from the 16 seeds after the claim seeds, says so in the terminal summary, and caches it beside the runs;
    the next session reuses it; --flannel-derive-bounds=none skips instead (an opt-in)."""
    from pathlib import Path

    from tests.flannel6.conftest import session_bound_path

    root = Path(__file__).parents[1]
    first = _session(root, tmp_path)
    assert first.returncode == 0, first.stdout[-3000:]
    out = first.stdout
    assert "skipped" not in out.splitlines()[-1], out[-1500:]
    assert "derived in this session" in out and "seed 42 vs 44..59" in out, out[-2500:]
    assert "nominal false-alarm rate 0.01 per claim and clean session over 2 comparison(s)" in out
    cached = list((tmp_path / "a" / "bounds").glob("*.toml"))
    assert len(cached) == 1
    b = next(iter(load_bounds(cached[0]).values()))
    assert (b.method, b.n, b.held_out) == (METHOD, 16, "seed 42 vs 44..59")
    assert session_bound_path(tmp_path / "a", b.scale) == cached[0]
    again = _session(root, tmp_path)
    assert again.returncode == 0 and "derived in an earlier session" in again.stdout, again.stdout[-2500:]
    skipped = _session(root, tmp_path, "--flannel-derive-bounds=none")
    assert skipped.returncode == 0, skipped.stdout[-2000:]
    assert "--flannel-derive-bounds=none" in skipped.stdout and "4 skipped" in skipped.stdout.splitlines()[-1]
    overlap = _session(root, tmp_path, "--flannel-derive-bounds=43-46")
    assert overlap.returncode == 1 and "are claim seeds" in overlap.stdout, overlap.stdout[-2000:]
