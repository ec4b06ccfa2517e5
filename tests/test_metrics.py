import math

import numpy as np
import pytest

from laser_batch.metrics import (
    exclude_items,
    metrics_from_ranks,
    ndcg_per_user,
    paired_bootstrap,
    rank_targets,
    target_ranks,
)


def test_ranks_are_one_based_and_pessimistic_on_ties():
    scores = np.array([[0.9, 0.5, 0.7, 0.1],
                       [0.2, 0.2, 0.2, 0.2]], dtype=np.float32)
    # user 0: target item 3 (score 0.7) has one item above it; user 1: all four tie with the target
    assert target_ranks(scores, np.array([3, 2])).tolist() == [2, 4]


def test_metrics_match_hand_computed_values():
    ranks = np.array([1, 3, 11, 20])
    m = metrics_from_ranks(ranks, ks=[10, 20])
    assert m["HR@10"] == pytest.approx(2 / 4)
    assert m["HR@20"] == pytest.approx(4 / 4)
    assert m["NDCG@10"] == pytest.approx((1 / math.log2(2) + 1 / math.log2(4)) / 4)
    assert m["NDCG@20"] == pytest.approx((1 + 0.5 + 1 / math.log2(12) + 1 / math.log2(21)) / 4)
    assert m["MRR"] == pytest.approx((1 + 1 / 3 + 1 / 11 + 1 / 20) / 4)


def test_exclude_items_masks_only_history():
    scores = np.zeros((2, 5), dtype=np.float32)
    exclude_items(scores, [np.array([1, 5]), np.array([], dtype=np.int64)])
    assert np.isneginf(scores[0, [0, 4]]).all()
    assert np.isfinite(scores[0, 1:4]).all() and np.isfinite(scores[1]).all()


def test_rank_targets_excludes_history_by_default():
    # item 1 always scores best; the user has already seen it, so the target (item 2) moves up to rank 1
    def scorer(batch):
        return np.tile(np.array([3.0, 2.0, 1.0], dtype=np.float32), (len(batch), 1))

    histories, targets = [np.array([1])], np.array([2])
    assert rank_targets(scorer, histories, targets).tolist() == [1]
    assert rank_targets(scorer, histories, targets, exclude_history=False).tolist() == [2]


def test_rank_targets_batches_do_not_change_results():
    rng = np.random.default_rng(0)
    table = rng.normal(size=(7, 30)).astype(np.float32)
    histories = [rng.integers(1, 31, size=rng.integers(1, 5)) for _ in range(7)]
    targets = rng.integers(1, 31, size=7)
    rows = iter(range(7))

    def scorer(batch):
        return np.stack([table[next(rows)] for _ in batch])

    full = rank_targets(lambda b: table, histories, targets, batch_size=7)
    assert rank_targets(scorer, histories, targets, batch_size=3).tolist() == full.tolist()


def test_a_target_in_the_history_is_a_miss_not_a_leak():
    def scorer(batch):
        return np.array([[5.0, 1.0, 0.0]], dtype=np.float32)

    assert rank_targets(scorer, [np.array([1])], np.array([1])).tolist() == [3]


def test_ndcg_per_user_by_hand():
    assert ndcg_per_user(np.array([1, 3, 10, 11])).tolist() == [1.0, 0.5, pytest.approx(1 / math.log2(11)), 0.0]
    assert ndcg_per_user(np.array([3]), k=2).tolist() == [0.0]


def test_paired_bootstrap_by_hand():
    # A constant per-user gain: every resample of the pairs has mean exactly 0.1, so the interval is [0.1, 0.1]
    # although the two models' own scores vary widely across users.
    base = np.array([0.1, 0.5, 0.9, 0.3])
    diff, (low, high) = paired_bootstrap(base, base + 0.1)
    assert diff == pytest.approx(0.1)
    assert (low, high) == (pytest.approx(0.1), pytest.approx(0.1))
    # Two users with differences 0 and 1: a resample's mean is 0 (p 1/4), 0.5 (1/2) or 1 (1/4), so with 1000
    # resamples the 2.5th percentile is 0 and the 97.5th is 1; the sign is candidate - baseline.
    diff, (low, high) = paired_bootstrap(np.array([1.0, 0.0]), np.array([1.0, 1.0]))
    assert (diff, low, high) == (0.5, 0.0, 1.0)
    diff, (low, high) = paired_bootstrap(np.array([1.0, 1.0]), np.array([1.0, 0.0]))
    assert (diff, low, high) == (-0.5, -1.0, 0.0)
    # Seeded: the same seed gives the same interval, a narrower level a narrower one.
    rng = np.random.default_rng(1)
    a, b = rng.random(50), rng.random(50)
    assert paired_bootstrap(a, b, seed=3) == paired_bootstrap(a, b, seed=3)
    _, (low90, high90) = paired_bootstrap(a, b, seed=3, level=0.9)
    _, (low95, high95) = paired_bootstrap(a, b, seed=3)
    assert low95 <= low90 < high90 <= high95


def test_paired_bootstrap_refuses_unpaired_input():
    with pytest.raises(ValueError, match=r"equal-length.*\(3,\) and \(2,\)"):
        paired_bootstrap(np.zeros(3), np.zeros(2))
