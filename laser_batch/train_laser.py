"""Two-stage training of Laser (DESIGN.md section 1).

Stage 1: at the start of every epoch, re-encode every catalogue item (no grad) into the item matrix I,
train the user side against I, validate; keep the best epoch (weights and I).
Stage 2: freeze I (stage 1's best), train the user side more epochs, keep the best validation checkpoint.
With `laser.fusion = "gated"` the untrained model (gate g = 0: SASRec's exact ranking) is validated first, as stage 1
epoch 0, and stays the best unless an epoch beats it; every epoch's g goes into metrics.jsonl and the best one's into
config.json.

AdamW with linear warmup and cosine decay over both stages, gradient accumulation, seeds. After every
epoch the full training state goes to RUN_DIR/.laser.partial/resume.safetensors (laser_batch.laser_state),
so `resume=True` continues an interrupted run from its last finished epoch.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from laser_batch.checkpoint import LASER_DIR, SASREC_DIR, StageWriter, load_sasrec, read_run_info, save_laser
from laser_batch.config import Config
from laser_batch.contracts import load_data_dir
from laser_batch.encode import LaserInputs, laser_inputs
from laser_batch.laser_state import RESUME_FILE, LaserState, LaserTraining, load_resume, save_resume
from laser_batch.llm import FrozenLLM, load_llm
from laser_batch.metrics import DEFAULT_KS
from laser_batch.model import Laser
from laser_batch.sasrec import SASRec
from laser_batch.sequences import Sequences, build_sequences, evenly_spread, length_batches
from laser_batch.train import fit_sasrec
from laser_batch.training import NoProgress, Progress, seed_everything

logger = logging.getLogger(__name__)
HELDOUT_SASREC_FILE = "heldout_sasrec.safetensors"  # in RUN_DIR/.laser.partial while training (gate_fit = "residual")


@dataclass
class LaserResult:
    checkpoint: Path
    best_stage: int
    best_epoch: int
    valid_metrics: dict[str, float]
    seconds_per_epoch: float
    trainable_parameters: int
    gate: float | None = None  # the fusion gate g of the best epoch (None without fusion)


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
        resume: continue from RUN_DIR/.laser.partial/resume.safetensors instead of starting over.
        progress: progress-bar factory (item re-encoding and training epochs).
    """
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    seed_everything(config.train.seed)
    model, inputs, sequences = build_laser(config, run_dir, llm)
    writer = StageWriter(run_dir, LASER_DIR, overwrite=overwrite, keep_partial=resume)
    training = _prepare(config, model, inputs, sequences, progress)
    if model.fused and config.laser.gate_fit == "residual":
        training.heldout = heldout_sasrec(config, sequences, writer.partial, progress)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("Laser: %d trainable parameters; LLM %s (%s)", n_trainable, model.llm.source,
                model.llm.fingerprint[:12])

    state = LaserState(config=config.to_dict(), llm_fingerprint=model.llm.fingerprint)
    if resume:
        state = load_resume(writer.partial, training, state)
        if state.epoch:
            logger.info("resuming after stage %d epoch %d", state.stage, state.epoch)
        elif state.stage > 1:
            logger.info("resuming at the start of stage %d", state.stage)
    if model.fused and state.best is None:
        _validate_start(training, state, writer)
    for stage, epochs in ((1, config.laser.stage1_epochs), (2, config.laser.stage2_epochs)):
        if stage >= state.stage and epochs > 0:
            _train_stage(training, state, writer, stage, epochs)

    best = state.best
    model.load_state_dict(best.weights, strict=True)
    seconds_per_epoch = float(np.mean(state.epoch_seconds)) if state.epoch_seconds else 0.0
    save_laser(writer.partial, model, best.items, sequences, config, {
        "best_stage": best.stage, "best_epoch": best.epoch, "valid_metrics": best.metrics,
        "trainable_parameters": n_trainable, "seconds_per_epoch": round(seconds_per_epoch, 2),
        **_gate_record(model),
    })
    (writer.partial / RESUME_FILE).unlink(missing_ok=True)
    (writer.partial / HELDOUT_SASREC_FILE).unlink(missing_ok=True)
    checkpoint = writer.commit()
    return LaserResult(checkpoint, best.stage, best.epoch, best.metrics, seconds_per_epoch, n_trainable,
                       model.gate_value)


def heldout_sasrec(config: Config, sequences: Sequences, directory: Path, progress: Progress = NoProgress) -> SASRec:
    """A SASRec (the run's settings) fitted without each training sequence's last item, for `gate_fit = "residual"`.

    Laser's training samples predict that last item (`training_samples`), which the run's own SASRec was trained on:
    its scores there are far more confident than at validation or test. This one never saw it, so its scores for
    the training samples are out-of-sample as the run's SASRec's are for the validation and test targets. Its epoch
    is chosen on that held-out item. Kept in `directory` (the run's .laser.partial) so that a resumed run reuses it.
    """
    path = Path(directory) / HELDOUT_SASREC_FILE
    if path.is_file():
        model = SASRec(config.sasrec, sequences.num_items)
        model.load_state_dict(load_file(str(path)))
        return model.eval().requires_grad_(False)
    cut = [s[:-1] for s in sequences.train_sequences()]
    kept = [i for i, s in enumerate(cut) if len(s) >= 1]
    valid = ([cut[i] for i in kept], np.asarray([sequences.train_sequences()[i][-1] for i in kept], dtype=np.int64))
    fit = fit_sasrec(config, sequences.num_items, cut, valid, progress)
    logger.info("held-out SASRec: best epoch %d of %d, %s on each training sequence's last item %.4f",
                fit.best_epoch, fit.epochs_run, config.train.select_metric,
                fit.valid_metrics[config.train.select_metric])
    save_file({k: v.contiguous() for k, v in fit.model.state_dict().items()}, str(path))
    return fit.model.requires_grad_(False)


def validation_users(sequences: Sequences, count: int) -> tuple[list[np.ndarray], np.ndarray]:
    """(histories, targets) of the validation split that select the best epoch and fit g: all users, or with
    `laser.valid_users` = count a fixed, evenly spread subset of them (CPU budgets)."""
    histories, targets = sequences.split("valid")
    if count and count < len(targets):
        rows = evenly_spread(len(targets), count)
        histories, targets = [histories[r] for r in rows], targets[rows]
    return histories, targets


def _prepare(config: Config, model: Laser, inputs: LaserInputs, sequences: Sequences,
             progress: Progress) -> LaserTraining:
    """The optimiser, schedule, random generator and data subsets of a fresh run."""
    cfg = config.laser
    optimizer = torch.optim.AdamW(parameter_groups(model, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay)
    users_per_epoch = len(training_samples(sequences, cfg.samples_per_user, np.random.default_rng(0))[1])
    steps_per_epoch = math.ceil(math.ceil(users_per_epoch / cfg.batch_size) / cfg.grad_accumulation)
    scheduler = warmup_cosine(optimizer, steps_per_epoch * (cfg.stage1_epochs + cfg.stage2_epochs), cfg.warmup_ratio)
    valid_histories, valid_targets = validation_users(sequences, cfg.valid_users)
    centre_histories = []
    if cfg.center_users:  # a fixed sample of histories before each last training item
        train_histories = training_samples(sequences, 1, np.random.default_rng(0))[0]
        centre_histories = [train_histories[r] for r in evenly_spread(len(train_histories), cfg.center_users)]
    return LaserTraining(
        model=model, inputs=inputs, sequences=sequences, optimizer=optimizer, scheduler=scheduler,
        rng=np.random.default_rng(config.train.seed), config=cfg, progress=progress,
        valid=(valid_histories, valid_targets), ks=sorted({*DEFAULT_KS, *config.train.select_ks}),
        eval_batch_size=config.train.eval_batch_size, select=config.train.select_metric,
        centre_histories=centre_histories,
    )


def parameter_groups(model: Laser, cfg) -> list[dict]:
    """AdamW's groups: every trained weight at laser.lr, and a fused model's gate at laser.gate_lr without decay."""
    weights = [p for name, p in model.named_parameters() if p.requires_grad and name != "gate"]
    if not model.fused or not isinstance(model.gate, torch.nn.Parameter):  # gate_fit = "valid": g is not trained
        return [{"params": weights}]
    return [{"params": weights}, {"params": [model.gate], "lr": cfg.gate_lr or cfg.lr, "weight_decay": 0.0}]


def _gate_record(model: Laser) -> dict:
    """{"gate": g} for a fused model (what its metrics lines and config.json report), {} otherwise."""
    return {"gate": model.gate_value} if model.fused else {}


def _validate_start(training: LaserTraining, state: LaserState, writer: StageWriter) -> None:
    """Validate the untrained fused model (g = 0: SASRec's ranking) and record it as stage 1 epoch 0.

    Model selection then keeps SASRec's ranking unless an epoch beats it on validation.
    """
    items = training.encode_catalogue()
    metrics = training.validate(items)
    writer.append_metrics({"stage": 1, "epoch": 0, "split": "valid", **_gate_record(training.model), **metrics})
    logger.info("start (gate %.4f) valid %s", training.model.gate_value,
                " ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    state.record(1, 0, metrics, items, training.model, training.select)
    save_resume(writer.partial, training, state)


def _train_stage(training: LaserTraining, state: LaserState, writer: StageWriter, stage: int, epochs: int) -> None:
    """Train the epochs of `stage` left to do, validating, recording and saving the state after each."""
    if stage == 2 and state.frozen_items is None:
        if state.best is not None:  # stage 2 starts from stage 1's best weights and item matrix
            training.model.load_state_dict(state.best.weights, strict=True)
            state.frozen_items = state.best.items
        else:  # stage 1 skipped: freeze the items as the untrained model encodes them
            state.frozen_items = training.encode_catalogue()
    first = state.epoch + 1 if stage == state.stage else 1
    for epoch in range(first, epochs + 1):
        started = time.perf_counter()
        if stage == 2:
            items = state.frozen_items
        elif epoch == 1 and state.best is not None and (state.best.stage, state.best.epoch) == (1, 0):
            items = state.best.items  # the start was just encoded with the same weights (`_validate_start`)
        else:
            items = training.encode_catalogue()
        loss = _train_epoch(training, items, f"laser stage {stage} epoch {epoch}")
        metrics = training.validate(items)
        seconds = time.perf_counter() - started
        state.epoch_seconds.append(seconds)
        writer.append_metrics({"stage": stage, "epoch": epoch, "loss": loss, "seconds": round(seconds, 2),
                               "split": "valid", **_gate_record(training.model), **metrics})
        logger.info("stage %d epoch %d loss %.4f valid %s", stage, epoch, loss,
                    " ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        state.record(stage, epoch, metrics, items, training.model, training.select)
        patience_ran_out = bool(training.config.patience) and state.stale >= training.config.patience
        if patience_ran_out:
            logger.info("stage %d: no better validation %s for %d epochs", stage, training.select, state.stale)
        if patience_ran_out or epoch == epochs:
            state.finish_stage()  # before saving, so that a resumed run does not reopen a finished stage
        save_resume(writer.partial, training, state)
        if patience_ran_out:
            break


def _train_epoch(training: LaserTraining, items: torch.Tensor, desc: str) -> float:
    """One pass over freshly drawn training samples against the item matrix `items`; returns the mean loss."""
    model, cfg, optimizer = training.model, training.config, training.optimizer
    histories, targets = training_samples(training.sequences, cfg.samples_per_user, training.rng)
    model.train()
    bar = training.progress(total=len(targets), desc=desc)
    batches = length_batches(np.fromiter((len(h) for h in histories), dtype=np.int64), cfg.batch_size,
                             rng=training.rng)
    total = 0.0
    optimizer.zero_grad(set_to_none=True)
    for i, rows in enumerate(batches):
        loss = training_loss(training, [histories[r] for r in rows], targets[rows], items)
        (loss / cfg.grad_accumulation).backward()
        if (i + 1) % cfg.grad_accumulation == 0 or i + 1 == len(batches):
            optimizer.step()
            training.scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        total += loss.item()
        bar.update(len(rows))
        bar.set_postfix({"loss": f"{total / (i + 1):.4f}"})
    bar.close()
    return total / max(len(batches), 1)


def training_loss(training: LaserTraining, histories: list[np.ndarray], targets: np.ndarray,
                  items: torch.Tensor) -> torch.Tensor:
    """One batch's loss (before backward): the user side's training forward against the item matrix `items`."""
    batch = training.inputs.users(histories)
    users, lb_loss = training.model.training_forward(*batch)
    return training.model.loss(users, items, torch.from_numpy(targets), lb_loss, id_history=batch[0],
                               offsets=training.offsets(batch[0]))
