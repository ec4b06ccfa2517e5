"""What both trainers (SASRec and Laser) and the evaluation share: progress bars, seeding, SASRec's scores."""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import torch

from laser_batch.sasrec import SASRec
from laser_batch.sequences import pad_left


class Progress(Protocol):
    """What the library needs from a progress bar (tqdm satisfies it); the CLI supplies one."""

    def __call__(self, *, total: int, desc: str) -> Any: ...


class NoProgress:
    """The default progress bar: shows nothing."""

    def __init__(self, *, total: int, desc: str) -> None: ...

    def update(self, n: int = 1) -> None: ...

    def set_postfix(self, values: dict) -> None: ...

    def close(self) -> None: ...


def seed_everything(seed: int) -> None:
    """Seed torch and numpy's global generator (model initialisation, dropout)."""
    torch.manual_seed(seed)
    np.random.seed(seed)


@torch.no_grad()
def sasrec_scores(model: SASRec, histories: list[np.ndarray]) -> np.ndarray:
    """Scores (B, N) over the catalogue from the vector at the last (most recent) position."""
    width = min(model.config.max_len, max(len(h) for h in histories))
    item_ids = torch.from_numpy(pad_left(histories, width))
    last = model(item_ids)[:, -1]  # (B, D): left padding puts the most recent item last
    return (last @ model.item_vectors().T).numpy()
