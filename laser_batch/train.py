"""Training of the ID model (SASRec) with validation-based early stopping and best-checkpoint selection."""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from laser_batch.checkpoint import SASREC_DIR, StageWriter, save_sasrec, write_run_info
from laser_batch.config import Config
from laser_batch.contracts import load_data_dir
from laser_batch.metrics import DEFAULT_KS, metrics_from_ranks, rank_targets
from laser_batch.sasrec import SASRec
from laser_batch.sequences import build_sequences, length_batches, pad_left
from laser_batch.training import NoProgress, Progress, sasrec_scores, seed_everything

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    checkpoint: Path
    best_epoch: int
    epochs_run: int
    valid_metrics: dict[str, float]
    train_seconds: float
    dropped_users: int


def training_arrays(train_seqs: list[np.ndarray], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and next-item targets at every position: both (U, max_len), left-padded with 0.

    A user's training sequence s yields inputs s[:-1] and targets s[1:]; users with a single training
    item have nothing to predict and are left out.
    """
    usable = [s for s in train_seqs if len(s) >= 2]
    return pad_left([s[:-1] for s in usable], max_len), pad_left([s[1:] for s in usable], max_len)


def train_sasrec(
    data_dir: Path,
    run_dir: Path,
    config: Config,
    *,
    overwrite: bool = False,
    drop_unknown_items: bool = False,
    progress: Progress = NoProgress,
) -> TrainResult:
    """Train SASRec on a data directory and write RUN_DIR/sasrec (best validation epoch).

    Args:
        data_dir: a data directory in the Parquet contract.
        run_dir: where the run is written; RUN_DIR/sasrec must not exist unless `overwrite`.
        config: model and training configuration.
        overwrite: replace an existing RUN_DIR/sasrec.
        drop_unknown_items: drop interactions whose item is missing from items.parquet.
        progress: progress-bar factory, called once per epoch.
    """
    dataset = load_data_dir(data_dir, drop_unknown_items=drop_unknown_items)
    sequences = build_sequences(dataset.interactions)
    if sequences.dropped_users:
        logger.warning("dropped %d user(s) with fewer than 3 interactions", sequences.dropped_users)
    if dataset.dropped_unknown_interactions:
        logger.warning("dropped %d interaction(s) with unknown items", dataset.dropped_unknown_interactions)
    writer = StageWriter(run_dir, SASREC_DIR, overwrite=overwrite)
    write_run_info(run_dir, data_dir)

    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    logger.info("SASRec: %d users", sequences.num_users)
    fit = fit_sasrec(config, sequences.num_items, sequences.train_sequences(), sequences.split("valid"), progress,
                     on_epoch=writer.append_metrics)
    model, train_cfg, epoch, best_epoch = fit.model, config.train, fit.epochs_run, fit.best_epoch
    best_metrics, stopped, train_seconds = fit.valid_metrics, fit.stopped_by, fit.seconds
    save_sasrec(writer.partial, model, sequences, {
        "train": vars(train_cfg).copy(), "best_epoch": best_epoch, "epochs_run": epoch, "stopped_by": stopped,
        "valid_metrics": best_metrics, "train_seconds": round(train_seconds, 2),
        "dropped_users": sequences.dropped_users, "drop_unknown_items": drop_unknown_items,
        "data_dir": str(Path(data_dir).resolve()),
    })
    checkpoint = writer.commit()
    return TrainResult(checkpoint, best_epoch, epoch, best_metrics, train_seconds, sequences.dropped_users)


@dataclass
class SASRecFit:
    model: SASRec  # the best validation epoch's weights, in eval mode
    best_epoch: int
    epochs_run: int
    valid_metrics: dict[str, float]
    stopped_by: str  # "epochs", "patience" or "max_minutes"
    seconds: float


def fit_sasrec(
    config: Config,
    num_items: int,
    train_seqs: list[np.ndarray],
    valid: tuple[list[np.ndarray], np.ndarray],
    progress: Progress = NoProgress,
    *,
    on_epoch: Callable[[dict], None] = lambda record: None,
) -> SASRecFit:
    """Train a fresh SASRec (config.sasrec, config.train) on `train_seqs`, keeping the best epoch on `valid`.

    `train_sasrec` fits the run's SASRec with it; `laser.gate_fit = "residual"` fits a second one on sequences cut
    one item shorter (laser_batch.train_laser.heldout_sasrec). `on_epoch` receives every epoch's metrics record.
    """
    train_cfg, model_cfg = config.train, config.sasrec
    seed_everything(train_cfg.seed)
    model = SASRec(model_cfg, num_items)
    optimizer = torch.optim.Adam(model.parameters(), lr=train_cfg.lr, betas=(0.9, 0.98),
                                 weight_decay=train_cfg.weight_decay)
    inputs, targets = training_arrays(train_seqs, model_cfg.max_len)
    valid_histories, valid_targets = valid
    rng = np.random.default_rng(train_cfg.seed)
    logger.info("SASRec: %d items, %d training sequences, %d parameters",
                num_items, len(inputs), sum(p.numel() for p in model.parameters()))

    ks = sorted({*DEFAULT_KS, *train_cfg.select_ks})
    best_score, best_epoch, best_state, best_metrics, stale = -1.0, 0, None, {}, 0
    started, stopped = time.perf_counter(), "epochs"
    for epoch in range(1, train_cfg.epochs + 1):
        epoch_start = time.perf_counter()
        loss = _train_epoch(model, optimizer, inputs, targets, rng, train_cfg.batch_size, progress, epoch)
        model.eval()
        ranks = rank_targets(lambda h: sasrec_scores(model, h), valid_histories, valid_targets,
                             batch_size=train_cfg.eval_batch_size)
        metrics = metrics_from_ranks(ranks, ks)
        score = metrics[train_cfg.select_metric]
        on_epoch({"epoch": epoch, "loss": loss, "seconds": round(time.perf_counter() - epoch_start, 3),
                  "split": "valid", **metrics})
        logger.info("epoch %d loss %.4f valid %s", epoch, loss,
                    " ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        if score > best_score:
            best_score, best_epoch, best_metrics, stale = score, epoch, metrics, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            stale += 1
            if stale >= train_cfg.patience:
                logger.info("early stop: no better validation %s for %d epochs", train_cfg.select_metric, stale)
                stopped = "patience"
                break
        if train_cfg.max_minutes and time.perf_counter() - started > 60 * train_cfg.max_minutes:
            logger.info("time budget of %g minutes reached after epoch %d", train_cfg.max_minutes, epoch)
            stopped = "max_minutes"
            break
    model.load_state_dict(best_state)
    return SASRecFit(model.eval(), best_epoch, epoch, best_metrics, stopped, time.perf_counter() - started)


def _train_epoch(
    model: SASRec,
    optimizer: torch.optim.Optimizer,
    inputs: np.ndarray,
    targets: np.ndarray,
    rng: np.random.Generator,
    batch_size: int,
    progress: Progress,
    epoch: int,
) -> float:
    model.train()
    bar = progress(total=len(inputs), desc=f"sasrec epoch {epoch}")
    total, batches = 0.0, 0
    for rows in length_batches((inputs != 0).sum(1), batch_size, rng=rng):
        width = int((inputs[rows] != 0).sum(1).max())  # left padding: the last `width` columns hold every item
        loss = model.loss(torch.from_numpy(inputs[rows, -width:]), torch.from_numpy(targets[rows, -width:]))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total, batches = total + loss.item(), batches + 1
        bar.update(len(rows))
        bar.set_postfix({"loss": f"{total / batches:.4f}"})
    bar.close()
    return total / max(batches, 1)

