"""What the benchmarks rank with: a data directory's splits and a run's scorers, and the paired comparison to SASRec.

Every Laser row of laser_scientific.py and laser_ml100k.py is compared with SASRec the same way: the mean per-user
difference in test NDCG@10 with a 95% percentile bootstrap interval (1000 resamples over test users, seed 0).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from laser_batch.contracts import load_data_dir
from laser_batch.evaluate import run_scorer
from laser_batch.metrics import ndcg_per_user, paired_bootstrap, rank_targets
from laser_batch.sequences import Sequences, build_sequences

BOOTSTRAP = {"resamples": 1000, "seed": 0, "level": 0.95}


class Bench:
    """The data, the SASRec run and the splits every row is measured on."""

    def __init__(self, data_dir: Path, run_dir: Path) -> None:
        self.run_dir = run_dir
        dataset = load_data_dir(data_dir)
        self.items = dataset.items
        self.sequences: Sequences = build_sequences(dataset.interactions)
        self.splits = {s: self.sequences.split(s) for s in ("valid", "test")}

    def scorer(self, model: str, run_dir: Path, split: str = "test"):
        return run_scorer(model, run_dir, self.sequences, self.splits[split][0], self.items)

    def test_ranks(self, score_batch) -> np.ndarray:
        histories, targets = self.splits["test"]
        with torch.no_grad():
            return rank_targets(score_batch, histories, targets)

    def titles(self) -> list[str]:
        """Item titles in internal-id order (column j is internal item j + 1)."""
        order = self.items.select("item_id", "title").to_dict(as_series=False)
        title_of = dict(zip(order["item_id"], order["title"], strict=True))
        return [title_of[i] or "" for i in self.sequences.item_ids.to_list()]


def versus_sasrec(ranks: np.ndarray, sasrec_ranks: np.ndarray) -> dict:
    diff, (low, high) = paired_bootstrap(ndcg_per_user(sasrec_ranks), ndcg_per_user(ranks), **BOOTSTRAP)
    return {"diff": round(diff, 5), "ci95": [round(low, 5), round(high, 5)]}
