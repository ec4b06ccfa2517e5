"""What a Laser training run works with (`LaserTraining`) and carries from epoch to epoch (`LaserState`).

After every epoch both go to RUN_DIR/.laser.partial/resume.safetensors (tensors in the body, the rest as JSON in
its header: laser_batch.state_file, no pickle), so an interrupted run continues from its last finished epoch with
the same weights, optimizer moments, learning-rate schedule and random generators: the same result as a run that
was never interrupted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from laser_batch.config import LaserConfig
from laser_batch.contracts import first_line
from laser_batch.encode import LaserInputs, encode_items, encode_users, laser_scorer, recenter_users
from laser_batch.errors import CheckpointError
from laser_batch.metrics import (
    exclude_items,
    metric_per_user,
    metrics_from_ranks,
    paired_bootstrap,
    rank_targets,
    target_ranks,
)
from laser_batch.model import Laser
from laser_batch.sasrec import SASRec
from laser_batch.sequences import Sequences
from laser_batch.state_file import read_state, write_state
from laser_batch.training import Progress

RESUME_FILE = "resume.safetensors"
LEGACY_RESUME_FILE = "resume.pt"  # pickled by earlier versions: refused, never loaded
RESUME_FORMAT_VERSION = 2
# The values `laser.gate_fit = "valid"` chooses g from: 0 (SASRec alone) and 33 steps of about 1.33x from 1e-3 to 10.
# g / tau multiplies a cosine, SASRec's scores are unnormalised dot products: the useful g depends on their scale.
GATE_GRID = (0.0, *(float(np.float32(f"{g:.3g}")) for g in np.geomspace(1e-3, 10.0, 33)))  # float32-exact


@dataclass
class LaserTraining:
    """Everything an epoch works with: the model and its inputs, the optimisation, the data and the settings."""

    model: Laser
    inputs: LaserInputs
    sequences: Sequences
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    rng: np.random.Generator  # training samples and batch order
    config: LaserConfig
    progress: Progress
    valid: tuple[list[np.ndarray], np.ndarray]  # (histories, targets) that select the best epoch
    ks: list[int]
    eval_batch_size: int
    select: str  # the validation metric that picks the best epoch
    centre_histories: list[np.ndarray]  # the fixed sample `laser.center_users` centres users by
    heldout: SASRec | None = None  # `laser.gate_fit = "residual"`: the SASRec whose scores offset the training logits

    @torch.no_grad()
    def offsets(self, id_history: torch.Tensor) -> torch.Tensor | None:
        """The held-out SASRec's scores (B, N) for a training batch (None unless `gate_fit = "residual"`)."""
        if self.heldout is None:
            return None
        return self.heldout(id_history)[:, -1] @ self.heldout.item_vectors().T

    def encode_catalogue(self) -> torch.Tensor:
        """Re-encode every item (stage 1's item matrix), re-centring users and items as configured: (N, D)."""
        bar = self.progress(total=self.sequences.num_items, desc="encoding items")
        items = encode_items(self.model, self.inputs, self.sequences.num_items, batch_size=self.config.item_batch_size,
                             progress=bar, recenter=True)
        bar.close()
        if self.config.center_users:
            recenter_users(self.model, self.inputs, self.centre_histories, batch_size=self.config.item_batch_size)
        return items

    def validate(self, items: torch.Tensor) -> dict[str, float]:
        """Full-ranking metrics of the validation users against `items`.

        With the gated fusion and `laser.gate_fit = "valid"` or "residual" this first sets g (`fit_gate`) and returns
        the fused model's metrics at that g.
        """
        if self.model.fused and self.config.gate_fit in ("valid", "residual"):
            return self.fit_gate(items)
        histories, targets = self.valid
        scorer = laser_scorer(self.model, self.inputs, items, batch_size=self.config.item_batch_size)
        return metrics_from_ranks(rank_targets(scorer, histories, targets, batch_size=self.eval_batch_size), self.ks)

    @torch.no_grad()
    def fit_gate(self, items: torch.Tensor) -> dict[str, float]:
        """Set the fusion gate g to the `GATE_GRID` value whose fused scores rank the validation targets best.

        Each validation user is encoded once; SASRec's scores S and Laser's cosines C then give every candidate's
        ranking S + g * C / tau (history excluded, as `validate` ranks). Ties go to the smaller g, so g = 0 (SASRec's
        exact ranking) stays unless Laser's part improves the selection metric, and with `laser.gate_guard` unless
        the improvement's paired 95% bootstrap interval over these users is above 0 (else g = 0). Returns the metrics
        at the chosen g with "laser_alone_<select>" (Laser's cosine ranking by itself) added as a diagnostic, and
        with the guard "gate_fitted" (the best g before it) and "gate_gain_ci95_low" (the interval's lower end).
        """
        histories, targets = self.valid
        ranks = gate_grid_ranks(self.model, self.inputs, items, histories, targets,
                                batch_size=self.eval_batch_size, encode_batch_size=self.config.item_batch_size)
        chosen, metrics = choose_gate(ranks, self.ks, self.select, guard=self.config.gate_guard)
        self.model.gate.fill_(GATE_GRID[chosen])
        return metrics


@torch.no_grad()
def gate_grid_ranks(model: Laser, inputs: LaserInputs, items: torch.Tensor, histories: list[np.ndarray],
                    targets: np.ndarray, *, batch_size: int, encode_batch_size: int) -> np.ndarray:
    """The targets' ranks (len(GATE_GRID) + 1, users) under S + g * C / tau for each g of `GATE_GRID`, and last
    under Laser's cosine C alone; each user is encoded once, history excluded."""
    tau = model.config.temperature
    ranks = np.empty((len(GATE_GRID) + 1, len(targets)), dtype=np.int64)
    for start in range(0, len(targets), batch_size):
        stop = min(start + batch_size, len(targets))
        batch = list(histories[start:stop])
        cosine = encode_users(model, inputs, batch, batch_size=encode_batch_size) @ items.T
        sasrec = model.sasrec_scores(inputs.id_history(batch))
        candidates = [sasrec + g * cosine / tau for g in GATE_GRID] + [cosine]
        for row, scores in enumerate(candidates):
            scores = scores.numpy().astype(np.float32)
            exclude_items(scores, batch)
            ranks[row, start:stop] = target_ranks(scores, targets[start:stop])
    return ranks


def choose_gate(ranks: np.ndarray, ks: list[int], select: str, *, guard: bool) -> tuple[int, dict[str, float]]:
    """(index into `GATE_GRID`, the metrics at it) from `gate_grid_ranks`' output: the best `select`, ties to the
    smaller g; with `guard`, 0 unless the gain over g = 0 has a paired 95% bootstrap interval above 0."""
    per_gate = [metrics_from_ranks(r, ks) for r in ranks[:-1]]
    best = max(range(len(GATE_GRID)), key=lambda j: (per_gate[j][select], -j))
    checked = {}
    if best and guard:  # is the gain over SASRec alone more than noise on these users?
        _, (low, _) = paired_bootstrap(metric_per_user(ranks[0], select), metric_per_user(ranks[best], select))
        checked = {"gate_fitted": GATE_GRID[best], "gate_gain_ci95_low": low}
        if low <= 0:
            best = 0
    alone = metrics_from_ranks(ranks[-1], ks)[select]
    return best, {**per_gate[best], f"laser_alone_{select}": alone, **checked}


@dataclass
class Best:
    """The best validated epoch so far: where it was, its metrics, its trained weights and its item matrix."""

    stage: int
    epoch: int
    metrics: dict[str, float]
    items: torch.Tensor  # (N, D)
    weights: dict[str, torch.Tensor]


@dataclass
class LaserState:
    """What the epoch loop carries from one epoch to the next (and a resumed run picks up)."""

    config: dict  # the run's whole configuration: a resumed run must use the same
    llm_fingerprint: str
    stage: int = 1  # the stage in progress (3 once both are done)
    epoch: int = 0  # the last finished epoch of `stage`
    stale: int = 0  # epochs of `stage` since the best one improved (for `laser.patience`)
    best: Best | None = None
    frozen_items: torch.Tensor | None = None  # stage 2's item matrix, (N, D)
    epoch_seconds: list[float] = field(default_factory=list)

    def record(self, stage: int, epoch: int, metrics: dict[str, float], items: torch.Tensor, model: Laser,
               select: str) -> None:
        """Count a finished epoch, keeping its weights and items when `select` improved."""
        self.stage, self.epoch = stage, epoch
        if self.best is None or metrics[select] > self.best.metrics[select]:
            weights = {k: v.clone() for k, v in model.trainable_state_dict().items()}
            self.best, self.stale = Best(stage, epoch, metrics, items.clone(), weights), 0
        else:
            self.stale += 1

    def finish_stage(self) -> None:
        self.stage, self.epoch, self.stale = self.stage + 1, 0, 0

    def to_tree(self) -> dict[str, Any]:
        return {**vars(self), "best": None if self.best is None else vars(self.best)}

    @classmethod
    def from_tree(cls, tree: dict[str, Any]) -> LaserState:
        best = tree["best"]
        return cls(**{**tree, "best": None if best is None else Best(**best)})


def save_resume(directory: Path, training: LaserTraining, state: LaserState) -> None:
    """Write the state of `training` and `state` to DIRECTORY/resume.safetensors (atomically)."""
    write_state(Path(directory) / RESUME_FILE, {
        "format_version": RESUME_FORMAT_VERSION,
        "state": state.to_tree(),
        "model": training.model.trainable_state_dict(),
        "optimizer": training.optimizer.state_dict(),
        "scheduler": training.scheduler.state_dict(),
        "numpy_rng": training.rng.bit_generator.state,
        "torch_rng": torch.get_rng_state(),
    })


def load_resume(directory: Path, training: LaserTraining, fresh: LaserState) -> LaserState:
    """Restore `training` from DIRECTORY/resume.safetensors and return the saved state; `fresh` if there is none.

    The file must come from a run with the same configuration and LLM. An old pickled resume.pt is refused
    unread: reading it could run code.
    """
    path, legacy = Path(directory) / RESUME_FILE, Path(directory) / LEGACY_RESUME_FILE
    if not path.exists():
        if legacy.exists():
            raise CheckpointError(f"{legacy}: a pickled resume file, which laser-batch does not load (it can run "
                                  "code); start over without --resume")
        return fresh
    tree = read_state(path)
    if tree.get("format_version") != RESUME_FORMAT_VERSION:
        raise CheckpointError(f"{path}: resume format version {tree.get('format_version')!r}, expected "
                              f"{RESUME_FORMAT_VERSION}; start over without --resume")
    saved = tree["state"]
    for key in ("config", "llm_fingerprint"):
        if saved.get(key) != getattr(fresh, key):
            raise CheckpointError(f"{path}: the interrupted run used another {key.replace('_', ' ')}; "
                                  "start over without --resume")
    try:
        training.model.load_state_dict(tree["model"], strict=True)
        training.optimizer.load_state_dict(tree["optimizer"])
        training.scheduler.load_state_dict(tree["scheduler"])
        training.rng.bit_generator.state = tree["numpy_rng"]
        torch.set_rng_state(tree["torch_rng"])
        return LaserState.from_tree(saved)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: cannot resume ({first_line(e)})") from e
