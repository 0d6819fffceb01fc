"""Weighted blending (``data.weights``): per-step shares, wrap-around, determinism, resume."""

from __future__ import annotations

import numpy as np
import pytest

from evoformer.data.sampler import BlendedSampler
from evoformer.errors import UserError

SIZES = [5000, 300, 2000]
WEIGHTS = [0.5, 0.3, 0.2]
G = 32


def _source_of(idx: np.ndarray) -> np.ndarray:
    return np.searchsorted(np.cumsum(SIZES), idx, side="right")


def test_every_step_holds_the_weights_within_one_sample() -> None:
    s = BlendedSampler(SIZES, [5, 3, 2], G, seed=3)  # weights are normalised
    totals = np.zeros(3, dtype=np.int64)
    for step in range(1000):
        counts = np.bincount(_source_of(s.global_batch(step)), minlength=3)
        assert counts.sum() == G
        assert (np.abs(counts - G * np.asarray(WEIGHTS)) < 1).all(), (step, counts)
        totals += counts
    np.testing.assert_array_equal(totals, s.counts_before(1000))
    # exact in expectation: the draws' spread is sqrt(sum p(1-p)) per step
    ideal = 1000 * G * np.asarray(WEIGHTS)
    frac = G * np.asarray(WEIGHTS) % 1
    sigma = np.sqrt(1000 * frac * (1 - frac))
    assert (np.abs(totals - ideal) <= 4 * sigma + 1).all(), (totals, ideal)


def test_a_source_that_runs_out_wraps_to_a_new_epoch() -> None:
    s = BlendedSampler(SIZES, WEIGHTS, G, seed=0)
    small = []
    for step in range(200):  # ~9.6 samples per step from the 300-sample source
        b = s.global_batch(step)
        small.extend(b[_source_of(b) == 1] - SIZES[0])
    small = np.asarray(small)
    assert len(small) > 3 * SIZES[1]
    # whole epochs, each a permutation of the source: every sample drawn floor or ceil times
    seen = np.bincount(small, minlength=SIZES[1])
    assert set(np.unique(seen)) <= {len(small) // SIZES[1], -(-len(small) // SIZES[1])}
    # and a fresh order per epoch
    order = s._orders[1]
    assert not np.array_equal(order.order(np.arange(300)), order.order(np.arange(300, 600)))


def test_deterministic_resumable_and_layout_independent() -> None:
    a = BlendedSampler(SIZES, WEIGHTS, G, seed=7)
    seq = [a.global_batch(s) for s in range(0, 5000, 250)]
    b = BlendedSampler(SIZES, WEIGHTS, G, seed=7)  # cold, asked out of order
    for i in [19, 0, 7, 12]:
        np.testing.assert_array_equal(b.global_batch(i * 250), seq[i])
    assert not np.array_equal(BlendedSampler(SIZES, WEIGHTS, G, seed=8).global_batch(0), seq[0])
    # dp=1 and dp=2 see the same samples per step, split between the ranks
    for step in [0, 4097]:
        one = np.concatenate(a.micro_batches(step, 0, 1, 4))
        two = [np.concatenate(a.micro_batches(step, r, 2, 4)) for r in range(2)]
        np.testing.assert_array_equal(one, np.concatenate(two))
    # resume: the checkpoint's state restores the order, another source layout is refused
    c = BlendedSampler(SIZES, WEIGHTS, G, seed=99)
    c.load_state_dict(a.state_dict())
    np.testing.assert_array_equal(c.global_batch(4750), seq[19])
    with pytest.raises(UserError, match="sources have"):
        BlendedSampler([5000, 301, 2000], WEIGHTS, G, seed=7).load_state_dict(a.state_dict())
    with pytest.raises(UserError, match="data.weights"):
        BlendedSampler(SIZES, [0.4, 0.4, 0.2], G, seed=7).load_state_dict(a.state_dict())


def test_bad_weights() -> None:
    with pytest.raises(UserError, match="must be >= 0"):
        BlendedSampler(SIZES, [1, -1, 1], G, seed=0)
