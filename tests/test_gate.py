"""The quality gate of quantised variants (exporters/gate.py) and the sensitivity pass's choice of layers."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from laser_batch.exporters.gate import NON_INFERIORITY, Pairs, Ranking, gate_pairs, judge, rank, recommend
from laser_batch.exporters.quantize import KEEP_MAX, choose_kept
from laser_batch.sequences import build_sequences


def _ranking(ranks: list[int]) -> Ranking:
    ranks = np.asarray(ranks)
    return Ranking(ranks, np.arange(10)[None, :].repeat(len(ranks), 0))


def test_gate_pairs_are_each_users_test_and_validation_targets():
    rows = [(u, i, t) for u in range(5) for t, i in enumerate(range(u + 1, u + 5 + u))]  # users of 4..8 items
    sequences = build_sequences(pl.DataFrame(rows, schema=["user_id", "item_id", "timestamp"], orient="row"))
    pairs = gate_pairs(sequences, users=3)
    assert len(pairs) == 6 and pairs.splits.tolist() == ["test", "valid"] * 3
    for k in range(3):
        test_history, valid_history = pairs.histories[2 * k], pairs.histories[2 * k + 1]
        # the validation pair is the test pair's history cut before its last item, which is the validation target
        np.testing.assert_array_equal(valid_history, test_history[:-1])
        assert pairs.targets[2 * k + 1] == test_history[-1]
    assert len(gate_pairs(sequences, users=100)) == 2 * 5  # every user when the data has fewer


def test_rank_excludes_the_history_and_ranks_the_target_over_the_catalogue():
    items = np.eye(4, dtype=np.float32)  # item j + 1 is the j-th unit vector
    vectors = np.array([[4, 3, 2, 1], [4, 3, 2, 1]], dtype=np.float32)
    pairs = Pairs([np.array([1]), np.array([2])], np.array([3, 1]), np.array(["test", "valid"]))
    ranking = rank(vectors, pairs, items)
    assert ranking.ranks.tolist() == [2, 1]  # user 1: item 1 excluded, so 2 then 3; user 2: item 1 first
    assert ranking.top[0, :3].tolist() == [1, 2, 3] and ranking.top[0, 3] == 0  # the excluded item sorts last


def test_judge_counts_lost_hits_and_applies_the_non_inferiority_bar():
    reference = _ranking([1] * 50 + [20] * 50)  # fp32: half the pairs hit at rank 1, NDCG@10 0.5
    same = judge(reference, reference)
    assert same["ndcg10_diff"] == 0 and same["ndcg10_diff_ci95"] == [0.0, 0.0] and same["non_inferior"]
    assert same["hit_changes"] == 0 and same["top10_overlap"] == 1.0
    assert same["non_inferiority_bar"] == pytest.approx(-NON_INFERIORITY * 0.5)

    worse = judge(reference, _ranking([1] * 40 + [20] * 60))  # 10 of 100 pairs lose their hit
    assert worse["hit_changes"] == 10 and worse["hr10"] == pytest.approx(0.4)
    assert worse["ndcg10_diff"] == pytest.approx(-0.1)
    low, high = worse["ndcg10_diff_ci95"]
    assert low < -0.1 < high < 0 and not worse["non_inferior"]  # 20% of fp32's NDCG@10 lost: far past 3%

    nearly = judge(reference, _ranking([2] + [1] * 49 + [20] * 50))  # one hit moves from rank 1 to 2
    assert nearly["hit_changes"] == 0 and nearly["ndcg10_diff"] == pytest.approx((1 / np.log2(3) - 1) / 100)
    assert nearly["ndcg10_diff_ci95"][0] >= nearly["non_inferiority_bar"] and nearly["non_inferior"]


def test_the_recommended_variant_is_the_fastest_non_inferior_one_faster_than_fp32():
    def variant(non_inferior, speedup):
        return {"gate": {"non_inferior": non_inferior}, "speedup_vs_fp32": speedup}

    variants = {"a": variant(True, 1.6), "b": variant(False, 2.5), "c": variant(True, 1.9),
                "skipped": {"skipped": "not a Llama-family LLM"}}
    name, reason = recommend(variants)
    assert name == "c" and "a, c" in reason  # b is faster but inferior
    assert recommend({"a": variant(True, 0.8)})[0] is None  # non-inferior but slower than fp32: fp32 it is
    assert recommend({"b": variant(False, 2.5)}) == (None, "no quantised variant is non-inferior to fp32 on the "
                                                           "held-out pairs")


def test_the_sensitivity_pass_keeps_the_few_layers_that_carry_the_error():
    errors = {f"layer{i}": 0.001 for i in range(20)}
    errors["down3"], errors["down7"] = 0.5, 0.02
    assert choose_kept(errors) == ["down3"]  # one layer carries over half of the summed error
    errors["down3"] = errors["down7"] = 0.4  # neither alone makes up half
    assert choose_kept(errors) == ["down3", "down7"]
    uniform = {f"layer{i}": 0.01 for i in range(20)}
    assert len(choose_kept(uniform)) == int(20 * KEEP_MAX)  # no outliers: capped at a quarter of the layers
    assert choose_kept({f"layer{i}": 0.0 for i in range(8)}) == []  # nothing measurable: keep nothing
