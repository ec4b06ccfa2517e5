"""Readable output of the scoring job: explanations, item columns, the score's scale and the layout. No torch.

- `--explain` adds `because_item_id`: the item of the user's history whose item embedding (its row of
  `item_matrix.npy`) has the highest cosine with the recommended item's; always an item of that user's (known)
  history; on ties the most recent one.
- `--with-item-columns title,brand` joins those columns of the artefacts' `items.parquet` into the output.
- `--score cosine` (default) writes the score the model ranks by: the cosine for Laser, the dot product for SASRec
  and for the gated fusion (SASRec dot + g * cosine / tau). `--score prob` writes an estimate of the probability
  that the item is the user's next one: the softmax over the whole catalogue of the model's ranking logits, the ones
  its training loss used: cosine / tau for Laser (tau: the training temperature, from the manifest), the score as
  it is for SASRec and the gated fusion (whose user vector already carries g / tau). It is taken before any
  filter or history exclusion, so the K probabilities of a user do not sum to 1.
- `--layout long` (default): one row per (user, rank); `--layout list`: one row per user, `user_id`, `item_ids`
  and `scores` as lists (best first), the optional columns as lists under their own names. `scan_recommendations`
  reads either back as the long frame (what `evaluate --recs`, `--show` and `report` read).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from laser_batch.artifacts import ITEM_IDS, ITEMS_TEXT, load_manifest
from laser_batch.errors import ArtifactError, InputError

SCORES = ("cosine", "prob")
LAYOUTS = ("long", "list")
BECAUSE = "because_item_id"
RESERVED = ("user_id", "rank", "item_id", "score", "source", BECAUSE, "item_ids", "scores")


@dataclass
class OutputOptions:
    """Prepared output options (picklable: Ray ships them to its actors). The default changes nothing.

    Attributes:
        explain: add `because_item_id`.
        item_columns: the asked columns of items.parquet, row j = internal item j + 1 (None: none asked).
        score: "cosine" (the ranking score) or "prob".
        logit_scale: the model's ranking logits are `logit_scale * score` (1 / tau for Laser's cosine, else 1).
        layout: "long" or "list".
    """

    explain: bool = False
    item_columns: pl.DataFrame | None = None
    score: str = "cosine"
    logit_scale: float = 1.0
    layout: str = "long"

    def log_normaliser(self, scores: np.ndarray) -> np.ndarray | None:
        """(b,) log of the softmax's denominator over every item of `scores` (b, N), for `--score prob`; else None."""
        if self.score != "prob":
            return None
        logits = scores.astype(np.float64) * self.logit_scale
        top = logits.max(axis=1, keepdims=True)
        return (top + np.log(np.exp(logits - top).sum(axis=1, keepdims=True)))[:, 0]

    def finish_scores(self, scores: np.ndarray, normaliser: np.ndarray | None) -> np.ndarray:
        """The written scores of the chosen items (b, k): as they are, or their softmax probabilities."""
        if normaliser is None:
            return scores
        with np.errstate(invalid="ignore"):  # -inf (empty slots) give 0
            return np.exp(scores.astype(np.float64) * self.logit_scale - normaliser[:, None]).astype(np.float32)

    def because(self, top: np.ndarray, filled: np.ndarray, histories: list[np.ndarray],
                item_matrix: np.ndarray) -> np.ndarray:
        """(B, k) the column (internal id - 1) of the history item closest (cosine of item rows) to each item."""
        out = np.zeros(top.shape, dtype=np.int64)
        for j, history in enumerate(histories):
            recent = history[::-1]
            _, first = np.unique(recent, return_index=True)
            items = recent[np.sort(first)] - 1  # distinct history items, most recent first (ties go to it)
            chosen = top[j, filled[j]]
            similarity = _normalised(item_matrix[chosen]) @ _normalised(item_matrix[items]).T  # (k, h)
            out[j, :len(chosen)] = items[similarity.argmax(axis=1)]
        return out

    def finish(self, recs: pl.DataFrame, columns: np.ndarray) -> pl.DataFrame:
        """The written frame from the long frame `recs` (user_id, rank, item_id, score, ...) whose rows are the items
        at `columns` (internal id - 1): item columns joined, then the layout."""
        if self.item_columns is not None:
            recs = recs.with_columns(self.item_columns[columns])
        if self.layout == "long":
            return recs
        rest = [c for c in recs.columns if c not in ("user_id", "rank", "item_id", "score")]
        return recs.group_by("user_id", maintain_order=True).agg(
            pl.col("item_id").alias("item_ids"), pl.col("score").alias("scores"), *rest)


def scan_recommendations(parts: Sequence[Path]) -> tuple[pl.LazyFrame, str]:
    """(user_id, rank, item_id, score) of the part files of a job's output in either layout, and that layout.

    Raises:
        InputError: the part files have neither layout's columns (the first file is named).
    """
    scan = pl.scan_parquet(list(parts))
    names = set(scan.collect_schema().names())
    if {"user_id", "item_ids", "scores"} <= names:  # `--layout list`: one row per user, best first
        long = scan.select("user_id", item_id="item_ids", score="scores").explode("item_id", "score").with_columns(
            rank=pl.int_range(1, pl.len() + 1).over("user_id"))
        return long.select("user_id", "rank", "item_id", "score"), "list"
    if {"user_id", "rank", "item_id", "score"} <= names:
        return scan.select("user_id", "rank", "item_id", "score"), "long"
    raise InputError(f"{parts[0]}: neither output layout (user_id, rank, item_id, score or user_id, item_ids, "
                     f"scores); its columns: {', '.join(sorted(names))}")


def _normalised(rows: np.ndarray) -> np.ndarray:
    rows = rows.astype(np.float32)
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)


def options_record(options) -> dict:
    """What the job file records of the output options."""
    return {"explain": options.explain, "with_item_columns": list(_column_names(options.with_item_columns)),
            "score": options.score, "layout": options.layout}


def prepare(artifacts: Path, *, explain: bool = False, with_item_columns: str | Sequence[str] = (),
            score: str = "cosine", layout: str = "long") -> OutputOptions:
    """Check the output options against the artefacts; no model is loaded.

    Raises:
        InputError: an unknown score or layout, an item column the artefacts do not have, or one whose name the
            output already uses.
        ArtifactError: `--score prob` with Laser artefacts that do not record the training temperature.
    """
    if score not in SCORES:
        raise InputError(f"--score {score}: expected one of {', '.join(SCORES)}")
    if layout not in LAYOUTS:
        raise InputError(f"--layout {layout}: expected one of {', '.join(LAYOUTS)}")
    artifacts = Path(artifacts)
    manifest = load_manifest(artifacts, verify=False, check_graphs=False)
    names = _column_names(with_item_columns)
    item_columns = None
    if names:
        taken = [n for n in names if n in RESERVED]
        if taken:
            raise InputError(f"--with-item-columns {taken[0]}: the output already has a column of that name")
        if len(set(names)) != len(names):
            raise InputError(f"--with-item-columns {','.join(names)}: a column is named twice")
        path = artifacts / ITEMS_TEXT
        if not path.exists():
            raise InputError(f"--with-item-columns: {artifacts} has no {ITEMS_TEXT} (SASRec-only artefacts carry no "
                             "item columns)")
        available = pl.read_parquet_schema(path)
        missing = [n for n in names if n not in available]
        if missing:
            raise InputError(f"--with-item-columns {missing[0]}: no such column in {path} (columns: "
                             f"{', '.join(c for c in available if c != 'item_id')})")
        order = pl.read_parquet(artifacts / ITEM_IDS, columns=["index", "item_id"]).sort("index")
        item_columns = order.join(pl.read_parquet(path, columns=["item_id", *names]), on="item_id", how="left",
                                  maintain_order="left").select(names)
    scale = 1.0
    if score == "prob" and manifest["kind"] == "laser" and manifest["settings"].get("score") == "cosine":
        temperature = manifest["settings"].get("temperature")
        if temperature is None:
            raise ArtifactError(f"{artifacts}: the manifest does not record the training temperature (exported before "
                                "laser-batch recorded it); export again to use --score prob")
        scale = 1.0 / temperature
    return OutputOptions(explain=explain, item_columns=item_columns, score=score, logit_scale=scale, layout=layout)


def _column_names(value: str | Sequence[str] | None) -> list[str]:
    """`title,brand` (or a sequence of names) -> ["title", "brand"]; an empty name is an error."""
    if not value:
        return []
    names = [n.strip() for n in (value.split(",") if isinstance(value, str) else value)]
    if not all(names):
        raise InputError(f"--with-item-columns {value!r}: an empty column name (give names separated by commas)")
    return names
