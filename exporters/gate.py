"""The export's quality gate for quantised user encoders: recommendation quality on held-out truth.

A quantised variant changes every user's embedding a little, and near-ties in the top 10 then swap (ranks 10 and 11
of the SmolLM2 Laser are a median 0.01 score-std apart: benchmarks/results/topk_sensitivity.json), so "the same
top-10 set as fp32" fails for any numeric change, PyTorch bf16 included (48% of users). What a user of the
recommendations feels is whether the held-out next item is still found. The gate asks that of each variant:

- **pairs**: for every user (or `users` users spread evenly over the data, to make a first look cheaper), both
  held-out (history, target) pairs: the test target after the whole history and the validation target after the
  history before it (a warning below `MIN_PAIRS` pairs);
- **measured** for the variant and for the fp32 graph, on the same pairs, full catalogue, history items excluded
  (the evaluation protocol): HR@10 and NDCG@10, the paired difference of each with a 95% bootstrap interval over
  the pairs, how many pairs' hit changes, and the mean top-10 overlap with fp32 (the old exact-set agreement is
  kept as a diagnostic);
- **non-inferior**: the lower end of the interval of (variant - fp32) NDCG@10 is at least -`NON_INFERIORITY` of
  fp32's NDCG@10 (the bar MLPerf's 99%-of-fp32 and NVIDIA's 0.01-drop gates express, on held-out truth).

PyTorch bf16 is judged the same way in the export, as the reference for ordinary numeric noise.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from laser_batch.metrics import exclude_items, metric_per_user, paired_bootstrap, target_ranks, top_k
from laser_batch.sequences import Sequences, evenly_spread

logger = logging.getLogger(__name__)

GATE_USERS = 0  # users whose validation and test pairs the gate measures; 0: every user
MIN_PAIRS = 2000  # fewer (a small data set) is allowed and logged
NON_INFERIORITY = 0.03  # the interval's lower end may fall at most 3% of fp32's NDCG@10 below 0
K = 10
RESAMPLES = 1000


@dataclass(frozen=True)
class Pairs:
    """Held-out (history, target) pairs: internal item ids, oldest first; `splits` says which target each is."""

    histories: list[np.ndarray]
    targets: np.ndarray
    splits: np.ndarray

    def __len__(self) -> int:
        return len(self.targets)


def gate_pairs(sequences: Sequences, users: int = GATE_USERS) -> Pairs:
    """Both held-out pairs (test, then validation) of every user, or of `users` users spread evenly over the data
    (deterministic)."""
    test_histories, test_targets = sequences.split("test")
    valid_histories, valid_targets = sequences.split("valid")
    rows = evenly_spread(len(test_targets), users or len(test_targets))
    if 2 * len(rows) < MIN_PAIRS:
        logger.warning("quality gate: %d held-out pairs, fewer than %d (the data has %d users)", 2 * len(rows),
                       MIN_PAIRS, len(test_targets))
    histories, targets, splits = [], [], []
    for r in rows:
        histories += [test_histories[r], valid_histories[r]]
        targets += [test_targets[r], valid_targets[r]]
        splits += ["test", "valid"]
    return Pairs(histories, np.asarray(targets, dtype=np.int64), np.asarray(splits))


@dataclass(frozen=True)
class Ranking:
    """Where each pair's target lands (1-based rank over the catalogue) and each pair's top 10 (item columns)."""

    ranks: np.ndarray
    top: np.ndarray


def rank(vectors: np.ndarray, pairs: Pairs, item_matrix: np.ndarray, *, batch_size: int = 512) -> Ranking:
    """Rank the catalogue (`item_matrix` rows) for each pair's user vector, its history excluded."""
    ranks = np.empty(len(pairs), dtype=np.int64)
    top = np.empty((len(pairs), min(K, len(item_matrix))), dtype=np.int64)
    for start in range(0, len(pairs), batch_size):
        stop = min(start + batch_size, len(pairs))
        scores = vectors[start:stop].astype(np.float32) @ item_matrix.T
        exclude_items(scores, pairs.histories[start:stop])
        ranks[start:stop] = target_ranks(scores, pairs.targets[start:stop])
        top[start:stop] = top_k(scores, K)[0]
    return Ranking(ranks, top)


def judge(reference: Ranking, candidate: Ranking, *, resamples: int = RESAMPLES) -> dict:
    """The gate's numbers for `candidate` against `reference` (the fp32 graph) on the same pairs."""
    ndcg_ref, ndcg = metric_per_user(reference.ranks, f"NDCG@{K}"), metric_per_user(candidate.ranks, f"NDCG@{K}")
    hit_ref, hit = reference.ranks <= K, candidate.ranks <= K
    ndcg_diff, ndcg_ci = paired_bootstrap(ndcg_ref, ndcg, resamples=resamples)
    hr_diff, hr_ci = paired_bootstrap(hit_ref.astype(float), hit.astype(float), resamples=resamples)
    overlap = [len(set(a) & set(b)) / len(a) for a, b in zip(reference.top.tolist(), candidate.top.tolist(),
                                                              strict=True)]
    same = [set(a) == set(b) for a, b in zip(reference.top.tolist(), candidate.top.tolist(), strict=True)]
    bar = -NON_INFERIORITY * float(ndcg_ref.mean())
    return {
        "pairs": len(ndcg), f"hr{K}": float(hit.mean()), f"ndcg{K}": float(ndcg.mean()),
        f"hr{K}_fp32": float(hit_ref.mean()), f"ndcg{K}_fp32": float(ndcg_ref.mean()),
        f"ndcg{K}_diff": ndcg_diff, f"ndcg{K}_diff_ci95": list(ndcg_ci),
        f"hr{K}_diff": hr_diff, f"hr{K}_diff_ci95": list(hr_ci),
        "hit_changes": int((hit != hit_ref).sum()), f"top{K}_overlap": float(np.mean(overlap)),
        f"top{K}_same_set": float(np.mean(same)),  # diagnostic: the old exact-set agreement
        "non_inferiority_bar": bar, "non_inferior": bool(ndcg_ci[0] >= bar),
    }


def recommend(variants: dict[str, dict]) -> tuple[str | None, str]:
    """(the fastest non-inferior variant that is faster than fp32, or None; why), from `add_variants`' records
    (each with "gate" and "speedup_vs_fp32"; skipped ones have neither)."""
    passing = {name: v for name, v in variants.items() if v.get("gate", {}).get("non_inferior")}
    if not passing:
        return None, "no quantised variant is non-inferior to fp32 on the held-out pairs"
    name = max(passing, key=lambda s: passing[s]["speedup_vs_fp32"])
    if passing[name]["speedup_vs_fp32"] <= 1.0:
        return None, (f"the fastest non-inferior variant, {name}, is not faster than fp32 "
                      f"({passing[name]['speedup_vs_fp32']:.2f}x)")
    return name, (f"the fastest of the non-inferior variants ({', '.join(sorted(passing))}): "
                  f"{passing[name]['speedup_vs_fp32']:.2f}x fp32's users/s")
