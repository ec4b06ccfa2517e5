"""Convert public dataset layouts into the Parquet data contract (see contracts.py).

- ``s3rec``: one file, a line per user: ``user item item ...`` in time order. Timestamps are the positions
  0, 1, 2, ... within a user; titles are ``item <id>`` (the format has no text).
- ``recbole``: an atomic ``.inter`` + ``.item`` pair (tab-separated, headers ``name:type``). ``movie_title`` or
  ``title`` becomes ``title``; other item columns are text (``release_year`` -> ``year``, ``class`` -> ``genres``).
- ``movielens``: GroupLens ``u.data`` + ``u.item`` (100K) or ``ratings.dat`` + ``movies.dat`` (1M/10M), as files
  or their directory. A title's trailing `` (1995)`` becomes ``year``.
- ``amazon2018``: 5-core reviews + category metadata (JSON lines, plain or gzip). The 5-core interactions are
  taken as given; timestamps are ``unixReviewTime``; text: ``brand``, ``category``. Metadata: first record per
  asin wins; a title is unusable if blank after ``html.unescape``, over 300 characters, or holding an HTML tag.
- ``unisrec``: a RecBole/UniSRec sequential dataset directory (``X.train.inter`` ... ``X.text``); see
  convert_unisrec.py. It keeps items without text (empty title, counted) instead of dropping them.

Shared rules: ``genres`` reads ``Action, Comedy``. Ids stay integers when all parse as integers, else strings.
Text is UTF-8, or latin-1 where it is not valid UTF-8 (older GroupLens files). Exact duplicate interactions are
removed; items without a usable title are dropped with their interactions, as are interactions whose item has
no row in the item file (the card counts both). Ratings are ignored: every interaction is implicit feedback.
"""

from __future__ import annotations

import contextlib
import gzip
import html
import json
import logging
import re
import zlib
from collections.abc import Iterator
from pathlib import Path

import polars as pl

from laser_batch import contracts
from laser_batch.contracts import first_line
from laser_batch.errors import InputError

logger = logging.getLogger(__name__)

FORMATS = ("s3rec", "recbole", "movielens", "amazon2018", "unisrec")
MAX_TITLE_CHARS = 300
ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip
_RECBOLE_RENAMES = {"release_year": "year", "class": "genres", "genre": "genres"}
_YEAR_SUFFIX = re.compile(r"^(.*?)\s*\((\d{4})\)$")
_HTML_TAG = re.compile(r"<[A-Za-z/!][^>]*>")
_INTEGER = re.compile(r"[+-]?\d+")

Tables = tuple[pl.DataFrame, pl.DataFrame]  # interactions (user_id, item_id, timestamp), items (item_id, title, ...)


def convert(input_format: str, inputs: list[Path], out: Path) -> dict:
    """Convert a public dataset into a data directory (interactions.parquet, items.parquet, card.json).

    Args:
        input_format: one of ``FORMATS``.
        inputs: the input files (or, for ``movielens``, one directory), as the format expects.
        out: the data directory to write; created if missing.

    Returns:
        The card written to ``out/card.json`` (counts, source, dropped items and interactions).

    Raises:
        InputError: unknown format, missing or unreadable input, malformed line or field, empty result.
    """
    if input_format not in FORMATS:
        raise InputError(f"unknown input format {input_format!r}; expected one of: {', '.join(FORMATS)}")
    inputs = [Path(p) for p in inputs]
    if not inputs:
        raise InputError(f"{input_format}: no input files given")
    for path in inputs:
        if not path.exists():
            raise InputError(f"{path}: file not found")
    if input_format == "unisrec":  # a directory, converted whole: it keeps items without text
        if len(inputs) != 1:
            raise InputError(f"{_joined(inputs)}: unisrec takes exactly one dataset directory, got {len(inputs)}")
        from laser_batch.convert_unisrec import convert_unisrec

        return convert_unisrec(inputs[0], Path(out))
    interactions, items = _READERS[input_format](inputs)
    return _finish(interactions, items, inputs, input_format, Path(out))


def _finish(interactions: pl.DataFrame, items: pl.DataFrame, inputs: list[Path], input_format: str, out: Path) -> dict:
    source = ",".join(str(p) for p in inputs)
    total = interactions.height
    interactions = interactions.unique(maintain_order=True)
    duplicates = total - interactions.height
    items = items.unique("item_id", keep="first", maintain_order=True)
    seen_items = pl.concat([items["item_id"], interactions["item_id"]]).n_unique()
    items = items.with_columns(pl.col("title").str.strip_chars()).filter(pl.col("title").str.len_chars() > 0)
    known = interactions["item_id"].is_in(items["item_id"].implode())
    dropped_items, dropped_interactions = seen_items - items.height, interactions.height - int(known.sum())
    interactions = interactions.filter(known)
    if interactions.height == 0:
        reason = f" left after dropping {dropped_items} item(s) without a usable title" if dropped_items else ""
        raise InputError(f"{source}: no interactions{reason}")
    card = contracts.write_data_dir(
        interactions.sort("user_id", "timestamp", maintain_order=True), items.sort("item_id"), out,
        source=source, input_format=input_format,
        extra={"dropped_items": dropped_items, "dropped_interactions": dropped_interactions,
               "duplicate_interactions": duplicates},
    )
    logger.info("converted %s: %d users, %d items, %d interactions (dropped %d items, %d interactions)",
                source, card["users"], card["items"], card["interactions"], dropped_items, dropped_interactions)
    return card


def _read_s3rec(inputs: list[Path]) -> Tables:
    if len(inputs) != 1:
        raise InputError(f"{_joined(inputs)}: s3rec takes exactly one sequence file, got {len(inputs)}")
    path = inputs[0]
    users: list[int] = []
    items: list[int] = []
    steps: list[int] = []
    first_line: dict[int, int] = {}
    for lineno, line in enumerate(_read_text(path).splitlines(), 1):
        tokens = line.split()
        if not tokens:
            continue
        try:
            user, *history = (int(t) for t in tokens)
        except ValueError:
            bad = next(t for t in tokens if not _INTEGER.fullmatch(t))
            raise InputError(f"{path}: line {lineno}: {bad!r} is not an integer id") from None
        if user in first_line:
            raise InputError(f"{path}: line {lineno}: user {user} already has a line (line {first_line[user]})")
        first_line[user] = lineno
        users.extend([user] * len(history))
        items.extend(history)
        steps.extend(range(len(history)))
    schema = {"user_id": pl.Int64, "item_id": pl.Int64, "timestamp": pl.Int64}
    interactions = pl.DataFrame({"user_id": users, "item_id": items, "timestamp": steps}, schema=schema)
    item_ids = interactions["item_id"].unique().sort()
    return interactions, pl.DataFrame({"item_id": item_ids, "title": "item " + item_ids.cast(pl.String)})


def _read_recbole(inputs: list[Path]) -> Tables:
    inter_paths = [p for p in inputs if p.suffix == ".inter"]
    item_paths = [p for p in inputs if p.suffix == ".item"]
    if len(inputs) != 2 or len(inter_paths) != 1 or len(item_paths) != 1:
        raise InputError(f"{_joined(inputs)}: recbole needs one .inter file and one .item file")
    inter_path, item_path = inter_paths[0], item_paths[0]
    inter = _read_atomic(inter_path, ["user_id", "item_id", "timestamp"])
    item = _read_atomic(item_path, ["item_id"])
    title = next((c for c in ("title", "movie_title") if c in item.columns), None)
    if title is None:
        raise InputError(f"{item_path}: missing column title (or movie_title) (found: {', '.join(item.columns[1:])})")
    item_dtype = _id_dtype(inter["item_id"], item["item_id"])
    interactions = pl.DataFrame({
        "user_id": _parse(inter, "user_id", _id_dtype(inter["user_id"]), inter_path, "an id"),
        "item_id": _parse(inter, "item_id", item_dtype, inter_path, "an id"),
        "timestamp": _timestamps(inter, inter_path),
    })
    text_columns = [c for c in item.columns if c not in ("_line", "item_id", title)]
    items = item.select(
        _parse(item, "item_id", item_dtype, item_path, "an id"),
        pl.col(title).alias("title"),
        *(pl.col(c).alias(_RECBOLE_RENAMES.get(c, c)) for c in text_columns),
    )
    if "genres" in items.columns:  # token_seq: space-separated tokens
        items = items.with_columns(pl.col("genres").str.strip_chars().str.replace_all(r"\s+", ", "))
    return interactions, items


def _read_atomic(path: Path, required: list[str]) -> pl.DataFrame:
    """A RecBole atomic file as strings, its ``name:type`` headers reduced to the names."""
    df = _read_table(path, _read_text(path), separator="\t")
    df = df.rename({c: c.split(":", 1)[0] for c in df.columns})
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise InputError(f"{path}: missing column(s) {', '.join(missing)} (found: {', '.join(df.columns[1:])})")
    return df


def _read_movielens(inputs: list[Path]) -> Tables:
    ratings_path, items_path = _movielens_files(inputs)
    text = _read_text(ratings_path)
    if ratings_path.name == "ratings.dat":
        text = text.replace("::", "\t")  # polars separators are one byte
    table = _read_table(ratings_path, text, separator="\t", columns=["user_id", "item_id", "rating", "timestamp"])
    interactions = pl.DataFrame({
        "user_id": _parse(table, "user_id", pl.Int64, ratings_path, "an integer id"),
        "item_id": _parse(table, "item_id", pl.Int64, ratings_path, "an integer id"),
        "timestamp": _parse(table, "timestamp", pl.Int64, ratings_path, "an integer timestamp"),
    })
    schema = {"item_id": pl.Int64, "title": pl.String, "year": pl.String, "genres": pl.String}
    return interactions, pl.DataFrame(_movie_rows(items_path), schema=schema, orient="row")


_MOVIELENS_LAYOUTS = (("u.data", "u.item"), ("ratings.dat", "movies.dat"))


def _movielens_files(inputs: list[Path]) -> tuple[Path, Path]:
    if len(inputs) == 1 and inputs[0].is_dir():
        folder = inputs[0]
        for ratings, movies in _MOVIELENS_LAYOUTS:
            if (folder / ratings).is_file() and (folder / movies).is_file():
                return folder / ratings, folder / movies
        raise InputError(f"{folder}: no MovieLens files found (expected u.data + u.item or ratings.dat + movies.dat)")
    by_name = {p.name: p for p in inputs}
    for ratings, movies in _MOVIELENS_LAYOUTS:
        if len(inputs) == 2 and set(by_name) == {ratings, movies}:
            return by_name[ratings], by_name[movies]
    raise InputError(f"{_joined(inputs)}: movielens needs a directory, u.data + u.item, or ratings.dat + movies.dat")


def _movie_rows(path: Path) -> list[tuple]:
    """Rows (item_id, title, year, genres) of ML-100K ``u.item`` or ML-1M/10M ``movies.dat``.

    u.item: id|title|release date|video release date|IMDb URL|19 genre flags (0/1, order of ML100K_GENRES).
    movies.dat: id::Title (Year)::Genre1|Genre2.
    """
    ml100k = path.name == "u.item"
    separator, width = ("|", 5 + len(ML100K_GENRES)) if ml100k else ("::", 3)
    rows = []
    for lineno, line in _lines(path):
        fields = line.split(separator)
        if len(fields) != width:
            raise InputError(f"{path}: line {lineno}: expected {width} {separator!r}-separated fields, "
                             f"found {len(fields)}")
        if not _INTEGER.fullmatch(fields[0].strip()):
            raise InputError(f"{path}: line {lineno}: id {fields[0]!r} is not an integer")
        title, year = _split_year(fields[1])
        if ml100k:
            release = fields[2].strip()[-4:]  # release date such as 01-Jan-1995
            year = year or (release if release.isdigit() else None)
            genres = [g for g, flag in zip(ML100K_GENRES, fields[5:], strict=True) if flag.strip() == "1"]
        else:
            genres = [g for g in fields[2].strip().split("|") if g and g != "(no genres listed)"]
        rows.append((int(fields[0]), title, year, ", ".join(genres) or None))
    return rows


def _split_year(title: str) -> tuple[str, str | None]:
    match = _YEAR_SUFFIX.match(title.strip())
    return (match.group(1), match.group(2)) if match else (title.strip(), None)


def _read_amazon(inputs: list[Path]) -> Tables:
    if len(inputs) != 2:
        raise InputError(f"{_joined(inputs)}: amazon2018 needs the 5-core reviews file and the metadata file")
    reviews = [p for p in inputs if _is_reviews(p)]
    if len(reviews) != 1:
        raise InputError(f"{_joined(inputs)}: amazon2018 needs one reviews file (records with reviewerID) and one "
                         f"metadata file (name containing 'meta'); found {len(reviews)} reviews file(s)")
    reviews_path, meta_path = reviews[0], next(p for p in inputs if p != reviews[0])
    users: list[str] = []
    items: list[str] = []
    times: list[int] = []
    for lineno, record in _json_lines(reviews_path):
        user, item, time = (_field(record, k, reviews_path, lineno) for k in ("reviewerID", "asin", "unixReviewTime"))
        if not isinstance(time, int):
            raise InputError(f"{reviews_path}: line {lineno}: unixReviewTime {time!r} is not an integer")
        users.append(str(user))
        items.append(str(item))
        times.append(time)
    schema = {"user_id": pl.String, "item_id": pl.String, "timestamp": pl.Int64}
    interactions = pl.DataFrame({"user_id": users, "item_id": items, "timestamp": times}, schema=schema)

    reviewed = set(items)
    rows: dict[str, tuple] = {}
    for lineno, record in _json_lines(meta_path):
        asin = str(_field(record, "asin", meta_path, lineno))
        if asin in reviewed and asin not in rows:  # metadata covers the whole category; first record wins
            rows[asin] = (asin, _amazon_title(record.get("title")), _clean(record.get("brand")),
                          _categories(record.get("category")))
    schema = {"item_id": pl.String, "title": pl.String, "brand": pl.String, "category": pl.String}
    return interactions, pl.DataFrame(list(rows.values()), schema=schema, orient="row")


def _is_reviews(path: Path) -> bool:
    if "meta" in path.name.lower():
        return False
    with contextlib.closing(_json_lines(path)) as records:  # peek at the first record only
        return "reviewerID" in next(records, (0, {}))[1]


def _field(record: dict, key: str, path: Path, lineno: int) -> object:
    value = record.get(key)
    if value is None:
        raise InputError(f"{path}: line {lineno}: missing field {key!r}")
    return value


def _amazon_title(value: object) -> str | None:
    title = _clean(value)
    if title is None or len(title) > MAX_TITLE_CHARS or _HTML_TAG.search(title):
        return None
    return title


def _categories(value: object) -> str | None:
    if not isinstance(value, list):
        return None
    names = [name for name in map(_clean, value) if name and not _HTML_TAG.search(name)]
    return ", ".join(names) or None


def _clean(value: object) -> str | None:
    """Unescape HTML entities and collapse whitespace; None for non-strings and blanks."""
    if not isinstance(value, str):
        return None
    return " ".join(html.unescape(value).split()) or None


def _json_lines(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, record) for each non-blank line of a JSON-lines file, gzip-compressed or plain."""
    try:
        with path.open("rb") as f:
            compressed = f.read(2) == b"\x1f\x8b"
        with (gzip.open(path, "rt", encoding="utf-8") if compressed else path.open(encoding="utf-8")) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise InputError(f"{path}: line {lineno}: not valid JSON ({e.msg}, column {e.colno})") from None
                if not isinstance(record, dict):
                    raise InputError(f"{path}: line {lineno}: expected a JSON object, found {type(record).__name__}")
                yield lineno, record
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read ({first_line(e)})") from e


def _read_text(path: Path) -> str:
    """File text as UTF-8, or latin-1 where it is not valid UTF-8 (latin-1 text is almost never valid UTF-8)."""
    if path.is_dir():
        raise InputError(f"{path}: is a directory, expected a file")
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line) for each non-blank line."""
    for lineno, line in enumerate(_read_text(path).splitlines(), 1):
        if line.strip():
            yield lineno, line


def _read_table(path: Path, text: str, *, separator: str, columns: list[str] | None = None) -> pl.DataFrame:
    """Delimited text as string columns plus ``_line`` (each row's line number); blank lines removed."""
    try:
        df = pl.read_csv(
            text.encode(), separator=separator, has_header=columns is None, new_columns=columns, quote_char=None,
            infer_schema=False, row_index_name="_line", row_index_offset=1 if columns else 2,
        )
    except pl.exceptions.NoDataError:
        raise InputError(f"{path}: file is empty") from None
    except Exception as e:  # polars raises several types for malformed text
        raise InputError(f"{path}: cannot parse ({first_line(e)})") from e
    return df.filter(~pl.all_horizontal(pl.exclude("_line").is_null()))


def _id_dtype(*columns: pl.Series) -> type[pl.DataType]:
    """Int64 when every id in every column parses as an integer, else String."""
    ints = all(c.cast(pl.Int64, strict=False).null_count() == c.null_count() for c in columns)
    return pl.Int64 if ints else pl.String


def _parse(df: pl.DataFrame, column: str, dtype: type[pl.DataType], path: Path, what: str) -> pl.Series:
    """Cast a string column, naming the line of the first missing or unparsable value."""
    values = df[column]
    parsed = values.cast(dtype, strict=False)
    bad = parsed.is_null()
    if bad.any():
        i = bad.arg_true()[0]
        problem = "is missing" if values[i] is None else f"{values[i]!r} is not {what}"
        raise InputError(f"{path}: line {df['_line'][i]}: {column} {problem}")
    return parsed


def _timestamps(df: pl.DataFrame, path: Path) -> pl.Series:
    """Numbers; integers when every value is whole (RecBole types timestamps as float)."""
    ts = _parse(df, "timestamp", pl.Float64, path, "a number")
    return ts.cast(pl.Int64) if ts.is_finite().all() and (ts == ts.floor()).all() else ts


def _joined(paths: list[Path]) -> str:
    return ", ".join(str(p) for p in paths)


_READERS = {"s3rec": _read_s3rec, "recbole": _read_recbole, "movielens": _read_movielens, "amazon2018": _read_amazon}
