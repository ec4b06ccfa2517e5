"""convert --format unisrec: sequences from the test rows, text through item2index, and each bad input named."""

from __future__ import annotations

import json
import re
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from laser_batch.cli import app
from laser_batch.contracts import load_data_dir
from laser_batch.convert import convert
from laser_batch.errors import InputError

HEADER = "user_id:token\titem_id_list:token_seq\titem_id:token\n"
# User 7: items 0 1 2 3 (indices). User 9: 4 0 1 2 3 in full, but RecBole kept 3 history items per row, so its
# test row holds 0 1 2 -> 3 and its first item (4) survives only in its train and valid rows.
FILES = {
    "train.inter": HEADER + "7\t0\t1\n9\t4\t0\n9\t4 0\t1\n",
    "valid.inter": HEADER + "7\t0 1\t2\n9\t4 0 1\t2\n",
    "test.inter": HEADER + "7\t0 1 2\t3\n9\t0 1 2\t3\n",
    "item2index": "B00A\t0\nB00B\t1\nB00C\t2\nB00D\t3\nB00E\t4\n",
    "text": "item_id:token\ttext:token_seq\nB00B\tSecond  item. Tools. \nB00A\tFirst item\nZZZ\tnot indexed\n"
            "B00D\tFourth\nB00C\tThird\n",
}


def _dataset(folder: Path, name: str = "Sci", **changes: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for suffix, text in {**FILES, **changes}.items():
        if text is not None:
            (folder / f"{name}.{suffix}").write_text(text)
    return folder


def test_sequences_titles_and_counts(tmp_path: Path) -> None:
    card = convert("unisrec", [_dataset(tmp_path / "Sci")], tmp_path / "out")
    interactions = pl.read_parquet(tmp_path / "out" / "interactions.parquet")
    assert interactions.rows() == [
        (7, "B00A", 0), (7, "B00B", 1), (7, "B00C", 2), (7, "B00D", 3),
        (9, "B00A", 0), (9, "B00B", 1), (9, "B00C", 2), (9, "B00D", 3),
    ]
    assert interactions.schema["item_id"] == pl.String
    items = pl.read_parquet(tmp_path / "out" / "items.parquet")
    assert items.rows() == [("B00A", "First item"), ("B00B", "Second item. Tools."), ("B00C", "Third"),
                            ("B00D", "Fourth"), ("B00E", "")]
    assert (card["users"], card["items"], card["interactions"]) == (2, 5, 8)
    assert (card["dataset"], card["input_format"], card["items_without_text"], card["unindexed_text_rows"]) == (
        "Sci", "unisrec", 1, 1)
    assert (card["truncated_users"], card["truncated_interactions"]) == (1, 1)
    assert json.loads((tmp_path / "out" / "card.json").read_text()) == card
    assert load_data_dir(tmp_path / "out").items.height == 5


def test_cli_converts_and_reports_bad_input_with_exit_code_2(tmp_path: Path) -> None:
    runner = CliRunner()
    good = runner.invoke(app, ["data", "convert", "--format", "unisrec", str(_dataset(tmp_path / "a")),
                               "--out", str(tmp_path / "out")])
    assert good.exit_code == 0, good.output
    assert "2 users, 5 items, 8 interactions" in good.output
    bad = _dataset(tmp_path / "b", **{"test.inter": HEADER + "7\t0 1 2\n"})
    result = runner.invoke(app, ["data", "convert", "--format", "unisrec", str(bad), "--out", str(tmp_path / "o2")])
    assert result.exit_code == 2
    assert f"error: {bad / 'Sci.test.inter'}: line 2: expected 3 tab-separated fields, found 2" in result.output


def _fails(tmp_path: Path, pattern: str, **changes: str | None) -> None:
    folder = _dataset(tmp_path / "Sci", **changes)
    with pytest.raises(InputError, match=pattern):
        convert("unisrec", [folder], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _at(suffix: str, line: int) -> str:
    return rf"Sci{re.escape('.' + suffix)}: line {line}: "


def test_missing_file_is_named(tmp_path: Path) -> None:
    _fails(tmp_path, r"Sci\.text: file not found", text=None)


def test_wrong_header_names_file_and_line(tmp_path: Path) -> None:
    _fails(tmp_path, _at("valid.inter", 1) + "header 'user_id:token item_id_list:token_seq item:token'",
           **{"valid.inter": "user_id:token\titem_id_list:token_seq\titem:token\n7\t0 1\t2\n"})
    _fails(tmp_path, _at("text", 1) + "header 'item_id text'", text="item_id\ttext\nB00A\tx\n")


def test_index_absent_from_item2index_names_file_and_line(tmp_path: Path) -> None:
    _fails(tmp_path, _at("train.inter", 3) + "item index '5' is not in the item2index file",
           **{"train.inter": HEADER + "7\t0\t1\n9\t5\t0\n"})
    _fails(tmp_path, _at("test.inter", 2) + "item index 'x' is not in the item2index file",
           **{"test.inter": HEADER + "7\t0 x 2\t3\n9\t0 1 2\t3\n"})


def test_ragged_rows_name_file_and_line(tmp_path: Path) -> None:
    _fails(tmp_path, _at("valid.inter", 3) + "expected 3 tab-separated fields, found 4",
           **{"valid.inter": HEADER + "7\t0 1\t2\n9\t4 0 1\t2\t8\n"})
    _fails(tmp_path, _at("item2index", 2) + "expected 2 tab-separated fields, found 1",
           item2index="B00A\t0\nB00B 1\n")
    _fails(tmp_path, _at("text", 2) + "expected 2 tab-separated fields, found 1", text=FILES["text"].replace(
        "B00B\t", "B00B "))


def test_bad_item2index_rows_name_file_and_line(tmp_path: Path) -> None:
    _fails(tmp_path, _at("item2index", 2) + "index 0 already used \\(line 1\\)", item2index="B00A\t0\nB00B\t0\n")
    _fails(tmp_path, _at("item2index", 1) + "index 'one' is not a non-negative integer", item2index="B00A\tone\n")


def test_rows_inconsistent_with_the_test_sequence_name_file_and_line(tmp_path: Path) -> None:
    _fails(tmp_path, _at("valid.inter", 2) + "user 7's valid row does not end where the test history ends",
           **{"valid.inter": HEADER + "7\t0 2\t1\n9\t4 0 1\t2\n"})
    _fails(tmp_path, _at("train.inter", 2) + "user 7's train row is not a prefix of the test history",
           **{"train.inter": HEADER + "7\t1\t0\n9\t4\t0\n9\t4 0\t1\n"})
    _fails(tmp_path, _at("valid.inter", 3) + "user 8 has no row in the test file",
           **{"valid.inter": HEADER + "7\t0 1\t2\n8\t0\t1\n"})
    _fails(tmp_path, _at("test.inter", 3) + "user 7 already has a test row",
           **{"test.inter": HEADER + "7\t0 1 2\t3\n7\t0 1 2\t3\n"})


def test_dataset_name_must_be_unique(tmp_path: Path) -> None:
    folder = _dataset(_dataset(tmp_path / "two"), name="Pet")
    with pytest.raises(InputError, match=rf"{re.escape(str(folder))}: expected one dataset .*several \(Pet, Sci\)"):
        convert("unisrec", [folder], tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="found none"):
        convert("unisrec", [tmp_path / "empty"], tmp_path / "out")
    with pytest.raises(InputError, match="unisrec expects a directory"):
        convert("unisrec", [folder / "Sci.text"], tmp_path / "out")
