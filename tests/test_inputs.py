"""The scoring input, shared by the local and the Ray engine: file listing and schema checks (no model needed)."""

from __future__ import annotations

import polars as pl
import pytest

from laser_batch.errors import InputError
from laser_batch.inputs import check_users_schema, input_files, list_input


def _users(path, ids, history_type=pl.Int64):
    history = [["1", "2"] if history_type == pl.String else [1, 2]] * len(ids)
    pl.DataFrame({"user_id": ids, "history": history},
                 schema={"user_id": pl.Int64, "history": pl.List(history_type)}).write_parquet(path)


def test_a_directory_lists_its_parquet_files_in_name_order_skipping_markers_and_subdirectories(tmp_path):
    for name in ("b.parquet", "a.parquet", "_SUCCESS.parquet", ".a.parquet.tmp", ".hidden.parquet"):
        _users(tmp_path / name, [1])
    (tmp_path / "notes.txt").write_text("not an input")
    (tmp_path / "sub").mkdir()
    _users(tmp_path / "sub" / "c.parquet", [2])
    assert [p.name for p in input_files(tmp_path)] == ["a.parquet", "b.parquet"]


def test_a_file_uri_names_the_same_files_as_the_local_path(tmp_path):
    for name in ("a.parquet", "b.parquet"):
        _users(tmp_path / name, [1])
    _, local = list_input(tmp_path)
    fs, uri = list_input(tmp_path.as_uri())
    assert uri == local
    assert check_users_schema(tmp_path.as_uri()) == check_users_schema(tmp_path) == {
        "user_id": pl.Int64, "history": pl.List(pl.Int64)}
    assert fs.get_file_info(uri[0]).size == (tmp_path / "a.parquet").stat().st_size


def test_the_first_file_whose_schema_differs_is_named_with_the_difference(tmp_path):
    _users(tmp_path / "a.parquet", [1])
    _users(tmp_path / "b.parquet", [2])
    _users(tmp_path / "c.parquet", [3], pl.Int32)
    with pytest.raises(InputError, match=r"c.parquet: schema differs from a.parquet \(history: List\(Int32\) vs "
                                         r"List\(Int64\)\)"):
        check_users_schema(tmp_path)


def test_string_item_ids_against_an_integer_model_are_refused_by_column(tmp_path):
    _users(tmp_path / "u.parquet", [1], pl.String)
    assert check_users_schema(tmp_path / "u.parquet")["history"] == pl.List(pl.String)
    with pytest.raises(InputError, match="u.parquet: column 'history' holds String item ids, but the model's item "
                                         "ids are Int64"):
        check_users_schema(tmp_path / "u.parquet", pl.Int64)


@pytest.mark.parametrize("location, message", [
    ("missing.parquet", "missing.parquet: file not found"),
    ("nosuchscheme://bucket/x", "nosuchscheme://bucket/x: cannot open this URI"),
])
def test_an_unreachable_input_is_one_clear_error(tmp_path, location, message):
    target = location if "://" in location else str(tmp_path / location)
    with pytest.raises(InputError, match=message):
        list_input(target)
