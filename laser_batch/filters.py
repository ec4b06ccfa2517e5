"""Business filters at score time: which items a user may be recommended, applied as masks before the top K.

Laser scores the whole catalogue exactly, so a filter is a mask over the scores of every item, set before the top-K
selection: a user gets exactly K items whenever K eligible items exist, and all of them (counted as `short_of_k`)
otherwise.

Global filters (the same for every user), combined with AND:
- `--allow-items FILE`: only these items; `--deny-items FILE`: never these. FILE is Parquet with an `item_id` column,
  or text with one id per line;
- `--item-filter "SQL"`: a SQL WHERE clause (Polars SQL) over the artefacts' `items.parquet` columns (and
  `train_interactions`, the item's training interaction count, when the export has it).

Per-user restrictions:
- `--exclude PAIRS`: Parquet of `user_id, item_id` pairs never to recommend (e.g. last night's output);
- the input's optional `candidates` column (a list of item ids per user): rank only these items (null: the whole
  catalogue; unknown candidates are dropped and counted).

`--backfill popular`: a user left with fewer than K items gets the rest from the most popular items (training
interaction counts) that pass the global filters, are not in the user's history and not excluded for the user, in
popularity order after the model's items; the output's `source` column says `model` or `backfill`. Excluded pairs
stay excluded: backfill fills what a `candidates` list left out.

Everything is read and checked on the driver by `prepare`, before any model work; the resulting `ItemFilters` is
what both engines hand to `score.Recommender` (Ray: to every actor).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from laser_batch.artifacts import ITEM_IDS, ITEMS_TEXT, TRAIN_COUNTS, load_manifest
from laser_batch.contracts import first_line
from laser_batch.errors import ArtifactError, InputError
from laser_batch.inputs import is_id
from laser_batch.metrics import exclude_items

BACKFILLS = ("none", "popular")
CANDIDATES = "candidates"
SOURCE = "source"  # the output column of --backfill popular: "model" or "backfill"
# Counts the Recommender adds to its stats and the summary reports.
COUNTS = ("short_of_k", "unknown_candidates_dropped", "backfilled_users", "backfill_items")


@dataclass(frozen=True)
class Restrictions:
    """Per-user restrictions of a batch, row r = the batch's r-th user (internal ids 1..N).

    excluded: the user's `--exclude` items; candidates: the user's known candidates, or None (no list: every item).
    """

    excluded: list[np.ndarray]
    candidates: list[np.ndarray | None]

    def keep(self, mask: np.ndarray) -> Restrictions:
        """The restrictions of the rows where `mask` (bool, one per row) holds."""
        return Restrictions([e for e, m in zip(self.excluded, mask, strict=True) if m],
                            [c for c, m in zip(self.candidates, mask, strict=True) if m])


@dataclass
class ItemFilters:
    """Prepared filters (picklable: Ray ships them to its actors). The default filters nothing.

    Attributes:
        banned: (M,) internal ids 1..N that fail a global filter.
        exclude: user_id, _internal pairs from `--exclude` (None without it).
        popular: internal ids that pass the global filters, most trained-on first (`--backfill popular`), or None.
        info: what the summary records about the filters.
    """

    item_dtype: pl.DataType | None = None  # the model's item-id type (None: not checked)
    banned: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    exclude: pl.DataFrame | None = None
    popular: np.ndarray | None = None
    info: dict = field(default_factory=dict)

    @property
    def backfill(self) -> bool:
        return self.popular is not None

    def check_input(self, schema: dict, where: object) -> None:
        """Refuse an input whose `candidates` column or user ids do not fit the model or `--exclude` (`where`: INPUT
        as given, for the message)."""
        item_dtype = self.item_dtype
        if CANDIDATES in schema and item_dtype is not None:
            dtype = schema[CANDIDATES]
            if not isinstance(dtype, pl.List) or not is_id(dtype.inner):
                raise InputError(f"{where}: column '{CANDIDATES}' has type {dtype}, expected a list of item ids")
            if (dtype.inner == pl.String) != (item_dtype == pl.String):
                raise InputError(f"{where}: column '{CANDIDATES}' holds {dtype.inner} item ids, but the model's item "
                                 f"ids are {item_dtype}")
        if self.exclude is not None:
            mine, theirs = self.exclude.schema["user_id"], schema["user_id"]
            if (mine == pl.String) != (theirs == pl.String):
                raise InputError(f"--exclude {self.info['exclude']['file']}: user_id is {mine}, but the input's "
                                 f"user_id is {theirs}")

    def restrictions(self, user_ids: pl.Series, candidates: pl.Series | None, id_map: pl.DataFrame,
                     stats: Counter) -> Restrictions:
        """The restrictions of the users `user_ids` (their `candidates` lists, or None without the column).

        `id_map`: item_id -> _internal. Unknown candidates are dropped and counted in `stats`.
        """
        n = user_ids.len()
        excluded = [np.empty(0, dtype=np.int64)] * n
        if self.exclude is not None:
            users = pl.DataFrame({"_pos": np.arange(n), "user_id": _id_column(user_ids)})
            found = users.join(self.exclude, on="user_id").group_by("_pos").agg("_internal")
            for pos, items in found.iter_rows():
                excluded[pos] = np.asarray(items, dtype=np.int64)
        lists: list[np.ndarray | None] = [None] * n
        if candidates is not None:
            given = pl.DataFrame({"_pos": np.arange(n), "item_id": candidates.cast(pl.List(id_map.schema["item_id"]))}
                                 ).filter(pl.col("item_id").is_not_null())
            flat = given.explode("item_id").filter(pl.col("item_id").is_not_null())
            known = flat.join(id_map, on="item_id")
            # Unknown ids and null entries of a list are dropped (an empty list explodes to one null: not counted).
            stats["unknown_candidates_dropped"] += int(given["item_id"].list.len().sum() or 0) - known.height
            for pos in given["_pos"].to_list():
                lists[pos] = np.empty(0, dtype=np.int64)
            for pos, items in known.group_by("_pos").agg("_internal").iter_rows():
                lists[pos] = np.unique(np.asarray(items, dtype=np.int64))
        return Restrictions(excluded, lists)

    def mask(self, scores: np.ndarray, rows: np.ndarray, restrictions: Restrictions) -> None:
        """Set the scores of every item a user may not get to -inf, in place (`rows`: the batch's users in
        `restrictions`; scores (b, N), column j = internal item j + 1)."""
        if len(self.banned):
            scores[:, self.banned - 1] = -np.inf
        if self.exclude is not None:
            exclude_items(scores, [restrictions.excluded[r] for r in rows])
        for j, r in enumerate(rows):
            allowed = restrictions.candidates[r]
            if allowed is not None:
                keep = np.zeros(scores.shape[1], dtype=bool)
                keep[allowed - 1] = True
                scores[j, ~keep] = -np.inf

    def fill(self, top: np.ndarray, filled: np.ndarray, histories: list[np.ndarray], rows: np.ndarray,
             restrictions: Restrictions) -> np.ndarray:
        """`--backfill popular`: the empty slots of each short user's top K (`top` columns, `filled` where the model
        put an item), in place, from the popular items the user may get. Returns (b, k) bool: the backfilled slots.

        `histories`: the batch's internal-id histories; `rows`: its users in `restrictions`.
        """
        backfilled = np.zeros(top.shape, dtype=bool)
        k = top.shape[1]
        for j in np.flatnonzero(~filled[:, -1]):
            have = int(filled[j].sum())
            taken = np.concatenate([top[j, :have] + 1, histories[j], restrictions.excluded[rows[j]]])
            pool = self.popular[:k - have + len(taken)]  # at most len(taken) of them are skipped
            chosen = pool[~np.isin(pool, taken)][:k - have]
            top[j, have:have + len(chosen)] = chosen - 1
            backfilled[j, have:have + len(chosen)] = True
        return backfilled


def options_record(options) -> dict:
    """What the job file and the summary record of the filter options (files by path, size and mtime)."""
    def identity(path):
        if path is None:
            return None
        stat = Path(path).stat() if Path(path).exists() else None
        return [str(Path(path).resolve()), stat.st_size if stat else None, stat.st_mtime_ns if stat else None]

    return {"allow_items": identity(options.allow_items), "deny_items": identity(options.deny_items),
            "item_filter": options.item_filter, "exclude": identity(options.exclude), "backfill": options.backfill}


def prepare(artifacts: Path, *, allow_items: str | None = None, deny_items: str | None = None,
            item_filter: str | None = None, exclude: str | None = None, backfill: str = "none") -> ItemFilters:
    """Read and check every filter option against the artefacts' catalogue; no model is loaded.

    Raises:
        InputError: a missing or unreadable file, a missing column, ids of the wrong type, invalid SQL or an
            unknown column in it, or filters that leave no item at all.
        ArtifactError: `--backfill popular` with artefacts exported without training interaction counts.
    """
    if backfill not in BACKFILLS:
        raise InputError(f"--backfill {backfill}: expected one of {', '.join(BACKFILLS)}")
    artifacts = Path(artifacts)
    load_manifest(artifacts, verify=False, check_graphs=False)  # a missing directory or manifest: its own error
    item_dtype = pl.read_parquet_schema(artifacts / ITEM_IDS)["item_id"]
    if not any([allow_items, deny_items, item_filter, exclude, backfill != "none"]):
        return ItemFilters(item_dtype=item_dtype)
    catalogue = pl.read_parquet(artifacts / ITEM_IDS).sort("index")
    n = catalogue.height
    eligible = np.ones(n, dtype=bool)
    info: dict = {"catalogue_items": n}
    for option, path, allow in (("--allow-items", allow_items, True), ("--deny-items", deny_items, False)):
        if path is None:
            continue
        ids = _read_ids(path, option, item_dtype)
        listed = catalogue["item_id"].is_in(ids.implode()).to_numpy()
        if allow and not listed.any():
            raise InputError(f"{option} {path}: none of its {ids.n_unique()} item ids is in the catalogue")
        eligible &= listed if allow else ~listed
        info[option.lstrip("-").replace("-", "_")] = {"file": str(path), "ids": ids.n_unique(),
                                                      "in_catalogue": int(listed.sum())}
    if item_filter is not None:
        passed = _sql_mask(artifacts, catalogue, item_filter)
        eligible &= passed
        info["item_filter"] = {"sql": item_filter, "items_passing": int(passed.sum())}
    if not eligible.any():
        raise InputError("no catalogue item passes --allow-items, --deny-items and --item-filter together; "
                         "nothing could be recommended")
    info["eligible_items"] = int(eligible.sum())
    pairs = None
    if exclude is not None:
        pairs = _read_pairs(exclude, catalogue)
        info["exclude"] = {"file": str(exclude), "pairs": pairs.height}
    popular = None
    if backfill == "popular":
        if TRAIN_COUNTS not in catalogue.columns:
            raise ArtifactError(f"{artifacts / ITEM_IDS}: no '{TRAIN_COUNTS}' column (exported before laser-batch "
                                "recorded training interaction counts); export again to use --backfill popular")
        counts = catalogue[TRAIN_COUNTS].to_numpy()
        order = np.argsort(-counts, kind="stable") + 1  # ties: the lower internal id first
        popular = order[eligible[order - 1]]
    info["backfill"] = backfill
    return ItemFilters(item_dtype=item_dtype, banned=np.flatnonzero(~eligible) + 1, exclude=pairs, popular=popular,
                       info=info)


def _read_ids(path: str, option: str, item_dtype: pl.DataType) -> pl.Series:
    """The item ids of an allow or deny list: Parquet with an item_id column, or text with one id per line."""
    file = Path(path)
    if not file.is_file():
        raise InputError(f"{option} {path}: file not found")
    with file.open("rb") as f:
        parquet = f.read(4) == b"PAR1"
    if parquet:
        ids = _read_parquet(file, option, ["item_id"])["item_id"]
        if not is_id(ids.dtype) or (ids.dtype == pl.String) != (item_dtype == pl.String):
            raise InputError(f"{option} {path}: column 'item_id' has type {ids.dtype}, but the model's item ids are "
                             f"{item_dtype}")
        ids = ids.drop_nulls().cast(item_dtype)
    else:
        try:
            lines = [line.strip() for line in file.read_text().splitlines()]
        except UnicodeDecodeError as e:
            raise InputError(f"{option} {path}: neither Parquet nor text with one item id per line ({e})") from e
        ids = pl.Series("item_id", [line for line in lines if line], dtype=pl.String)
        if item_dtype != pl.String:
            parsed = ids.cast(item_dtype, strict=False)
            if parsed.null_count():
                bad = ids.filter(parsed.is_null())[0]
                raise InputError(f"{option} {path}: {bad!r} is not an item id (the model's item ids are "
                                 f"{item_dtype})")
            ids = parsed
    if ids.len() == 0:
        raise InputError(f"{option} {path}: no item ids")
    return ids


def _read_parquet(file: Path, option: str, columns: list[str]) -> pl.DataFrame:
    try:
        schema = pl.read_parquet_schema(file)
    except Exception as e:
        raise InputError(f"{option} {file}: not a readable Parquet file ({first_line(e)})") from e
    missing = [c for c in columns if c not in schema]
    if missing:
        raise InputError(f"{option} {file}: missing column(s) {', '.join(missing)} (found: "
                         f"{', '.join(schema) or 'none'})")
    return pl.read_parquet(file, columns=columns)


def _sql_mask(artifacts: Path, catalogue: pl.DataFrame, clause: str) -> np.ndarray:
    """(N,) bool: the catalogue rows for which the SQL WHERE clause holds (null counts as false)."""
    table = catalogue.drop("index")
    if (artifacts / ITEMS_TEXT).exists():
        table = table.join(pl.read_parquet(artifacts / ITEMS_TEXT), on="item_id", how="left", maintain_order="left")
    try:
        passed = table.with_row_index("_row").filter(pl.sql_expr(clause))["_row"].to_numpy()
    except Exception as e:  # Polars: SQL syntax, unknown column, a predicate that is not boolean, ...
        raise InputError(f"--item-filter {clause!r}: {first_line(e)} (columns: {', '.join(table.columns)})") from e
    mask = np.zeros(catalogue.height, dtype=bool)
    mask[passed] = True
    return mask


def _read_pairs(path: str, catalogue: pl.DataFrame) -> pl.DataFrame:
    """`--exclude` pairs as user_id, _internal (pairs of items outside the catalogue dropped)."""
    file = Path(path)
    if not file.is_file():
        raise InputError(f"--exclude {path}: file not found")
    pairs = _read_parquet(file, "--exclude", ["user_id", "item_id"])
    item_dtype = catalogue.schema["item_id"]
    for column, dtype in pairs.schema.items():
        if not is_id(dtype):
            raise InputError(f"--exclude {path}: column '{column}' has type {dtype}, expected an integer or string id")
    if (pairs.schema["item_id"] == pl.String) != (item_dtype == pl.String):
        raise InputError(f"--exclude {path}: column 'item_id' holds {pairs.schema['item_id']} ids, but the model's "
                         f"item ids are {item_dtype}")
    ids = catalogue.select("item_id", _internal=pl.col("index").cast(pl.Int64))
    return (pairs.drop_nulls().with_columns(_id_column(pairs["user_id"]), pl.col("item_id").cast(item_dtype))
            .join(ids, on="item_id").select("user_id", "_internal").unique())


def _id_column(ids: pl.Series) -> pl.Series:
    """User ids as Int64 (any integer width) or String, so that the input and --exclude join."""
    return ids.cast(pl.String if ids.dtype == pl.String else pl.Int64)
