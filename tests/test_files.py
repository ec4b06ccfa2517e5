"""The shared primitives: checksums, the atomic writer, the length-batcher and top-K."""

import hashlib

import numpy as np
import pytest

from laser_batch.files import atomic_write, sha256_file
from laser_batch.metrics import top_k
from laser_batch.sequences import length_batches


def test_sha256_file_matches_hashlib(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"x" * 3_000_000)
    assert sha256_file(path) == hashlib.sha256(b"x" * 3_000_000).hexdigest()


def test_atomic_write_replaces_whole_and_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        atomic_write(target, lambda p: (p.write_text("half"), (_ for _ in ()).throw(RuntimeError("boom"))))
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]  # no temporary file left
    atomic_write(target, lambda p: p.write_text("new"))
    assert target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_length_batches_respect_both_limits_and_cover_every_row_once():
    lengths = np.array([5, 1, 9, 3, 3, 20, 2, 7])
    batches = length_batches(lengths, 3, max_tokens=10)
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(lengths)))
    for batch in batches:
        assert len(batch) <= 3
        assert len(batch) == 1 or len(batch) * lengths[batch].max() <= 10
    assert [lengths[b].tolist() for b in batches] == [[1, 2, 3], [3, 5], [7], [9], [20]]


def test_length_batches_for_training_are_shuffled_pools_of_similar_lengths():
    lengths = np.arange(100)
    a = length_batches(lengths, 4, rng=np.random.default_rng(0), pool=2)
    b = length_batches(lengths, 4, rng=np.random.default_rng(0), pool=2)
    assert [x.tolist() for x in a] == [x.tolist() for x in b]  # seeded: reproducible
    assert sorted(np.concatenate(a).tolist()) == list(range(100))
    assert all(np.all(np.diff(lengths[x]) >= 0) for x in a)  # sorted inside each batch
    assert [x.tolist() for x in a] != [x.tolist() for x in length_batches(lengths, 4, rng=np.random.default_rng(1))]


def test_top_k_is_the_best_k_in_order_and_caps_k():
    scores = np.array([[0.1, 0.9, -np.inf, 0.5], [3.0, 1.0, 2.0, 0.0]], dtype=np.float64)
    idx, val = top_k(scores, 2)
    assert idx.tolist() == [[1, 3], [0, 2]] and val.tolist() == [[0.9, 0.5], [3.0, 2.0]]
    idx, val = top_k(scores, 10)
    assert idx.tolist() == [[1, 3, 0, 2], [0, 2, 1, 3]] and val[0, -1] == -np.inf
