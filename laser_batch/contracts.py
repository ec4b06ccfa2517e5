"""The Parquet data contract: a data directory of interactions + items + a JSON card.

    DATA_DIR/interactions.parquet   user_id, item_id, timestamp   (ids: integer or string)
    DATA_DIR/items.parquet          item_id, title, [text columns ...]
    DATA_DIR/card.json              counts, source, created-by version

Everything here is Polars + the standard library (no torch): the scoring runtime reads the same contract.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from laser_batch import __version__
from laser_batch.errors import InputError
from laser_batch.files import atomic_write

INTERACTIONS_FILE = "interactions.parquet"
ITEMS_FILE = "items.parquet"
CARD_FILE = "card.json"
DATA_FORMAT_VERSION = 1

_INTEGER_TYPES = (pl.Int8, pl.Int16, pl.Int32, pl.Int64, pl.UInt8, pl.UInt16, pl.UInt32, pl.UInt64)
_NUMBER_TYPES = (*_INTEGER_TYPES, pl.Float32, pl.Float64)


@dataclass(frozen=True)
class Dataset:
    """A loaded, validated data directory."""

    interactions: pl.DataFrame  # user_id, item_id, timestamp
    items: pl.DataFrame  # item_id, title, text columns
    card: dict
    dropped_unknown_interactions: int = 0

    @property
    def text_columns(self) -> list[str]:
        """Item text columns after the title, in file order."""
        return [c for c in self.items.columns if c not in ("item_id", "title")]


def read_parquet(path: Path, *, columns: list[str] | None = None) -> pl.DataFrame:
    """Read a Parquet file, turning every failure into an InputError naming the file."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: file not found")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, expected a Parquet file")
    try:
        return pl.read_parquet(path, columns=columns)
    except pl.exceptions.ColumnNotFoundError as e:
        raise InputError(f"{path}: missing column ({first_line(e)})") from e
    except Exception as e:  # polars raises several types for a file that is not Parquet
        raise InputError(f"{path}: not a readable Parquet file ({first_line(e)})") from e


def check_schema(df: pl.DataFrame, path: Path | str, required: dict[str, str]) -> None:
    """Check that `df` has the `required` columns of the right kind, with no null values.

    Kinds: "id" (any integer or a string), "number" (integer, float or datetime), "string".
    """
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise InputError(f"{path}: missing column(s) {', '.join(missing)} (found: {', '.join(df.columns) or 'none'})")
    for column, kind in required.items():
        dtype = df.schema[column]
        if not _is_kind(dtype, kind):
            raise InputError(f"{path}: column '{column}' has type {dtype}, expected {_KIND_NAMES[kind]}")
        nulls = df[column].null_count()
        if nulls:
            raise InputError(f"{path}: column '{column}' has {nulls} null value(s)")


_KIND_NAMES = {"id": "an integer or string id", "number": "a number or datetime", "string": "a string"}


def _is_kind(dtype: pl.DataType, kind: str) -> bool:
    if kind == "id":
        return isinstance(dtype, _INTEGER_TYPES) or dtype == pl.String
    if kind == "number":
        return isinstance(dtype, (*_NUMBER_TYPES, pl.Datetime, pl.Date))
    if kind == "string":
        return dtype == pl.String
    raise ValueError(kind)


def first_line(e: Exception) -> str:
    """The first line of an exception's message, for one-line errors."""
    text = str(e).strip().splitlines()
    return text[0] if text else e.__class__.__name__


def normalise_ids(df: pl.DataFrame, column: str) -> pl.DataFrame:
    """Integer ids become Int64 so that files written with different widths still join."""
    if isinstance(df.schema[column], _INTEGER_TYPES):
        return df.with_columns(pl.col(column).cast(pl.Int64))
    return df


def load_data_dir(data_dir: Path, *, drop_unknown_items: bool = False) -> Dataset:
    """Load and validate a data directory.

    Args:
        data_dir: directory holding interactions.parquet, items.parquet and card.json.
        drop_unknown_items: drop (and count) interactions whose item is missing from items.parquet
            instead of failing.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise InputError(f"{data_dir}: data directory not found")
    inter_path, items_path = data_dir / INTERACTIONS_FILE, data_dir / ITEMS_FILE
    interactions = read_parquet(inter_path)
    check_schema(interactions, inter_path, {"user_id": "id", "item_id": "id", "timestamp": "number"})
    if interactions.height == 0:
        raise InputError(f"{inter_path}: no interactions")
    items = read_parquet(items_path)
    check_schema(items, items_path, {"item_id": "id", "title": "string"})
    interactions = normalise_ids(normalise_ids(interactions.select("user_id", "item_id", "timestamp"), "user_id"),
                                 "item_id")
    items = normalise_ids(items, "item_id")
    if interactions.schema["item_id"] != items.schema["item_id"]:
        raise InputError(
            f"{data_dir}: item_id is {interactions.schema['item_id']} in {INTERACTIONS_FILE} "
            f"but {items.schema['item_id']} in {ITEMS_FILE}"
        )
    duplicated = items.filter(pl.col("item_id").is_duplicated())["item_id"]
    if duplicated.len():
        raise InputError(f"{items_path}: item_id {duplicated[0]!r} appears more than once")

    known = interactions["item_id"].is_in(items["item_id"].implode())
    unknown = interactions.height - int(known.sum())
    if unknown and not drop_unknown_items:
        example = interactions.filter(~known)["item_id"][0]
        raise InputError(
            f"{inter_path}: {unknown} interaction(s) reference items missing from {ITEMS_FILE} "
            f"(e.g. item_id {example!r}); pass --drop-unknown-items to drop them"
        )
    if unknown:
        interactions = interactions.filter(known)
        if interactions.height == 0:
            raise InputError(f"{inter_path}: no interactions left after dropping unknown items")

    card_path = data_dir / CARD_FILE
    card = json.loads(card_path.read_text()) if card_path.exists() else {}
    return Dataset(interactions=interactions, items=items, card=card, dropped_unknown_interactions=unknown)


def write_data_dir(
    interactions: pl.DataFrame,
    items: pl.DataFrame,
    out: Path,
    *,
    source: str,
    input_format: str,
    extra: dict | None = None,
) -> dict:
    """Validate and write a data directory; returns the card.

    Files are written under temporary names and renamed into place, so a failed conversion never leaves
    a file a reader would take for a result.
    """
    out = Path(out)
    check_schema(interactions, "interactions", {"user_id": "id", "item_id": "id", "timestamp": "number"})
    check_schema(items, "items", {"item_id": "id", "title": "string"})
    if interactions.height == 0:
        raise InputError(f"{source}: no interactions after conversion")
    interactions = interactions.select("user_id", "item_id", "timestamp")
    card = {
        "data_format_version": DATA_FORMAT_VERSION,
        "source": source,
        "input_format": input_format,
        "users": interactions["user_id"].n_unique(),
        "items": items.height,
        "interactions": interactions.height,
        "text_columns": [c for c in items.columns if c not in ("item_id", "title")],
        "created_by": f"laser-batch {__version__}",
        **(extra or {}),
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / INTERACTIONS_FILE, interactions.write_parquet)
    atomic_write(out / ITEMS_FILE, items.write_parquet)
    atomic_write(out / CARD_FILE, lambda p: p.write_text(json.dumps(card, indent=2) + "\n"))
    return card

