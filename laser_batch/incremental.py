"""Incremental nights: copy the rows of users whose input and options did not change since a previous output.

Every output carries one fingerprint per user with recommendations, in a side file per part file:

    OUT/_fingerprints/part-00000.parquet   user_id, fingerprint (UInt64)   (rows of OUT/part-00000.parquet)

A user's fingerprint hashes the user's history item ids (as given, oldest first), the `candidates` list when the
input has one, and the job's key: a hash of `options_record`, i.e. the manifest's sha256 and every option that
changes results (top K, include-history, the filters with the *contents* of their files, the output options, and
the user-encoder variant as resolved (`artifacts.resolve_variant`): "auto" and the scheme it chose give the same
results, and "auto" choosing another graph, e.g. on another device, is a change). Execution options (batch size,
token budget, threads, device, chunk size, engine) are not in it: they change scores only by float rounding, as a
full run's own batching does.

`score ... --previous DIR` reads DIR's fingerprints once; a user whose fingerprint is unchanged gets DIR's rows
copied, the others are encoded. When the model or an option changed, no fingerprint can match: nothing is reused,
and the summary says why (`rescore_reason`). A user absent tonight is absent from the output, because only
tonight's input users are looked up. The output is the one a full run writes: same users, ranks, items and columns,
in input order within each part file.

A DIR without `_SUCCESS`, or written with another `--layout`, is refused before any work (InputError).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.fs as pafs

from laser_batch import output
from laser_batch.errors import InputError
from laser_batch.files import sha256_file
from laser_batch.filters import CANDIDATES
from laser_batch.inputs import filesystem

FINGERPRINTS = "_fingerprints"
FORMAT = 1  # of the fingerprint; a new format makes every previous fingerprint a mismatch (rescore all)


def options_record(options, manifest_sha256: str, schema: dict, variant: str) -> dict:
    """What every user's fingerprint depends on besides the user's own input (`options`: the job's `JobOptions`,
    `schema`: INPUT's, `variant`: the resolved variant's name, not `--variant` as asked). Filter files are named by
    the sha256 of their contents, not by their path."""
    return {
        "format": FORMAT, "manifest_sha256": manifest_sha256, "top_k": options.top_k,
        "include_history": options.include_history, "variant": variant,
        "user_ids": "string" if schema["user_id"] == pl.String else "integer",
        "candidates": CANDIDATES in schema and not options.interactions,
        "filters": {"allow_items": _content(options.allow_items), "deny_items": _content(options.deny_items),
                    "item_filter": options.item_filter, "exclude": _content(options.exclude),
                    "backfill": options.backfill},
        "output": output.options_record(options),
    }


def _content(path: str | None) -> str | None:
    return sha256_file(path) if path is not None and Path(path).is_file() else None


def job_key(record: dict) -> bytes:
    """The 32-byte key every fingerprint of a job starts from."""
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).digest()


def fingerprints(users: pl.DataFrame, key: bytes) -> pl.Series:
    """(rows,) UInt64: each row's fingerprint, from its history (and candidates) and the job's key."""
    columns = [users["history"].to_list()]
    if CANDIDATES in users.columns:
        columns.append(users[CANDIDATES].to_list())
    values = np.empty(users.height, dtype=np.uint64)
    for i, row in enumerate(zip(*columns, strict=True)):
        text = json.dumps(row, separators=(",", ":")).encode()
        values[i] = int.from_bytes(hashlib.blake2b(text, digest_size=8, key=key).digest(), "little")
    return pl.Series("fingerprint", values, dtype=pl.UInt64)


def side_file(users: pl.DataFrame, prints: pl.Series, recs: pl.DataFrame) -> pl.DataFrame:
    """user_id, fingerprint of the users that have rows in `recs` (a batch's output; the first row of a user)."""
    return (pl.DataFrame({"user_id": users["user_id"], "fingerprint": prints})
            .filter(pl.col("user_id").is_not_null() & pl.col("user_id").is_first_distinct()
                    & pl.col("user_id").is_in(recs["user_id"].unique().implode())))


class Previous:
    """A previous output's fingerprints (in memory: user_id as Int64 or String, fingerprint, part) and its location,
    from which `rows` reads the copied rows. Picklable: Ray ships it to its actors."""

    def __init__(self, location: str, table: pl.DataFrame) -> None:
        self.location, self.table = location, table

    def matches(self, user_ids: pl.Series, prints: pl.Series) -> np.ndarray:
        """(n,) bool: the user's fingerprint is the previous one (`user_ids` unique, none null)."""
        mine = pl.DataFrame({"user_id": _id(user_ids), "fingerprint": prints, "_pos": np.arange(user_ids.len())})
        found = mine.join(self.table, on=["user_id", "fingerprint"], how="inner")["_pos"].to_numpy()
        hit = np.zeros(user_ids.len(), dtype=bool)
        hit[found] = True
        return hit

    def rows(self, user_ids: pl.Series) -> pl.DataFrame:
        """The previous output's rows of these users (each part file read once; rows in their written order)."""
        import pyarrow.parquet as pq

        wanted = self.table.join(pl.DataFrame({"user_id": _id(user_ids)}), on="user_id", how="semi")
        fs, root = _open(self.location)
        frames = []
        for part, ids in wanted.group_by("part", maintain_order=True).agg("user_id").iter_rows():
            rows = pl.from_arrow(pq.read_table(f"{root}/{part}", filesystem=fs))
            frames.append(rows.filter(_id(rows["user_id"]).is_in(pl.Series(ids).implode())))
        return pl.concat(frames, how="vertical_relaxed")


def merge(new: pl.DataFrame, copied: pl.DataFrame, order: pl.DataFrame) -> pl.DataFrame:
    """`new` and `copied` rows (the same columns) in the batch's input order (`order`: user_id, _row), each user's
    rows kept in their order (rank)."""
    copied = copied.select([pl.col(c).cast(t) for c, t in new.schema.items()])
    both = pl.concat([new, copied])
    return (both.join(order, on="user_id", how="left", maintain_order="left")
            .sort("_row", maintain_order=True).drop("_row"))


def copied_counts(copied: pl.DataFrame, *, top_k: int, layout: str, backfill: bool) -> dict:
    """The summary counts of copied rows, as the Recommender counts them for scored users."""
    if layout == "list":
        per_user = copied["item_ids"].list.len()
        backfilled = (copied["source"].list.eval(pl.element() == "backfill").list.sum() if backfill else None)
    else:
        per_user = copied.group_by("user_id").len()["len"]
        backfilled = (copied.group_by("user_id").agg((pl.col("source") == "backfill").sum())["source"]
                      if backfill else None)
    counts = {"short_of_k": int((per_user < top_k).sum())}
    if backfilled is not None:
        counts["backfilled_users"] = int((backfilled > 0).sum())
        counts["backfill_items"] = int(backfilled.sum())
    return counts


@dataclass
class Setup:
    """A job's fingerprint record and key, and what it may reuse: `previous` (None: nothing), `reason` why not."""

    record: dict
    key: bytes
    location: str | None = None
    previous: Previous | None = None
    reason: str | None = None

    def summary(self, totals) -> dict:
        """The summary's `incremental` entry (`totals`: the job's summed batch counts)."""
        return {"previous": self.location, "rescore_reason": self.reason, "reused": totals["reused"],
                "scored": totals["scored"] - totals["reused"], "fingerprint": self.record}


@dataclass(frozen=True)
class PreviousOutput:
    """A `--previous` output that passed `check_previous`: where it is, and the record its fingerprints were made with
    (None: written before laser-batch recorded them)."""

    location: str
    fingerprint: dict | None


def check_previous(options, out: str) -> PreviousOutput | None:
    """`options.previous` checked before any model work (None: no `--previous`).

    Raises:
        InputError: no such directory, no `_SUCCESS` in it, written with another `--layout`, or it is OUT itself.
    """
    location, layout = options.previous, options.layout
    if location is None:
        return None
    fs, root = _open(location)
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        raise InputError(f"--previous {location}: no such directory")
    if _open(str(out))[1] == root:
        raise InputError(f"--previous {location}: is --out; write tonight's output to another directory")
    if fs.get_file_info(f"{root}/_SUCCESS").type != pafs.FileType.File:
        raise InputError(f"--previous {location}: no _SUCCESS (not a finished scoring output)")
    job = _json(fs, f"{root}/_job.json", location)
    theirs = job.get("output", {}).get("layout", "long")
    if theirs != layout:
        raise InputError(f"--previous {location}: written with --layout {theirs}, this job writes --layout {layout}")
    summary = _json(fs, f"{root}/summary.json", location)
    return PreviousOutput(location, summary.get("incremental", {}).get("fingerprint"))


def prepare(options, manifest_sha256: str, schema: dict, previous: PreviousOutput | None, *, variant: str) -> Setup:
    """The job's `Setup`; `previous`: `check_previous`'s, whose fingerprints are read when they can match;
    `variant`: the name of the variant the job runs, as resolved (it is known once the sessions are loaded)."""
    record = options_record(options, manifest_sha256, schema, variant)
    setup = Setup(record, job_key(record), options.previous)
    if previous is not None:
        setup.previous, setup.reason = open_previous(previous, record)
    return setup


def open_previous(previous: PreviousOutput, record: dict) -> tuple[Previous | None, str | None]:
    """(the fingerprints of the previous output, None) or (None, why everything is rescored).

    Raises:
        InputError: its fingerprint directory holds no files.
    """
    if previous.fingerprint is None:
        return None, "the previous output has no fingerprints (written before laser-batch recorded them)"
    reason = _changes(previous.fingerprint, record)
    if reason:
        return None, reason
    fs, root = _open(previous.location)
    return Previous(previous.location, _read_fingerprints(fs, root, previous.location)), None


def _changes(before: dict, now: dict) -> str | None:
    """Why fingerprints of `before` cannot match those of `now` (None: they can)."""
    if before.get("manifest_sha256") != now["manifest_sha256"]:
        return (f"the model changed (manifest sha256 {str(before.get('manifest_sha256'))[:12]} -> "
                f"{now['manifest_sha256'][:12]})")
    changed = []
    for key, value in now.items():
        if isinstance(value, dict):
            old = before.get(key) or {}
            changed += [f"{key}.{sub}" for sub in value if old.get(sub) != value[sub]]
        elif before.get(key) != value:
            changed.append(key)
    return f"options changed: {', '.join(changed)}" if changed else None


def _read_fingerprints(fs, root: str, location: str) -> pl.DataFrame:
    import pyarrow.parquet as pq

    selector = pafs.FileSelector(f"{root}/{FINGERPRINTS}", allow_not_found=True)
    files = sorted(i.path for i in fs.get_file_info(selector) if i.base_name.endswith(".parquet"))
    frames = []
    for path in files:
        table = pl.from_arrow(pq.read_table(path, filesystem=fs))
        frames.append(table.select(_id(table["user_id"]), "fingerprint", part=pl.lit(Path(path).name)))
    if not frames:
        raise InputError(f"--previous {location}: {FINGERPRINTS}/ holds no fingerprint files")
    return pl.concat(frames)


def _json(fs, path: str, location: str) -> dict:
    try:
        with fs.open_input_stream(path) as f:
            return json.loads(f.read())
    except (FileNotFoundError, ValueError) as e:
        raise InputError(f"--previous {location}: {Path(path).name} missing or unreadable ({e})") from e


def _open(location: str):
    return filesystem(location)


def _id(ids: pl.Series) -> pl.Series:
    """User ids as Int64 (any integer width) or String, so that tonight's and the previous ones join."""
    return ids.cast(pl.String if ids.dtype == pl.String else pl.Int64).alias("user_id")
