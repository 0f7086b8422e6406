"""The "Flannel 6 - Determinism Test" notebook, as claims.

Ten runs (CI scale: four, twenty steps) from one shared initial W, training seeds base..base+n-1,
on every selected device. Run the notebook's scale with `--flannel-preset full`.
"""

from __future__ import annotations

import pytest
import torch

import json

from flannel_repro import (
    assert_divergence_below,
    assert_diverged,
    assert_identical,
    measure_divergence,
    relative_divergence,
)
from flannel_repro.analysis.sources import assert_source_parts, divergence_by_source


def partner_seed(seed: int, seeds: tuple[int, ...]) -> int:
    """The run each seed is compared with: the base seed, or (for the base itself) the next one."""
    if len(seeds) < 2:
        pytest.skip("needs at least two training seeds (--flannel-runs >= 2)")
    return seeds[0] if seed != seeds[0] else seeds[1]


def test_every_run_starts_from_the_shared_W(trajectory, train_seed, device, shared_init_W):
    """t = 0 is bitwise the shared W_initial(seed 42) for every training seed and device."""
    w0 = trajectory(train_seed).W_at(0)
    assert torch.equal(w0.view(torch.int16), shared_init_W.view(torch.int16))


def test_same_seed_trained_twice_is_bitwise_identical(trajectory, train_seed, device):
    """Two separate trainings with the same seed on the same device agree at every step."""
    assert_identical(trajectory(train_seed, repeat=0), trajectory(train_seed, repeat=1))


def test_different_seeds_part_at_step_1(trajectory, train_seed, device, flannel_config):
    """A different training seed moves W at the very first step (its first batch differs)."""
    other = partner_seed(train_seed, flannel_config.train_seeds)
    assert_diverged(trajectory(other), trajectory(train_seed), by_step=1)


def test_final_divergence_within_derived_bound(
    trajectory, train_seed, device, flannel_config, derived_bound, flannel_record
):
    """‖W_a − W_b‖_F at the last step stays below the upper prediction limit derived from held-out pairs, at a
    stated false-alarm rate (1% per clean session over all claim seeds; docs/writing-claims.md, "Bounds")."""
    other = partner_seed(train_seed, flannel_config.train_seeds)
    a, b = trajectory(other), trajectory(train_seed)
    final = measure_divergence(a, b).at(a.steps)
    flannel_record("final_frobenius", final["frobenius"])
    bound = derived_bound()
    try:
        assert_divergence_below(a, b, max_frobenius=bound.max_frobenius)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nThe bound: {bound.describe()}.") from None


def test_data_order_share_within_derived_band(
    trajectory, train_seed, device, flannel_config, derived_bound, flannel_record
):
    """The notebook's question: with model_seed fixed, how much of the divergence is data order?

    Three runs: the reference (seed s0), data order changed only (model_seed s0, data_seed s), and
    both changed (seed s). Checked: data order alone parts the runs at step 1, and the share
    ‖ΔW(order only)‖ / ‖ΔW(both)‖ at the last step is below 1 (the model seed's initialisation is a part
    of the divergence too: with no part it would be exactly 1) and lies in the prediction band derived
    from held-out seeds at a stated false-alarm rate (bounds.toml or in-session; docs/writing-claims.md, "Bounds"). Where
    the share is noisy (real text at CI scale, 6 pairs at full scale) the band's lower end is near 0 and
    its upper end above 1, and the two statements before it are what can fail. The measured shares are
    recorded and printed in the terminal summary.
    """
    base = partner_seed(train_seed, flannel_config.train_seeds)
    ref = trajectory(base)
    order_only = trajectory(model_seed=base, data_seed=train_seed)
    both = trajectory(train_seed)
    assert_diverged(ref, order_only, by_step=1)
    share = relative_divergence(measure_divergence(ref, order_only), measure_divergence(ref, both))
    flannel_record("data_order_share", share)  # aggregated in the terminal summary
    assert share < 1.0, (
        f"data-order share of the divergence = {share:.3f} >= 1: the model seed's initialisation adds nothing to "
        "the divergence of data order alone"
    )
    band = derived_bound()
    assert band.order_share_min <= share <= band.order_share_max, (
        f"data-order share of the divergence = {share:.3f}, outside the derived band "
        f"[{band.order_share_min:.4g}, {band.order_share_max:.4g}]; {band.describe()}"
    )


def test_divergence_by_source(trajectory, device, flannel_config, request):
    """The notebook's question, source by source: each thing its training seed drove, changed alone
    against the base seed's run. Data order and the other parameters' initialisation each part the
    runs at step 1; the same config trained again never parts (no hidden randomness); on CPU the hf
    engine never parts from the torch engine. The thread count is measured and shown, not claimed:
    whether it moves the numbers depends on the CPU's kernels. The table is printed in the terminal
    summary."""
    seeds = flannel_config.train_seeds
    base_seed = seeds[0]
    other = partner_seed(base_seed, seeds)
    base = trajectory(base_seed)
    others = {
        "data_order": trajectory(model_seed=base_seed, data_seed=other),
        "model_init": trajectory(model_seed=other, data_seed=base_seed),
        "threads": trajectory(base_seed, threads=2),
        "none": trajectory(base_seed, repeat=1),
    }
    if device == "cpu":
        others["engine"] = trajectory(base_seed, engine="hf")
    table = divergence_by_source(base, others)
    # shown in the terminal summary and the report (a user property that travels through xdist)
    request.node.user_properties.append(("flannel_sources", json.dumps({"device": device, **table.to_json()})))
    assert_source_parts(table, "data_order", parts=True, by_step=1)
    assert_source_parts(table, "model_init", parts=True, by_step=1)
    assert_source_parts(table, "none", parts=False)
    if device == "cpu":
        assert_source_parts(table, "engine", parts=False)
