"""The RecBole/UniSRec sequential layout (used by most published text-based recommenders) -> the data contract.

One directory holds one dataset ``X``:

- ``X.train.inter``, ``X.valid.inter``, ``X.test.inter``: tab-separated, header
  ``user_id:token  item_id_list:token_seq  item_id:token``; one row per (user, target) with the items before the
  target as space-separated item indices.
- ``X.item2index``: ``original_item_id<TAB>index``, no header.
- ``X.text``: header ``item_id:token  text:token_seq``; the text of an original item id.

A user's sequence is its test row's history followed by its target; timestamps are the positions 0, 1, 2, ...
The valid row must agree with that sequence (its history and target end where the test history ends) and each
train row must be a prefix of it; a row that does not is an error naming its file and line. RecBole keeps only the
last items of a long history (50 in UniSRec), so a user with more rows than the test window holds has lost its
earliest items: the lost interactions are counted in the card as ``truncated_interactions`` (``truncated_users``
users), and such users' train rows are not checked. Items keep their original ids (strings) and their text becomes
the title; items without a ``.text`` row get an empty title and are counted (``items_without_text``), as are
``.text`` rows of ids not in ``X.item2index`` (``unindexed_text_rows``, ignored).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import polars as pl

from laser_batch import contracts
from laser_batch.errors import InputError

logger = logging.getLogger(__name__)

INTER_HEADER = ("user_id:token", "item_id_list:token_seq", "item_id:token")
TEXT_HEADER = ("item_id:token", "text:token_seq")
SPLITS = ("train", "valid", "test")
_SUFFIXES = tuple(f".{s}.inter" for s in SPLITS) + (".item2index", ".text")

Row = tuple[int, str, list[int]]  # (line number, user token, history + target as item indices)


def convert_unisrec(folder: Path, out: Path) -> dict:
    """Convert a UniSRec dataset directory into a data directory; returns the card (see the module docstring).

    Raises:
        InputError: not a directory, no or several datasets in it, a missing file, a wrong header, a ragged row,
            an item index absent from ``X.item2index``, a row inconsistent with the user's test sequence.
    """
    folder = Path(folder)
    name = dataset_name(folder)
    paths = {s: folder / f"{name}{s}" for s in _SUFFIXES}
    for path in paths.values():
        if not path.is_file():
            raise InputError(f"{path}: file not found (a UniSRec dataset needs {', '.join(_SUFFIXES)})")
    index_to_item = _read_item2index(paths[".item2index"])
    rows = {s: _read_inter(paths[f".{s}.inter"], index_to_item) for s in SPLITS}
    sequences = _sequences(rows, paths)
    texts, unindexed = _read_text_file(paths[".text"], set(index_to_item.values()))

    users, items, steps = [], [], []
    for user, sequence in sequences.items():
        users.extend([user] * len(sequence))
        items.extend(index_to_item[i] for i in sequence)
        steps.extend(range(len(sequence)))
    user_dtype = pl.Int64 if all(_is_int(u) for u in sequences) else pl.String
    interactions = pl.DataFrame(
        {"user_id": pl.Series(users).cast(user_dtype), "item_id": items, "timestamp": steps},
        schema={"user_id": user_dtype, "item_id": pl.String, "timestamp": pl.Int64},
    )
    catalogue = sorted(index_to_item.items())
    item_ids = [item for _, item in catalogue]
    titles = [texts.get(item, "") for item in item_ids]
    item_table = pl.DataFrame({"item_id": item_ids, "title": titles}, schema={"item_id": pl.String, "title": pl.String})

    rows_per_user = Counter(user for split in rows.values() for _, user, _ in split)
    truncated = {u: rows_per_user[u] + 1 - len(s) for u, s in sequences.items() if rows_per_user[u] + 1 > len(s)}
    extra = {
        "dataset": name,
        "items_without_text": sum(1 for t in titles if not t),
        "unindexed_text_rows": unindexed,
        "truncated_users": len(truncated),
        "truncated_interactions": sum(truncated.values()),
    }
    card = contracts.write_data_dir(interactions.sort("user_id", "timestamp"), item_table, out,
                                    source=str(folder), input_format="unisrec", extra=extra)
    logger.info("converted %s: %d users, %d items, %d interactions (%d items without text, %d interactions lost "
                "to history truncation)", folder, card["users"], card["items"], card["interactions"],
                extra["items_without_text"], extra["truncated_interactions"])
    return card


def dataset_name(folder: Path) -> str:
    """The X of the ``X.test.inter`` in `folder`; an error when there is none or more than one."""
    if not folder.is_dir():
        raise InputError(f"{folder}: unisrec expects a directory holding X.train.inter, X.valid.inter, ...")
    names = sorted(p.name[: -len(".test.inter")] for p in folder.glob("*.test.inter"))
    if len(names) != 1:
        found = f"several ({', '.join(names)})" if names else "none"
        raise InputError(f"{folder}: expected one dataset (one X.test.inter file), found {found}")
    return names[0]


def _read_item2index(path: Path) -> dict[int, str]:
    """index -> original item id."""
    index_to_item: dict[int, str] = {}
    first_line: dict[int, int] = {}
    for lineno, fields in _fields(path, 2):
        item, index = fields
        if not index.isdigit():
            raise InputError(f"{path}: line {lineno}: index {index!r} is not a non-negative integer")
        if int(index) in first_line:
            raise InputError(f"{path}: line {lineno}: index {index} already used (line {first_line[int(index)]})")
        first_line[int(index)] = lineno
        index_to_item[int(index)] = item
    if not index_to_item:
        raise InputError(f"{path}: no items")
    return index_to_item


def _read_inter(path: Path, index_to_item: dict[int, str]) -> list[Row]:
    rows: list[Row] = []
    lines = _fields(path, len(INTER_HEADER), header=INTER_HEADER)
    for lineno, (user, history, target) in lines:
        tokens = [*history.split(), target]
        bad = next((t for t in tokens if not t.isdigit() or int(t) not in index_to_item), None)
        if bad is not None:
            raise InputError(f"{path}: line {lineno}: item index {bad!r} is not in the item2index file")
        if not user.strip():
            raise InputError(f"{path}: line {lineno}: user_id is missing")
        rows.append((lineno, user.strip(), [int(t) for t in tokens]))
    return rows


def _sequences(rows: dict[str, list[Row]], paths: dict[str, Path]) -> dict[str, list[int]]:
    """Each user's test history + target, checked against the user's valid and train rows."""
    sequences: dict[str, list[int]] = {}
    test_path = paths[".test.inter"]
    for lineno, user, window in rows["test"]:
        if user in sequences:
            raise InputError(f"{test_path}: line {lineno}: user {user} already has a test row")
        sequences[user] = window
    if not sequences:
        raise InputError(f"{test_path}: no rows")
    valid_path, train_path = paths[".valid.inter"], paths[".train.inter"]
    valid_users: set[str] = set()
    for lineno, user, window in rows["valid"]:
        sequence = _sequence_of(sequences, user, valid_path, lineno)
        # both windows end at the test history's end; the shorter must be the tail of the longer
        common = min(len(window), len(sequence) - 1)
        if user in valid_users:
            raise InputError(f"{valid_path}: line {lineno}: user {user} already has a valid row")
        if window[len(window) - common:] != sequence[len(sequence) - 1 - common: -1]:
            raise InputError(f"{valid_path}: line {lineno}: user {user}'s valid row does not end where the "
                             f"test history ends")
        valid_users.add(user)
    train_rows = Counter(user for _, user, _ in rows["train"])
    for lineno, user, window in rows["train"]:
        sequence = _sequence_of(sequences, user, train_path, lineno)
        complete = train_rows[user] + 3 == len(sequence)  # else RecBole cut the user's history (not checkable)
        if complete and window != sequence[: len(window)]:
            raise InputError(f"{train_path}: line {lineno}: user {user}'s train row is not a prefix of the "
                             f"test history")
    return sequences


def _sequence_of(sequences: dict[str, list[int]], user: str, path: Path, lineno: int) -> list[int]:
    if user not in sequences:
        raise InputError(f"{path}: line {lineno}: user {user} has no row in the test file")
    return sequences[user]


def _read_text_file(path: Path, indexed: set[str]) -> tuple[dict[str, str], int]:
    """(original item id -> text, number of rows whose id is not in item2index)."""
    texts: dict[str, str] = {}
    unindexed = 0
    for lineno, (item, text) in _fields(path, len(TEXT_HEADER), header=TEXT_HEADER):
        if item not in indexed:
            unindexed += 1
        elif item in texts:
            raise InputError(f"{path}: line {lineno}: item {item} already has a text")
        else:
            texts[item] = " ".join(text.split())
    return texts, unindexed


def _fields(path: Path, width: int, *, header: tuple[str, ...] | None = None) -> Iterator[tuple[int, list[str]]]:
    """(line number, tab-separated fields) of each non-blank line after the header, checking widths."""
    lineno = 0
    with path.open(encoding="utf-8") as lines:
        try:
            for lineno, line in enumerate(lines, 1):
                fields = line.rstrip("\r\n").split("\t")
                if header is not None and lineno == 1:
                    if tuple(fields) != header:
                        raise InputError(f"{path}: line 1: header {' '.join(fields)!r}, expected "
                                         f"{' '.join(header)!r} (tab-separated)")
                    continue
                if not line.strip():
                    continue
                if len(fields) != width:
                    raise InputError(f"{path}: line {lineno}: expected {width} tab-separated fields, "
                                     f"found {len(fields)}")
                yield lineno, fields
        except UnicodeDecodeError as e:
            raise InputError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if header is not None and lineno == 0:
        raise InputError(f"{path}: file is empty, expected the header {' '.join(header)!r}")


def _is_int(token: str) -> bool:
    return token.lstrip("+-").isdigit()
