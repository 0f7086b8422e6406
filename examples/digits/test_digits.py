"""Determinism claims for an MLP on scikit-learn's digits (digits_engine.py), written as for the notebook's model."""

from __future__ import annotations

import pytest

from flannel_repro import assert_diverged, assert_identical

from digits_engine import ENGINE

pytestmark = pytest.mark.flannel(engine=ENGINE)
SEEDS = [0, 1, 2]


def test_same_seed_twice_is_bitwise_identical(trajectory):
    assert_identical(trajectory(0), trajectory(0, repeat=1))


@pytest.mark.parametrize("seed", SEEDS[1:])
def test_another_seed_moves_the_weights_from_the_first_step(trajectory, seed):
    assert_diverged(trajectory(0), trajectory(seed), by_step=1)


def test_data_order_alone_moves_the_weights(trajectory):
    assert_diverged(trajectory(model_seed=0, data_seed=0), trajectory(model_seed=0, data_seed=1), by_step=1)


@pytest.mark.parametrize("k", [1, 25, 60])
def test_stopping_and_resuming_changes_nothing(trajectory, k):
    assert_identical(trajectory(0), trajectory(0, resume_at=k))


def test_it_learns(trajectory):
    run = trajectory(0)
    assert run.losses[1:6].mean() > 2 * run.losses[-5:].mean()


@pytest.mark.parametrize("seed", SEEDS)
def test_summary_did_not_move(trajectory, seed, flannel_snapshot):
    assert flannel_snapshot == trajectory(seed).summary()
