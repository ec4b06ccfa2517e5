"""Batched, no-grad encoding of users and items with a Laser model (training-time re-encoding and evaluation).

Batches are grouped by text length so that little of the LLM's work is spent on padding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl
import torch

from laser_batch.config import TextConfig
from laser_batch.model import Laser
from laser_batch.sequences import Sequences, length_batches, pad_left
from laser_batch.text import TextEncoder


@dataclass
class LaserInputs:
    """Turns histories of internal item ids into the three tensors Laser takes."""

    text: TextEncoder
    sasrec_max_len: int

    def users(self, histories: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(id_history (B, S), input_ids (B, T), attention_mask (B, T)) for user histories (oldest first)."""
        input_ids, attention_mask = self.text.encode_users(histories)
        return self.id_history(histories), torch.from_numpy(input_ids), torch.from_numpy(attention_mask)

    def id_history(self, histories: Sequence[np.ndarray]) -> torch.Tensor:
        """SASRec's input (B, S): the histories left-padded to the longest, cut to SASRec's max_len last items."""
        width = min(self.sasrec_max_len, max(len(h) for h in histories))
        return torch.from_numpy(pad_left(list(histories), width))

    def items(self, item_ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The same for items: each item is a one-item history (its M-Former input: `laser.item_id_vector`)."""
        input_ids, attention_mask = self.text.encode_items(item_ids)
        return (torch.from_numpy(np.asarray(item_ids, dtype=np.int64)[:, None]), torch.from_numpy(input_ids),
                torch.from_numpy(attention_mask))


def laser_inputs(llm, items: pl.DataFrame, sequences: Sequences, text_config: TextConfig, sasrec_max_len: int):
    """LaserInputs for a catalogue: `items` is items.parquet, put into the internal-id order of `sequences`."""
    ordered = pl.DataFrame({"item_id": sequences.item_ids}).join(items, on="item_id", how="left", maintain_order="left")
    text = TextEncoder(llm.tokenizer.backend_tokenizer, ordered, text_config, pad_id=llm.tokenizer.pad_token_id)
    return LaserInputs(text, sasrec_max_len)


@torch.no_grad()
def encode_items(
    model: Laser, inputs: LaserInputs, num_items: int, *, batch_size: int, progress=None, recenter: bool = False
) -> torch.Tensor:
    """Embeddings of every catalogue item: (N, D) float32, L2-normalised, row j = internal item j + 1.

    With `recenter` (training's item re-encoding) and `laser.center` on, the model's centering vector is
    first set to the mean raw embedding of the catalogue, so users and items are centred alike.
    """
    was_training = model.training
    model.eval()
    item_ids = np.arange(1, num_items + 1)
    out = torch.empty(num_items, model.llm.hidden_size)
    lengths = inputs.text.lengths([np.array([i]) for i in item_ids])
    recenter = recenter and model.config.center
    for rows in length_batches(lengths, batch_size):
        out[rows] = model(*inputs.items(item_ids[rows]), raw=recenter, items=True)[0]
        if progress is not None:
            progress.update(len(rows))
    if recenter:
        model.center.copy_(out.mean(0))
        out = torch.nn.functional.normalize(out - model.center, dim=-1)
    model.train(was_training)
    return out


@torch.no_grad()
def recenter_users(model: Laser, inputs: LaserInputs, histories: Sequence[np.ndarray], *, batch_size: int) -> None:
    """Set the model's user centre to the mean raw embedding of `histories` (`laser.center_users`)."""
    was_training = model.training
    model.eval()
    total = torch.zeros(model.llm.hidden_size)
    for rows in length_batches(inputs.text.lengths(histories), batch_size):
        total += model(*inputs.users([histories[r] for r in rows]), raw=True)[0].sum(0)
    model.user_center.copy_(total / len(histories))
    model.train(was_training)


@torch.no_grad()
def encode_users(
    model: Laser, inputs: LaserInputs, histories: Sequence[np.ndarray], *, batch_size: int
) -> torch.Tensor:
    """Embeddings of users from their histories: (B, D) float32, L2-normalised, in input order."""
    was_training = model.training
    model.eval()
    out = torch.empty(len(histories), model.llm.hidden_size)
    for rows in length_batches(inputs.text.lengths(histories), batch_size):
        out[rows] = model(*inputs.users([histories[r] for r in rows]))[0]
    model.train(was_training)
    return out


def laser_scorer(model: Laser, inputs: LaserInputs, item_matrix: torch.Tensor, *, batch_size: int):
    """A `score_batch` for metrics.rank_targets, (B, N): the cosine of each user with every item, or with
    `laser.fusion = "gated"` SASRec's scores + g * cosine / tau (`Laser.fused_scores`: at g = 0 exactly the scores
    `evaluate --model sasrec` ranks by, since the batch is padded as it pads it)."""

    def score(histories: Sequence[np.ndarray]) -> np.ndarray:
        cosine = encode_users(model, inputs, histories, batch_size=batch_size) @ item_matrix.T
        if not model.fused:
            return cosine.numpy()
        with torch.no_grad():
            return model.fused_scores(inputs.id_history(histories), cosine).numpy()

    return score
