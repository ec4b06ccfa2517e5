"""The SASRec + TF-IDF title blend: the baseline a practical user would try before an LLM (issue 22).

A candidate's text score is the TF-IDF cosine between its title and the user's last 5 history items, weighted
0.7^age (age 0 = the most recent item). Per user, the text scores and SASRec's scores are z-scored over the
catalogue and added: z(SASRec) + w * z(text). The weight w is chosen on the validation split from a grid that
includes 0 (SASRec alone), so the blend can only lose to SASRec on validation by not existing.

TF-IDF without scikit-learn: lower-cased alphanumeric tokens, raw term counts, smoothed idf
log((1 + n) / (1 + df)) + 1 (scikit-learn's default), rows L2-normalised; the item-item cosine matrix is built
once with a sparse product (items x items, float32: 77 MB for Amazon Scientific's 4,385 items).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import numpy as np
import torch

from laser_batch.metrics import metrics_from_ranks, rank_targets

WEIGHTS = (0.0, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0)
LAST_ITEMS = 5
DECAY = 0.7
_TOKEN = re.compile(r"[a-z0-9]+")

Scorer = Callable[[list[np.ndarray]], np.ndarray]  # histories (internal ids 1..N) -> scores (B, N)


def tfidf_similarity(texts: Sequence[str]) -> np.ndarray:
    """Cosine similarity (N, N) between the TF-IDF vectors of `texts`; an empty text is similar to nothing."""
    vocabulary: dict[str, int] = {}
    rows, cols, counts = [], [], []
    for row, text in enumerate(texts):
        terms, freq = np.unique([vocabulary.setdefault(t, len(vocabulary)) for t in _TOKEN.findall(text.lower())],
                                return_counts=True)
        rows.extend([row] * len(terms))
        cols.extend(terms.tolist())
        counts.extend(freq.tolist())
    n = len(texts)
    cols_arr = np.asarray(cols, dtype=np.int64)
    df = np.bincount(cols_arr, minlength=len(vocabulary))
    idf = np.log((1.0 + n) / (1.0 + df)) + 1.0
    values = np.asarray(counts, dtype=np.float64) * idf[cols_arr]
    norms = np.sqrt(np.bincount(rows, weights=values**2, minlength=n))
    values /= norms[np.asarray(rows, dtype=np.int64)]
    matrix = torch.sparse_coo_tensor(np.array([rows, cols]), values.astype(np.float32), (n, len(vocabulary)),
                                     check_invariants=True)
    return (matrix @ matrix.t().to_dense()).numpy()


def text_scores(similarity: np.ndarray, histories: list[np.ndarray]) -> np.ndarray:
    """(B, N): sum over the last LAST_ITEMS history items of DECAY^age * cosine(candidate, item)."""
    weights = np.zeros((len(histories), similarity.shape[0]), dtype=np.float32)
    for row, history in enumerate(histories):
        recent = np.asarray(history[-LAST_ITEMS:], dtype=np.int64)[::-1]  # most recent first: age 0, 1, ...
        np.add.at(weights[row], recent - 1, DECAY ** np.arange(len(recent), dtype=np.float32))
    return weights @ similarity


def zscore(scores: np.ndarray) -> np.ndarray:
    """Per row: (s - mean) / std over the catalogue; a constant row becomes 0."""
    scores = np.asarray(scores, dtype=np.float32)
    std = scores.std(axis=1, keepdims=True)
    return (scores - scores.mean(axis=1, keepdims=True)) / np.where(std > 0, std, 1.0)


def blend_scorer(base: Scorer, similarity: np.ndarray, weight: float) -> Scorer:
    """z(base) + weight * z(text) for a batch of histories."""
    if weight == 0:
        return base
    return lambda batch: zscore(base(batch)) + weight * zscore(text_scores(similarity, batch))


def choose_weight(
    base: Scorer, similarity: np.ndarray, histories: list[np.ndarray], targets: np.ndarray,
    *, weights: Sequence[float] = WEIGHTS, metric: str = "NDCG@10",
) -> tuple[float, dict[float, dict[str, float]]]:
    """The grid weight with the best `metric` on the given (validation) split, and every weight's metrics.

    Ties go to the smaller weight, so a text signal that adds nothing leaves SASRec alone.
    """
    grid = {w: metrics_from_ranks(rank_targets(blend_scorer(base, similarity, w), histories, targets))
            for w in weights}
    best = max(sorted(grid), key=lambda w: grid[w][metric])
    return best, grid
