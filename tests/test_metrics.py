import math

import numpy as np
import pytest

from laser_batch.metrics import exclude_items, metrics_from_ranks, rank_targets, target_ranks


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
