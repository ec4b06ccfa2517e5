"""benchmarks/text_blend.py: TF-IDF cosine, recency-weighted text scores, z-scores and the weight chosen on a split."""

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _load():
    spec = importlib.util.spec_from_file_location("text_blend", BENCHMARKS / "text_blend.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("text_blend", module)
    spec.loader.exec_module(module)
    return module


blend = _load()


def test_tfidf_cosine_by_hand():
    sim = blend.tfidf_similarity(["red apple", "Red car", "", "blue-sky", "RED"])
    # n = 5, df(red) = 3, the rest 1: smoothed idf = ln((1 + 5) / (1 + df)) + 1
    red, other = math.log(6 / 4) + 1, math.log(6 / 2) + 1
    assert sim[0, 1] == pytest.approx(red**2 / (red**2 + other**2), rel=1e-6)
    assert sim[0, 4] == pytest.approx(red / math.sqrt(red**2 + other**2), rel=1e-6)
    assert sim[0, 0] == pytest.approx(1.0) and sim[3, 3] == pytest.approx(1.0)  # "blue-sky": two tokens
    assert sim[0, 3] == 0.0
    assert not sim[2].any() and not sim[:, 2].any()  # an empty title is similar to nothing, itself included
    assert np.allclose(sim, sim.T)


def test_text_scores_weight_the_last_five_items_by_recency():
    identity = np.eye(7, dtype=np.float32)
    scores = blend.text_scores(identity, [np.array([1, 2, 3, 4, 5, 6, 7]), np.array([3, 3])])
    assert scores[0].tolist() == pytest.approx([0, 0, 0.7**4, 0.7**3, 0.7**2, 0.7, 1.0])
    assert scores[1].tolist() == pytest.approx([0, 0, 1.7, 0, 0, 0, 0])  # a repeated item counts at each age


def test_zscore_per_row():
    z = blend.zscore(np.array([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]]))
    assert z[0].tolist() == pytest.approx([-math.sqrt(1.5), 0.0, math.sqrt(1.5)])
    assert z[1].tolist() == [0.0, 0.0, 0.0]


def test_weight_chosen_on_the_split_and_zero_when_text_adds_nothing():
    histories, targets = [np.array([1]), np.array([2])], np.array([2, 3])  # each user's next item follows the last

    def flat(batch):  # ranks every item alike: every target lands last (pessimistic ties)
        return np.zeros((len(batch), 3), dtype=np.float32)

    follows = np.zeros((3, 3), dtype=np.float32)
    follows[0, 1] = follows[1, 2] = 1.0  # "similar" means: is the next item
    weight, grid = blend.choose_weight(flat, follows, histories, targets, weights=(0.0, 0.5))
    assert weight == 0.5 and grid[0.5]["NDCG@10"] == 1.0
    assert grid[0.0]["NDCG@10"] == pytest.approx(1 / math.log2(3))  # the history item is excluded: tied at rank 2
    weight, grid = blend.choose_weight(flat, np.zeros((3, 3), dtype=np.float32), histories, targets,
                                       weights=(0.0, 0.5, 1.0))
    assert weight == 0.0 and len({m["NDCG@10"] for m in grid.values()}) == 1
