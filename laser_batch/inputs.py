"""The scoring job's input, for both engines: which Parquet files INPUT names, whether their schema fits, how many
rows they hold, which users are duplicated, and interaction rows grouped into users.

INPUT is a local path or a pyarrow-filesystem URI (s3://bucket/dir, gs://..., file:///dir): one Parquet file, or a
directory whose `*.parquet` files are read in name order as one table (names starting with "." or "_", such as
temporary or marker files, are skipped; subdirectories are not read). The listing and the schema checks read only
the Parquet footers.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import polars as pl

from laser_batch.contracts import first_line
from laser_batch.errors import InputError
from laser_batch.files import atomic_write

USERS_COLUMNS = ("user_id", "history")
INTERACTIONS_COLUMNS = ("user_id", "item_id", "timestamp")


def filesystem(location: str):
    """(pyarrow filesystem, path on it) of a local path or a URI such as s3://bucket/dir or file:///dir."""
    import pyarrow.fs as pafs

    if "://" in location:
        try:
            return pafs.FileSystem.from_uri(location)
        except Exception as e:
            raise InputError(f"{location}: cannot open this URI ({first_line(e)})") from e
    return pafs.LocalFileSystem(), str(Path(location).resolve())


def list_input(location: str | Path):
    """(filesystem, files) of INPUT, files as paths on that filesystem.

    Raises:
        InputError: no such path, or a directory without Parquet files.
    """
    import pyarrow.fs as pafs

    location = str(location)
    fs, path = filesystem(location)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise InputError(f"{location}: file not found")
    if info.type != pafs.FileType.Directory:
        return fs, [path]
    files = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(path)) if i.type == pafs.FileType.File
                   and i.base_name.endswith(".parquet") and not i.base_name.startswith((".", "_")))
    if not files:
        raise InputError(f"{location}: directory holds no .parquet files")
    return fs, files


def input_files(path: Path) -> list[Path]:
    """The Parquet files of a local INPUT (`list_input`)."""
    return [Path(f) for f in list_input(path)[1]]


def check_users_schema(location: str | Path, item_dtype: pl.DataType | None = None, *,
                       interactions: bool = False, listed: tuple | None = None) -> dict:
    """Check INPUT's columns and types from its Parquet schemas (no data read); returns the schema.

    Every file of a directory must have the same schema; an error names the first file that does not. With
    `item_dtype` (the model's item-id type), integer and string item ids must not be mixed. `listed`: INPUT's
    `list_input` result when the caller has it already (an object store is then not listed again).
    """
    fs, files = listed if listed is not None else list_input(location)
    first = _file_schema(fs, files[0], item_dtype, interactions=interactions)
    for file in files[1:]:
        schema = _file_schema(fs, file, item_dtype, interactions=interactions)
        if schema != first:
            differ = [f"{c}: {schema.get(c, 'missing')} vs {first.get(c, 'missing')}"
                      for c in dict.fromkeys([*first, *schema]) if schema.get(c) != first.get(c)]
            raise InputError(f"{file}: schema differs from {Path(files[0]).name} ({'; '.join(differ)}); every "
                             "file of the input directory must have the same columns and types")
    return first


def is_id(dtype: pl.DataType) -> bool:
    """Integer or string: the id types of the data contracts."""
    return dtype.is_integer() or dtype == pl.String


def _file_schema(fs, path: str, item_dtype: pl.DataType | None, *, interactions: bool) -> dict:
    import pyarrow.parquet as pq

    try:
        schema = dict(pl.from_arrow(pq.read_schema(path, filesystem=fs).empty_table()).schema)
    except Exception as e:
        raise InputError(f"{path}: not a readable Parquet file ({first_line(e)})") from e
    required = INTERACTIONS_COLUMNS if interactions else USERS_COLUMNS
    missing = [c for c in required if c not in schema]
    if missing:
        hint = "" if interactions else " (or pass --interactions for user_id, item_id, timestamp rows)"
        raise InputError(f"{path}: missing column(s) {', '.join(missing)} (found: {', '.join(schema) or 'none'})"
                         f"{hint}")
    if not is_id(schema["user_id"]):
        raise InputError(f"{path}: column 'user_id' has type {schema['user_id']}, expected an integer or string id")
    if interactions:
        item = schema["item_id"]
        if not (schema["timestamp"].is_numeric() or schema["timestamp"].is_temporal()):
            raise InputError(f"{path}: column 'timestamp' has type {schema['timestamp']}, expected a number or "
                             "datetime")
    else:
        history = schema["history"]
        if not isinstance(history, pl.List) or not is_id(history.inner):
            raise InputError(f"{path}: column 'history' has type {history}, expected a list of item ids")
        item = history.inner
    if item_dtype is not None and (item == pl.String) != (item_dtype == pl.String):
        column = "item_id" if interactions else "history"
        raise InputError(f"{path}: column '{column}' holds {item} item ids, but the model's item ids are "
                         f"{item_dtype}")
    return schema


def row_count(fs, files: list[str]) -> int:
    """Rows of INPUT, from the Parquet footers."""
    import pyarrow.parquet as pq

    return int(sum(pq.ParquetFile(path, filesystem=fs).metadata.num_rows for path in files))


def duplicated_users(fs, files: list[str], *, columns: Sequence[str] = USERS_COLUMNS) -> tuple[int, pl.DataFrame]:
    """(input rows, rows of duplicated users: `_pos` (input order) and `columns`), from the user_id column.

    A 64-bit hash per row finds the candidates (8 bytes per row in memory); the few candidate rows are read back in
    full and compared by their real ids (nulls are not duplicates).
    """
    import pyarrow.parquet as pq

    hashes, sizes = [], []
    for path in files:
        metadata = pq.ParquetFile(path, filesystem=fs)
        sizes.append(metadata.metadata.num_rows)
        for batch in metadata.iter_batches(columns=["user_id"], batch_size=1 << 20):
            hashes.append(pl.from_arrow(batch.column(0)).hash(seed=0).to_numpy())
    rows = int(sum(sizes))
    hashes = np.concatenate(hashes) if hashes else np.empty(0, dtype=np.uint64)
    order = np.argsort(hashes, kind="stable")
    same = hashes[order][1:] == hashes[order][:-1]
    candidates = np.unique(np.concatenate([order[1:][same], order[:-1][same]]))
    if not len(candidates):
        return rows, pl.DataFrame()
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    picked = []
    for k, path in enumerate(files):
        local = candidates[(candidates >= offsets[k]) & (candidates < offsets[k + 1])] - offsets[k]
        if len(local):
            table = pq.read_table(path, filesystem=fs, columns=list(columns)).take(local)
            picked.append(pl.from_arrow(table).with_columns(_pos=pl.Series(local + offsets[k])))
    found = pl.concat(picked).filter(pl.col("user_id").is_not_null())
    return rows, found.filter(pl.col("user_id").is_duplicated()).sort("_pos")


def group_interactions(fs, files: list[str], target: str, *, out_fs=None) -> None:
    """user_id, item_id, timestamp rows -> `target` (on `out_fs`, written atomically): user_id, history oldest first.

    Ties in time keep the input order, so both engines score the same histories. Polars streams local files; other
    filesystems are read through a pyarrow dataset.
    """
    import pyarrow.fs as pafs

    if isinstance(fs, pafs.LocalFileSystem):
        rows = pl.scan_parquet(files)
    else:
        import pyarrow.dataset as ds

        rows = pl.scan_pyarrow_dataset(ds.dataset(files, filesystem=fs))
    grouped = (rows.with_row_index("_order").sort("user_id", "timestamp", "_order", nulls_last=True)
               .group_by("user_id", maintain_order=True).agg(pl.col("item_id").alias("history")))
    atomic_write(target, grouped.sink_parquet, fs=out_fs)
