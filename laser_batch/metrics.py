"""Full-ranking metrics in NumPy: every item of the catalogue is a candidate, no sampled negatives.

Ranks are 1-based and pessimistic on ties: an item that scores exactly as the target is counted as
ranked above it, so a constant scorer cannot look good.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

DEFAULT_KS = (10, 20)


def exclude_items(scores: np.ndarray, histories: Sequence[np.ndarray]) -> None:
    """Set the score of every item in row r's history to -inf, in place.

    scores: (B, N), column j holds internal item j + 1; histories: B arrays of internal ids (1..N).
    """
    lengths = np.fromiter((len(h) for h in histories), dtype=np.int64, count=len(histories))
    if lengths.sum() == 0:
        return
    rows = np.repeat(np.arange(len(histories)), lengths)
    cols = np.concatenate([np.asarray(h, dtype=np.int64) for h in histories]) - 1
    scores[rows, cols] = -np.inf


def top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The package's one top-K: (column indices (B, k), their scores (B, k)), best first, for scores (B, N).

    k is capped at N. Equal scores keep the lower column first within the chosen set; which of several items tied
    at the k-th score enters the set is `np.argpartition`'s choice. -inf scores (excluded items) sort last.
    """
    n = scores.shape[1]
    k = min(k, n)
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k] if k < n else np.tile(np.arange(n), (len(scores), 1))
    part_scores = np.take_along_axis(scores, part, axis=1)
    rank = np.argsort(-part_scores, axis=1, kind="stable")
    return np.take_along_axis(part, rank, axis=1), np.take_along_axis(part_scores, rank, axis=1)


def target_ranks(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """1-based rank of each target among all items: scores (B, N), targets (B,) internal ids 1..N."""
    target_scores = scores[np.arange(len(targets)), targets - 1]
    return (scores >= target_scores[:, None]).sum(axis=1)  # counts the target itself, so ties rank below


def metrics_from_ranks(ranks: np.ndarray, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """HR@K (= Recall@K with one target), NDCG@K for each K, and MRR over the full ranking."""
    ranks = np.asarray(ranks, dtype=np.float64)
    if ranks.size == 0:
        raise ValueError("no ranks to compute metrics from")
    out: dict[str, float] = {}
    for k in sorted(set(ks)):
        hit = ranks <= k
        out[f"HR@{k}"] = float(hit.mean())
        out[f"NDCG@{k}"] = float(np.where(hit, 1.0 / np.log2(ranks + 1.0), 0.0).mean())
    out["MRR"] = float((1.0 / ranks).mean())
    return out


def rank_targets(
    score_batch: Callable[[list[np.ndarray]], np.ndarray],
    histories: Sequence[np.ndarray],
    targets: np.ndarray,
    *,
    exclude_history: bool = True,
    batch_size: int = 1024,
) -> np.ndarray:
    """Ranks of `targets` under a scorer, batch by batch.

    Args:
        score_batch: maps a list of histories to float scores (B, N) over items 1..N.
        histories: one array of internal item ids per user, oldest first.
        targets: the held-out internal item id per user.
        exclude_history: rank items already in the history last (the published protocol).
        batch_size: users per call of `score_batch`.
    """
    ranks = np.empty(len(targets), dtype=np.int64)
    for start in range(0, len(targets), batch_size):
        stop = min(start + batch_size, len(targets))
        batch = list(histories[start:stop])
        scores = np.array(score_batch(batch), dtype=np.float32)
        if exclude_history:
            exclude_items(scores, batch)
        ranks[start:stop] = target_ranks(scores, targets[start:stop])
    return ranks


def ndcg_per_user(ranks: np.ndarray, k: int = 10) -> np.ndarray:
    """Each user's NDCG@k from the 1-based rank of their one target: 1 / log2(rank + 1) within the top k, else 0."""
    ranks = np.asarray(ranks, dtype=np.float64)
    return np.where(ranks <= k, 1.0 / np.log2(ranks + 1.0), 0.0)


def metric_per_user(ranks: np.ndarray, metric: str) -> np.ndarray:
    """Each user's value of `metric` ("HR@K", "NDCG@K" or "MRR") from the 1-based rank of their one target."""
    ranks = np.asarray(ranks, dtype=np.float64)
    name, _, k = metric.partition("@")
    if metric == "MRR":
        return 1.0 / ranks
    if name == "HR" and k.isdigit():
        return (ranks <= int(k)).astype(np.float64)
    if name == "NDCG" and k.isdigit():
        return ndcg_per_user(ranks, int(k))
    raise ValueError(f"unknown metric {metric!r}: expected HR@K, NDCG@K or MRR")


def paired_bootstrap(
    baseline: np.ndarray, candidate: np.ndarray, *, resamples: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, tuple[float, float]]:
    """Mean per-user difference (candidate - baseline) and its percentile bootstrap interval.

    The users are resampled with replacement and both models keep their pairing, so the interval reflects how the
    difference varies across users, not how each model's mean does (which is much wider on the same data).

    Args:
        baseline, candidate: one value per user (e.g. `ndcg_per_user`), in the same user order.
        resamples: bootstrap resamples.
        seed: seed of the resampling, so a result can be reproduced.
        level: coverage of the interval (0.95: the 2.5th and 97.5th percentiles of the resampled means).
    """
    if np.ndim(baseline) != 1 or np.shape(baseline) != np.shape(candidate) or np.size(baseline) == 0:
        raise ValueError(f"need two equal-length, non-empty 1-D arrays, got {np.shape(baseline)} "
                         f"and {np.shape(candidate)}")
    diff = np.asarray(candidate, dtype=np.float64) - np.asarray(baseline, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = np.array([diff[rng.integers(0, diff.size, diff.size)].mean() for _ in range(resamples)])
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(diff.mean()), (float(low), float(high))
