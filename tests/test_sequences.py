import numpy as np
import polars as pl
import pytest

from laser_batch.errors import InputError
from laser_batch.sequences import build_sequences, pad_left


def _interactions(rows):
    return pl.DataFrame(rows, schema=["user_id", "item_id", "timestamp"], orient="row")


def test_orders_by_timestamp_with_file_order_breaking_ties_and_splits_leave_one_out():
    inter = _interactions([
        ("b", 30, 5), ("a", 10, 2), ("a", 20, 1), ("a", 30, 2), ("a", 40, 3), ("b", 10, 1), ("b", 20, 9),
    ])
    seqs = build_sequences(inter)
    assert seqs.user_ids.to_list() == ["a", "b"]
    assert seqs.item_ids.to_list() == [10, 20, 30, 40]  # internal id i is item_ids[i - 1]
    # user a: 20 (t=1), then 10 and 30 tie at t=2 and keep file order, then 40
    assert seqs.seqs[0].tolist() == [2, 1, 3, 4]
    assert seqs.seqs[1].tolist() == [1, 3, 2]
    assert [s.tolist() for s in seqs.train_sequences()] == [[2, 1], [1]]
    histories, targets = seqs.split("valid")
    assert [h.tolist() for h in histories] == [[2, 1], [1]] and targets.tolist() == [3, 3]
    histories, targets = seqs.split("test")
    assert [h.tolist() for h in histories] == [[2, 1, 3], [1, 3]] and targets.tolist() == [4, 2]


def test_users_with_too_few_interactions_are_dropped_and_counted():
    inter = _interactions([(1, 5, 0), (1, 6, 1), (2, 5, 0), (2, 6, 1), (2, 7, 2)])
    seqs = build_sequences(inter)
    assert seqs.dropped_users == 1 and seqs.user_ids.to_list() == [2]


def test_no_usable_user_is_an_error():
    with pytest.raises(InputError, match="at least 3 interactions"):
        build_sequences(_interactions([(1, 5, 0), (1, 6, 1)]))


def test_split_is_deterministic_across_row_order():
    rows = [(u, i, t) for u in range(5) for t, i in enumerate([3, 1, 4, 1, 5, 9][: 3 + u % 3])]
    a = build_sequences(_interactions(rows))
    b = build_sequences(_interactions(list(reversed(rows))))
    assert [s.tolist() for s in a.seqs] == [s.tolist() for s in b.seqs]


def test_unknown_split_names_the_value():
    seqs = build_sequences(_interactions([(1, 5, 0), (1, 6, 1), (1, 7, 2)]))
    with pytest.raises(InputError, match="'train'"):
        seqs.split("train")


def test_pad_left_keeps_most_recent_items():
    out = pad_left([np.array([1, 2, 3, 4]), np.array([7]), np.array([], dtype=np.int64)], 3)
    assert out.tolist() == [[2, 3, 4], [0, 0, 7], [0, 0, 0]]


def test_id_maps_round_trip_and_detect_changed_catalogue(tmp_path):
    seqs = build_sequences(_interactions([(1, 5, 0), (1, 6, 1), (1, 7, 2)]))
    seqs.save_maps(tmp_path)
    seqs.check_maps(tmp_path)
    other = build_sequences(_interactions([(1, 5, 0), (1, 6, 1), (1, 8, 2)]))
    from laser_batch.errors import CheckpointError

    with pytest.raises(CheckpointError, match="item catalogue differs"):
        other.check_maps(tmp_path)
