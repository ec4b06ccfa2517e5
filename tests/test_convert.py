"""convert: each public layout -> the Parquet data contract, with exact values, and every bad input -> InputError."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import polars as pl
import pytest

from laser_batch.contracts import load_data_dir
from laser_batch.convert import FORMATS, convert
from laser_batch.errors import InputError


def _read(out: Path) -> tuple[list[tuple], list[dict], dict]:
    interactions = pl.read_parquet(out / "interactions.parquet")
    items = pl.read_parquet(out / "items.parquet")
    card = json.loads((out / "card.json").read_text())
    load_data_dir(out)  # the result must satisfy the contract reader too
    return interactions.rows(), items.to_dicts(), card


def _write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_bytes(text.encode(encoding))
    return path


def _jsonl(path: Path, records: list[dict], *, compress: bool = False) -> Path:
    data = "".join(json.dumps(r) + "\n" for r in records).encode()
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


# --- s3rec ---------------------------------------------------------------------------------------------------


def test_s3rec_synthesises_timestamps_and_titles(tmp_path: Path) -> None:
    src = _write(tmp_path / "seq.txt", "2 11 13\n\n1 10 11 12\n")
    card = convert("s3rec", [src], tmp_path / "out")
    interactions, items, saved = _read(tmp_path / "out")
    assert interactions == [(1, 10, 0), (1, 11, 1), (1, 12, 2), (2, 11, 0), (2, 13, 1)]
    assert items == [{"item_id": i, "title": f"item {i}"} for i in (10, 11, 12, 13)]
    assert saved == card
    assert (card["users"], card["items"], card["interactions"]) == (2, 4, 5)
    assert (card["input_format"], card["source"], card["text_columns"]) == ("s3rec", str(src), [])


def test_s3rec_non_integer_token_names_file_and_line(tmp_path: Path) -> None:
    src = _write(tmp_path / "seq.txt", "1 2 3\n2 4 x5\n")
    with pytest.raises(InputError, match=rf"{re.escape(str(src))}: line 2: 'x5' is not an integer id"):
        convert("s3rec", [src], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_s3rec_empty_file_and_wrong_input_count(tmp_path: Path) -> None:
    src = _write(tmp_path / "seq.txt", "\n\n")
    with pytest.raises(InputError, match=rf"{re.escape(str(src))}: no interactions"):
        convert("s3rec", [src], tmp_path / "out")
    with pytest.raises(InputError, match="s3rec takes exactly one sequence file, got 2"):
        convert("s3rec", [src, src], tmp_path / "out")


# --- recbole -------------------------------------------------------------------------------------------------

_INTER = (
    "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
    "7\t2\t4\t300\n"
    "5\t1\t3\t100\n"
    "7\t1\t5\t200\n"
)
_ITEM = (
    "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
    "1\tToy Story\t1995\tAnimation Children's Comedy\n"
    '2\t"Weird" Movie, The\t1994\tDrama\n'
    "3\tNever Watched\t\tSci-Fi  Film-Noir\n"
)


def test_recbole_strips_types_renames_columns_and_keeps_integer_ids(tmp_path: Path) -> None:
    inter, item = _write(tmp_path / "ml.inter", _INTER), _write(tmp_path / "ml.item", _ITEM)
    card = convert("recbole", [item, inter], tmp_path / "out")  # either order
    interactions, items, _ = _read(tmp_path / "out")
    assert interactions == [(5, 1, 100), (7, 1, 200), (7, 2, 300)]
    assert items == [
        {"item_id": 1, "title": "Toy Story", "year": "1995", "genres": "Animation, Children's, Comedy"},
        {"item_id": 2, "title": '"Weird" Movie, The', "year": "1994", "genres": "Drama"},
        {"item_id": 3, "title": "Never Watched", "year": None, "genres": "Sci-Fi, Film-Noir"},
    ]
    assert (card["users"], card["items"], card["interactions"]) == (2, 3, 3)
    assert card["text_columns"] == ["year", "genres"]
    assert card["source"] == f"{item},{inter}"


def test_recbole_string_ids_and_float_timestamps(tmp_path: Path) -> None:
    inter = _write(tmp_path / "a.inter", "user_id:token\titem_id:token\ttimestamp:float\nu1\tB01\t1.5\nu1\t7\t2\n")
    item = _write(tmp_path / "a.item", "item_id:token\ttitle:token_seq\nB01\tLamp\n7\tDesk\n")
    convert("recbole", [inter, item], tmp_path / "out")
    interactions, items, _ = _read(tmp_path / "out")
    assert interactions == [("u1", "B01", 1.5), ("u1", "7", 2.0)]
    assert items == [{"item_id": "7", "title": "Desk"}, {"item_id": "B01", "title": "Lamp"}]


def test_recbole_missing_item_file(tmp_path: Path) -> None:
    inter = _write(tmp_path / "ml.inter", _INTER)
    with pytest.raises(InputError, match=rf"{re.escape(str(inter))}: recbole needs one .inter file and one .item"):
        convert("recbole", [inter], tmp_path / "out")


def test_recbole_bad_columns_and_values_name_file_and_line(tmp_path: Path) -> None:
    item = _write(tmp_path / "ml.item", _ITEM)
    inter = _write(tmp_path / "ml.inter", "user_id:token\titem_id:token\n1\t1\n")
    with pytest.raises(InputError, match=rf"{re.escape(str(inter))}: missing column\(s\) timestamp"):
        convert("recbole", [inter, item], tmp_path / "out")
    _write(inter, "user_id:token\titem_id:token\ttimestamp:float\n1\t1\t5\n1\t2\tsoon\n")
    with pytest.raises(InputError, match=rf"{re.escape(str(inter))}: line 3: timestamp 'soon' is not a number"):
        convert("recbole", [inter, item], tmp_path / "out")
    _write(item, "item_id:token\tgenre:token_seq\n1\tDrama\n")
    with pytest.raises(InputError, match=rf"{re.escape(str(item))}: missing column title"):
        convert("recbole", [inter, item], tmp_path / "out")


# --- movielens -----------------------------------------------------------------------------------------------


def _u_item_line(item_id: int, title: str, date: str, genres: set[str]) -> str:
    names = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
             "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western"]
    flags = "|".join("1" if n in genres else "0" for n in names)
    return f"{item_id}|{title}|{date}||http://us.imdb.com/x|{flags}\n"


def test_movielens_100k_directory_with_latin1_titles(tmp_path: Path) -> None:
    folder = tmp_path / "ml-100k"
    folder.mkdir()
    _write(folder / "u.data", "3\t2\t4\t881250949\n3\t1\t5\t881250900\n1\t3\t1\t875000000\n")
    u_item = (
        _u_item_line(1, "Misérables, Les (1995)", "01-Jan-1995", {"Drama", "Musical"})
        + _u_item_line(2, "Café au lait", "01-Jan-1994", {"Comedy"})
        + _u_item_line(3, "unknown", "", {"unknown"})
    )
    _write(folder / "u.item", u_item, encoding="latin-1")
    card = convert("movielens", [folder], tmp_path / "out")
    interactions, items, _ = _read(tmp_path / "out")
    assert interactions == [(1, 3, 875000000), (3, 1, 881250900), (3, 2, 881250949)]
    assert items == [
        {"item_id": 1, "title": "Misérables, Les", "year": "1995", "genres": "Drama, Musical"},
        {"item_id": 2, "title": "Café au lait", "year": "1994", "genres": "Comedy"},
        {"item_id": 3, "title": "unknown", "year": None, "genres": "unknown"},
    ]
    assert (card["users"], card["items"], card["interactions"], card["source"]) == (2, 3, 3, str(folder))


def test_movielens_1m_files_with_latin1_titles(tmp_path: Path) -> None:
    ratings = _write(tmp_path / "ratings.dat", "1::1193::5::978300760\n1::661::3::978302109\n2::1193::4::978298413\n")
    movies = _write(
        tmp_path / "movies.dat",
        "661::James and the Giant Peach (1996)::Animation|Children's|Musical\n"
        "1193::Günther's Café (1975)::(no genres listed)\n",
        encoding="latin-1",
    )
    card = convert("movielens", [movies, ratings], tmp_path / "out")
    interactions, items, _ = _read(tmp_path / "out")
    assert interactions == [(1, 1193, 978300760), (1, 661, 978302109), (2, 1193, 978298413)]
    assert items == [
        {"item_id": 661, "title": "James and the Giant Peach", "year": "1996",
         "genres": "Animation, Children's, Musical"},
        {"item_id": 1193, "title": "Günther's Café", "year": "1975", "genres": None},
    ]
    assert (card["users"], card["items"], card["interactions"]) == (2, 2, 3)


def test_movielens_malformed_lines_and_layouts(tmp_path: Path) -> None:
    ratings = _write(tmp_path / "ratings.dat", "1::10::5::100\n1::eleven::5::101\n")
    movies = _write(tmp_path / "movies.dat", "10::A (1990)::Drama\n")
    with pytest.raises(InputError, match=rf"{re.escape(str(ratings))}: line 2: item_id 'eleven' is not an integer"):
        convert("movielens", [ratings, movies], tmp_path / "out")
    _write(ratings, "1::10::5::100\n")
    _write(movies, "10::A (1990)\n")
    with pytest.raises(InputError, match=rf"{re.escape(str(movies))}: line 1: expected 3 '::'-separated fields"):
        convert("movielens", [ratings, movies], tmp_path / "out")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match=rf"{re.escape(str(empty))}: no MovieLens files found"):
        convert("movielens", [empty], tmp_path / "out")


# --- amazon2018 ----------------------------------------------------------------------------------------------

_REVIEWS = [
    {"reviewerID": "U2", "asin": "A1", "unixReviewTime": 300, "overall": 5.0},
    {"reviewerID": "U1", "asin": "A1", "unixReviewTime": 100, "overall": 4.0},
    {"reviewerID": "U1", "asin": "A2", "unixReviewTime": 200, "overall": 3.0},
    {"reviewerID": "U1", "asin": "A2", "unixReviewTime": 200, "overall": 3.0},  # exact duplicate
    {"reviewerID": "U1", "asin": "A3", "unixReviewTime": 250, "overall": 2.0},  # untitled item
    {"reviewerID": "U2", "asin": "A4", "unixReviewTime": 350, "overall": 1.0},  # HTML title
    {"reviewerID": "U2", "asin": "A5", "unixReviewTime": 360, "overall": 1.0},  # no metadata
]
_META = [
    {"asin": "A1", "title": "Pipettes &amp; Tips", "brand": "LabCo", "category": ["Science", "Lab &amp; Tools"]},
    {"asin": "A2", "title": "  Beaker  500 ml ", "category": []},
    {"asin": "A1", "title": "Second record, ignored", "brand": "Other"},
    {"asin": "A3", "title": "", "brand": "X"},
    {"asin": "A4", "title": '<span class="a">var aPageStart = (new Date()).getTime();</span>'},
    {"asin": "A9", "title": "Never reviewed"},
]


@pytest.mark.parametrize("compress", [False, True])
def test_amazon2018_drops_untitled_items_and_their_interactions(tmp_path: Path, compress: bool) -> None:
    suffix = ".json.gz" if compress else ".json"
    reviews = _jsonl(tmp_path / f"Science_5{suffix}", _REVIEWS, compress=compress)
    meta = _jsonl(tmp_path / f"meta_Science{suffix}", _META, compress=compress)
    card = convert("amazon2018", [meta, reviews], tmp_path / "out")
    interactions, items, _ = _read(tmp_path / "out")
    assert interactions == [("U1", "A1", 100), ("U1", "A2", 200), ("U2", "A1", 300)]
    assert items == [
        {"item_id": "A1", "title": "Pipettes & Tips", "brand": "LabCo", "category": "Science, Lab & Tools"},
        {"item_id": "A2", "title": "Beaker 500 ml", "brand": None, "category": None},
    ]
    assert (card["users"], card["items"], card["interactions"]) == (2, 2, 3)
    assert (card["dropped_items"], card["dropped_interactions"], card["duplicate_interactions"]) == (3, 3, 1)
    assert card["text_columns"] == ["brand", "category"]


def test_amazon2018_recognises_reviews_by_content(tmp_path: Path) -> None:
    reviews = _jsonl(tmp_path / "a.json", _REVIEWS[:2])
    meta = _jsonl(tmp_path / "b.json", _META[:1])
    card = convert("amazon2018", [reviews, meta], tmp_path / "out")
    assert (card["users"], card["items"], card["interactions"]) == (2, 1, 2)


def test_amazon2018_bad_lines_name_file_and_line(tmp_path: Path) -> None:
    meta = _jsonl(tmp_path / "meta.json", _META)
    reviews = _write(tmp_path / "reviews.json", json.dumps(_REVIEWS[0]) + "\n{'reviewerID': 'U1'}\n")
    with pytest.raises(InputError, match=rf"{re.escape(str(reviews))}: line 2: not valid JSON"):
        convert("amazon2018", [reviews, meta], tmp_path / "out")
    _jsonl(reviews, [_REVIEWS[0], {"reviewerID": "U1", "asin": "A1"}])
    with pytest.raises(InputError, match=rf"{re.escape(str(reviews))}: line 2: missing field 'unixReviewTime'"):
        convert("amazon2018", [reviews, meta], tmp_path / "out")
    _jsonl(meta, [{"asin": "A1", "title": ""}])
    _jsonl(reviews, _REVIEWS[:2])
    with pytest.raises(InputError, match="no interactions left after dropping 1 item"):
        convert("amazon2018", [reviews, meta], tmp_path / "out")


# --- shared --------------------------------------------------------------------------------------------------


def test_unknown_format_lists_valid_ones(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="unknown input format 'csv'; expected one of: " + ", ".join(FORMATS)):
        convert("csv", [tmp_path / "x"], tmp_path / "out")


@pytest.mark.parametrize("input_format", FORMATS)
def test_missing_input_file_is_named(tmp_path: Path, input_format: str) -> None:
    missing = tmp_path / "nope.txt"
    with pytest.raises(InputError, match=rf"{re.escape(str(missing))}: file not found"):
        convert(input_format, [missing], tmp_path / "out")
