"""Two-stage training of Laser (DESIGN.md section 1).

Stage 1: at the start of every epoch, re-encode every catalogue item (no grad) into the item matrix I,
train the user side against I, validate; keep the best epoch (weights and I).
Stage 2: freeze I (stage 1's best), train the user side more epochs, keep the best validation checkpoint.

AdamW with linear warmup and cosine decay over both stages, gradient accumulation, seeds. After every
epoch the full training state goes to RUN_DIR/.laser.partial/resume.pt, so `resume=True` continues an
interrupted run from its last finished epoch.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from laser_batch.checkpoint import LASER_DIR, SASREC_DIR, StageWriter, load_sasrec, read_run_info, save_laser
from laser_batch.config import Config
from laser_batch.contracts import first_line, load_data_dir
from laser_batch.encode import encode_items, laser_inputs, laser_scorer, recenter_users
from laser_batch.errors import CheckpointError
from laser_batch.llm import FrozenLLM, load_llm
from laser_batch.metrics import DEFAULT_KS, metrics_from_ranks, rank_targets
from laser_batch.model import Laser
from laser_batch.sequences import Sequences, build_sequences, evenly_spread
from laser_batch.train import NoProgress, Progress, length_batches, seed_everything

logger = logging.getLogger(__name__)
RESUME_FILE = "resume.pt"


@dataclass
class LaserResult:
    checkpoint: Path
    best_stage: int
    best_epoch: int
    valid_metrics: dict[str, float]
    seconds_per_epoch: float
    trainable_parameters: int


def build_laser(config: Config, run_dir: Path, llm: FrozenLLM | None = None):
    """Load what Laser stands on (data, frozen SASRec, frozen LLM) and build a fresh model.

    Returns (model, inputs, sequences).
    """
    info = read_run_info(run_dir)
    sasrec, sasrec_config = load_sasrec(Path(run_dir) / SASREC_DIR)
    dataset = load_data_dir(Path(info["data_dir"]), drop_unknown_items=sasrec_config.get("drop_unknown_items", False))
    sequences = build_sequences(dataset.interactions)
    sequences.check_maps(Path(run_dir) / SASREC_DIR)
    llm = llm if llm is not None else load_llm(config.llm)
    model = Laser(config.laser, config.mformer, llm, sasrec)
    return model, laser_inputs(llm, dataset.items, sequences, config.text, sasrec.config.max_len), sequences


def training_samples(sequences: Sequences, per_user: int, rng: np.random.Generator):
    """(histories, targets) drawn from the training part of each sequence (before the validation item).

    The first sample of a user predicts its last training item; further ones use random earlier cut points.
    """
    histories, targets = [], []
    for seq in sequences.train_sequences():
        if len(seq) < 2:
            continue
        cuts = [len(seq) - 1]
        if per_user > 1 and len(seq) > 2:
            cuts += list(rng.choice(np.arange(1, len(seq) - 1), size=min(per_user - 1, len(seq) - 2), replace=False))
        for cut in cuts:
            histories.append(seq[:cut])
            targets.append(seq[cut])
    return histories, np.asarray(targets, dtype=np.int64)


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float):
    warmup = max(1, int(total_steps * warmup_ratio))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_laser(
    run_dir: Path,
    config: Config,
    *,
    llm: FrozenLLM | None = None,
    overwrite: bool = False,
    resume: bool = False,
    progress: Progress = NoProgress,
) -> LaserResult:
    """Train Laser on top of RUN_DIR/sasrec and write RUN_DIR/laser.

    Args:
        run_dir: a run directory with a trained SASRec stage.
        config: the run's configuration (llm, text, mformer, laser, train.seed/threads/eval_batch_size).
        llm: an already loaded frozen LLM (tests); by default `config.llm` is loaded.
        overwrite: replace an existing RUN_DIR/laser.
        resume: continue from RUN_DIR/.laser.partial/resume.pt instead of starting over.
        progress: progress-bar factory (item re-encoding and training epochs).
    """
    cfg = config.laser
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    seed_everything(config.train.seed)
    model, inputs, sequences = build_laser(config, run_dir, llm)
    writer = StageWriter(run_dir, LASER_DIR, overwrite=overwrite, keep_partial=resume)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    rng = np.random.default_rng(config.train.seed)
    users_per_epoch = len(training_samples(sequences, cfg.samples_per_user, np.random.default_rng(0))[1])
    steps_per_epoch = math.ceil(math.ceil(users_per_epoch / cfg.batch_size) / cfg.grad_accumulation)
    scheduler = warmup_cosine(optimizer, steps_per_epoch * (cfg.stage1_epochs + cfg.stage2_epochs), cfg.warmup_ratio)
    valid_histories, valid_targets = sequences.split("valid")
    if cfg.valid_users and cfg.valid_users < len(valid_targets):  # a fixed, evenly spread subset (CPU budgets)
        rows = evenly_spread(len(valid_targets), cfg.valid_users)
        valid_histories, valid_targets = [valid_histories[r] for r in rows], valid_targets[rows]
    centre_histories = []
    if cfg.center_users:  # a fixed sample of histories before each last training item
        train_histories = training_samples(sequences, 1, np.random.default_rng(0))[0]
        centre_histories = [train_histories[r] for r in evenly_spread(len(train_histories), cfg.center_users)]
    select = config.train.select_metric
    ks = sorted({*DEFAULT_KS, *config.train.select_ks})
    n_trainable = sum(p.numel() for p in params)
    logger.info("Laser: %d trainable parameters; LLM %s (%s)", n_trainable, model.llm.source,
                model.llm.fingerprint[:12])

    state = {"stage": 1, "epoch": 0, "best": None, "frozen_items": None, "epoch_seconds": [],
             "config": config.to_dict(), "llm_fingerprint": model.llm.fingerprint}
    if resume and (writer.partial / RESUME_FILE).exists():
        state = _load_resume(writer.partial / RESUME_FILE, model, optimizer, scheduler, rng, state)
        logger.info("resuming after stage %d epoch %d", state["stage"], state["epoch"])

    def encode_catalogue() -> torch.Tensor:
        bar = progress(total=sequences.num_items, desc="encoding items")
        items = encode_items(model, inputs, sequences.num_items, batch_size=cfg.item_batch_size, progress=bar,
                             recenter=True)
        bar.close()
        if cfg.center_users:
            recenter_users(model, inputs, centre_histories, batch_size=cfg.item_batch_size)
        return items

    for stage, epochs in ((1, cfg.stage1_epochs), (2, cfg.stage2_epochs)):
        if stage < state["stage"] or epochs == 0:
            continue
        if stage == 2 and state["frozen_items"] is None:
            if state["best"] is not None:  # stage 2 starts from stage 1's best weights and item matrix
                model.load_state_dict(state["best"]["weights"], strict=True)
                state["frozen_items"] = state["best"]["items"]
            else:  # stage 1 skipped: freeze the items as the untrained model encodes them
                state["frozen_items"] = encode_catalogue()
        stale = 0
        for epoch in range(state["epoch"] + 1 if stage == state["stage"] else 1, epochs + 1):
            started = time.perf_counter()
            items = encode_catalogue() if stage == 1 else state["frozen_items"]
            histories, targets = training_samples(sequences, cfg.samples_per_user, rng)
            loss = _train_epoch(model, inputs, items, histories, targets, optimizer, scheduler, rng, cfg, progress,
                                f"laser stage {stage} epoch {epoch}")
            ranks = rank_targets(laser_scorer(model, inputs, items, batch_size=cfg.item_batch_size),
                                 valid_histories, valid_targets, batch_size=config.train.eval_batch_size)
            metrics = metrics_from_ranks(ranks, ks)
            seconds = time.perf_counter() - started
            state["epoch_seconds"].append(seconds)
            writer.append_metrics({"stage": stage, "epoch": epoch, "loss": loss, "seconds": round(seconds, 2),
                                   "split": "valid", **metrics})
            logger.info("stage %d epoch %d loss %.4f valid %s", stage, epoch, loss,
                        " ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
            if state["best"] is None or metrics[select] > state["best"]["metrics"][select]:
                state["best"] = {"stage": stage, "epoch": epoch, "metrics": metrics, "items": items.clone(),
                                 "weights": {k: v.clone() for k, v in model.trainable_state_dict().items()}}
                stale = 0
            else:
                stale += 1
            state.update(stage=stage, epoch=epoch)
            _save_resume(writer.partial / RESUME_FILE, state, model, optimizer, scheduler, rng)
            if cfg.patience and stale >= cfg.patience:
                logger.info("stage %d: no better validation %s for %d epochs", stage, select, stale)
                break
        state.update(stage=stage + 1, epoch=0)

    best = state["best"]
    model.load_state_dict(best["weights"], strict=True)
    seconds_per_epoch = float(np.mean(state["epoch_seconds"])) if state["epoch_seconds"] else 0.0
    save_laser(writer.partial, model, best["items"], sequences, config, {
        "best_stage": best["stage"], "best_epoch": best["epoch"], "valid_metrics": best["metrics"],
        "trainable_parameters": n_trainable, "seconds_per_epoch": round(seconds_per_epoch, 2),
    })
    (writer.partial / RESUME_FILE).unlink(missing_ok=True)
    checkpoint = writer.commit()
    return LaserResult(checkpoint, best["stage"], best["epoch"], best["metrics"], seconds_per_epoch, n_trainable)


def _train_epoch(model, inputs, items, histories, targets, optimizer, scheduler, rng, cfg, progress, desc) -> float:
    model.train()
    bar = progress(total=len(targets), desc=desc)
    batches = length_batches(np.fromiter((len(h) for h in histories), dtype=np.int64), cfg.batch_size, rng)
    total = 0.0
    optimizer.zero_grad(set_to_none=True)
    for i, rows in enumerate(batches):
        users, lb_loss = model(*inputs.users([histories[r] for r in rows]))
        loss = model.loss(users, items, torch.from_numpy(targets[rows]), lb_loss)
        (loss / cfg.grad_accumulation).backward()
        if (i + 1) % cfg.grad_accumulation == 0 or i + 1 == len(batches):
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        total += loss.item()
        bar.update(len(rows))
        bar.set_postfix({"loss": f"{total / (i + 1):.4f}"})
    bar.close()
    return total / max(len(batches), 1)


def _save_resume(path: Path, state: dict, model, optimizer, scheduler, rng: np.random.Generator) -> None:
    payload = {**state, "model": model.trainable_state_dict(), "optimizer": optimizer.state_dict(),
               "scheduler": scheduler.state_dict(), "numpy_rng": rng.bit_generator.state,
               "torch_rng": torch.get_rng_state()}
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def _load_resume(path: Path, model, optimizer, scheduler, rng: np.random.Generator, fresh: dict) -> dict:
    try:
        payload = torch.load(path, weights_only=False)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot resume ({first_line(e)})") from e
    for key in ("config", "llm_fingerprint"):
        if payload.get(key) != fresh[key]:
            raise CheckpointError(f"{path}: the interrupted run used another {key.replace('_', ' ')}; "
                                  "start over without --resume")
    model.load_state_dict(payload.pop("model"), strict=True)
    optimizer.load_state_dict(payload.pop("optimizer"))
    scheduler.load_state_dict(payload.pop("scheduler"))
    rng.bit_generator.state = payload.pop("numpy_rng")
    torch.set_rng_state(payload.pop("torch_rng"))
    return payload
