"""User sequences, contiguous internal ids and the deterministic leave-one-out split.

Internal item ids are 1..N (0 is padding), assigned in sorted order of the original item id; internal
user ids follow the sorted original user ids. For each user (time order, ties kept in file order):
the last item is the test target, the second last the validation target, the rest is training data.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from laser_batch.contracts import read_parquet
from laser_batch.errors import CheckpointError, InputError

ITEM_MAP_FILE = "item_ids.parquet"
USER_MAP_FILE = "user_ids.parquet"
MIN_INTERACTIONS = 3  # one to train on, one to validate, one to test
SPLITS = ("valid", "test")


@dataclass
class Sequences:
    """Time-ordered internal item ids per user, with the id maps."""

    user_ids: pl.Series  # original user id of internal user u (row u)
    item_ids: pl.Series  # original item id of internal item i is item_ids[i - 1]
    seqs: list[np.ndarray]  # int64 internal item ids per user, oldest first
    dropped_users: int  # users with fewer than MIN_INTERACTIONS interactions

    @property
    def num_items(self) -> int:
        return self.item_ids.len()

    @property
    def num_users(self) -> int:
        return self.user_ids.len()

    def train_sequences(self) -> list[np.ndarray]:
        """Everything before the validation target."""
        return [s[:-2] for s in self.seqs]

    def split(self, split: str) -> tuple[list[np.ndarray], np.ndarray]:
        """(histories, targets) for `split`: valid predicts the second last item, test the last."""
        if split not in SPLITS:
            raise InputError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
        cut = -2 if split == "valid" else -1
        histories = [s[:cut] for s in self.seqs]
        targets = np.fromiter((s[cut] for s in self.seqs), dtype=np.int64, count=len(self.seqs))
        return histories, targets

    def save_maps(self, directory: Path) -> None:
        pl.DataFrame({"index": np.arange(1, self.num_items + 1), "item_id": self.item_ids}).write_parquet(
            directory / ITEM_MAP_FILE
        )
        pl.DataFrame({"index": np.arange(self.num_users), "user_id": self.user_ids}).write_parquet(
            directory / USER_MAP_FILE
        )

    def check_maps(self, directory: Path) -> None:
        """Fail when the data no longer yields the id maps a checkpoint was trained with."""
        saved = read_parquet(directory / ITEM_MAP_FILE)["item_id"]
        if saved.dtype != self.item_ids.dtype or not saved.equals(self.item_ids):
            raise CheckpointError(
                f"{directory / ITEM_MAP_FILE}: the data's item catalogue differs from the one this model was "
                f"trained on ({self.num_items} items now, {saved.len()} then)"
            )


def build_sequences(interactions: pl.DataFrame, *, min_interactions: int = MIN_INTERACTIONS) -> Sequences:
    """Group interactions into per-user sequences ordered by (timestamp, row order).

    Users with fewer than `min_interactions` interactions are dropped and counted in the result.
    """
    ordered = (
        interactions.with_row_index("_row")
        .sort(["user_id", "timestamp", "_row"])
        .group_by("user_id", maintain_order=True)
        .agg(pl.col("item_id"))
    )
    keep = ordered["item_id"].list.len() >= min_interactions
    dropped = ordered.height - int(keep.sum())
    ordered = ordered.filter(keep)
    if ordered.height == 0:
        raise InputError(f"no user has at least {min_interactions} interactions ({dropped} users dropped)")

    item_ids = ordered["item_id"].explode().unique().sort()
    lookup = pl.DataFrame({"item_id": item_ids, "index": np.arange(1, item_ids.len() + 1, dtype=np.int64)})
    flat = ordered.select(pl.col("item_id").explode()).join(lookup, on="item_id", how="left", maintain_order="left")
    lengths = ordered["item_id"].list.len().to_numpy()
    seqs = np.split(flat["index"].to_numpy(), np.cumsum(lengths)[:-1])
    return Sequences(user_ids=ordered["user_id"], item_ids=item_ids, seqs=seqs, dropped_users=dropped)


def evenly_spread(total: int, count: int) -> np.ndarray:
    """Indices of at most `count` of `total` rows, spread evenly from the first to the last (deterministic)."""
    return np.unique(np.linspace(0, total - 1, num=min(count, total)).astype(np.int64))


def pad_left(seqs: list[np.ndarray], maxlen: int) -> np.ndarray:
    """Keep the last `maxlen` items of each sequence, left-padded with 0: shape (len(seqs), maxlen)."""
    out = np.zeros((len(seqs), maxlen), dtype=np.int64)
    for row, seq in enumerate(seqs):
        tail = seq[-maxlen:]
        if len(tail):
            out[row, maxlen - len(tail):] = tail
    return out


def length_batches(lengths: np.ndarray, batch_size: int, *, max_tokens: int | None = None,
                   rng: np.random.Generator | None = None, pool: int = 32) -> list[np.ndarray]:
    """Batches of row indices in which sequences have similar lengths: the package's one length-batcher.

    Without `rng` (inference): rows sorted by length (shortest first, ties in row order) and cut into batches of at
    most `batch_size` rows and, with `max_tokens`, at most `max_tokens` padded tokens (rows x the longest length in
    the batch; a row longer than `max_tokens` forms a batch alone).

    With `rng` (training): rows are shuffled, cut into pools of `pool` batches, sorted by length inside each pool
    and batched; the batches are then shuffled. Short batches are trimmed to their longest sequence, which saves
    most of the attention work on padding, while every epoch still sees a fresh random order.
    """
    lengths = np.asarray(lengths)
    if rng is not None:
        order = rng.permutation(len(lengths))
        batches = []
        for start in range(0, len(order), batch_size * pool):
            chunk = order[start:start + batch_size * pool]
            chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
            batches.extend(chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size))
        return [batches[i] for i in rng.permutation(len(batches))]
    order = np.argsort(lengths, kind="stable")
    if max_tokens is None:
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    sorted_lengths = np.maximum(lengths[order], 1)
    out, start = [], 0
    while start < len(order):
        # Lengths grow along `order`: the first k candidates pad to the k-th one's length.
        candidates = sorted_lengths[start:start + batch_size]
        fits = np.arange(1, len(candidates) + 1) * candidates <= max_tokens  # True, ..., True, False, ...
        count = len(candidates) if fits.all() else max(1, int(np.argmin(fits)))
        out.append(order[start:start + count])
        start += count
    return out
