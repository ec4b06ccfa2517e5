"""Full-ranking evaluation of a run's models on the validation or test split."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import polars as pl

from laser_batch.checkpoint import SASREC_DIR, read_checkpoint_config, read_run_info
from laser_batch.config import TextConfig, from_dict
from laser_batch.contracts import load_data_dir
from laser_batch.errors import InputError
from laser_batch.metrics import DEFAULT_KS, metrics_from_ranks, rank_targets
from laser_batch.sequences import Sequences, build_sequences

logger = logging.getLogger(__name__)

MODELS = ("sasrec", "laser", "popularity")


def popularity_scorer(histories: Sequence[np.ndarray], num_items: int) -> Callable[[list], np.ndarray]:
    """Scores every item by how often it occurs in the given histories (what the split lets us see)."""
    counts = np.bincount(np.concatenate(list(histories)), minlength=num_items + 1)[1:].astype(np.float32)
    return lambda batch: np.broadcast_to(counts, (len(batch), num_items))


def evaluate_run(
    run_dir: Path,
    *,
    model: str = "sasrec",
    split: str = "test",
    ks: Sequence[int] = DEFAULT_KS,
    exclude_history: bool = True,
    data_dir: Path | None = None,
    batch_size: int = 1024,
) -> dict:
    """Rank every catalogue item for every user and report HR@K, NDCG@K and MRR.

    Args:
        run_dir: a run directory written by `train`.
        model: "sasrec", "laser" or "popularity" (counts over the histories of the split).
        split: "valid" (second last item) or "test" (last item).
        ks: cut-offs for HR@K and NDCG@K.
        exclude_history: rank items already in a user's history last (the published protocol).
        data_dir: read the data from here instead of the directory recorded in the run.
        batch_size: users scored at once.

    Returns:
        {"model", "split", "users", "exclude_history", "metrics": {"HR@10", "NDCG@10", ..., "MRR"}}, and "gate" (the
        fusion gate g, from the checkpoint's config.json) for a Laser run with `laser.fusion = "gated"`.
    """
    if model not in MODELS:
        raise InputError(f"unknown model {model!r}; choose one of {', '.join(MODELS)}")
    if any(k <= 0 for k in ks):
        raise InputError(f"--k must be positive, got {', '.join(map(str, ks))}")
    info = read_run_info(run_dir)
    data_dir = Path(data_dir) if data_dir is not None else Path(info["data_dir"])
    checkpoint = Path(run_dir) / SASREC_DIR
    drop_unknown = False
    if model in ("sasrec", "laser"):
        drop_unknown = read_checkpoint_config(checkpoint, "sasrec").get("drop_unknown_items", False)

    dataset = load_data_dir(data_dir, drop_unknown_items=drop_unknown)
    sequences = build_sequences(dataset.interactions)
    histories, targets = sequences.split(split)
    scorer = run_scorer(model, Path(run_dir), sequences, histories, dataset.items)
    ranks = rank_targets(scorer, histories, targets, exclude_history=exclude_history, batch_size=batch_size)
    return {
        "model": model,
        "split": split,
        "users": int(len(targets)),
        "exclude_history": exclude_history,
        "metrics": metrics_from_ranks(ranks, ks),
        **_gate(model, Path(run_dir)),
    }


def _gate(model: str, run_dir: Path) -> dict:
    """{"gate": g} for a fused Laser run (as its training recorded it), {} otherwise."""
    if model != "laser":
        return {}
    from laser_batch.checkpoint import LASER_DIR

    config = read_checkpoint_config(run_dir / LASER_DIR, "laser")
    return {"gate": config["gate"]} if config["laser"].get("fusion", "none") == "gated" else {}


def run_scorer(model: str, run_dir: Path, sequences: Sequences, histories: list[np.ndarray], items: pl.DataFrame):
    """The `score_batch` (metrics.rank_targets) of a trained run's model: "popularity", "sasrec" or "laser"."""
    if model == "popularity":
        return popularity_scorer(histories, sequences.num_items)
    if model == "laser":
        from laser_batch.checkpoint import LASER_DIR, load_laser
        from laser_batch.encode import laser_inputs, laser_scorer

        laser, item_matrix, config = load_laser(run_dir)
        sequences.check_maps(run_dir / LASER_DIR)
        inputs = laser_inputs(laser.llm, items, sequences, from_dict(TextConfig, config["text"], "text"),
                              laser.sasrec.config.max_len)
        return laser_scorer(laser, inputs, item_matrix, batch_size=config["laser"]["item_batch_size"])
    from laser_batch.checkpoint import load_sasrec
    from laser_batch.training import sasrec_scores

    sasrec, _ = load_sasrec(run_dir / SASREC_DIR)
    sequences.check_maps(run_dir / SASREC_DIR)
    return lambda batch: sasrec_scores(sasrec, batch)
