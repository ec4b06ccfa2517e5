"""Every bad input gives one readable line naming the problem and exit code 2."""

import json
import shutil
import subprocess
import sys

import polars as pl
import pytest
from typer.testing import CliRunner

from laser_batch.cli import app

runner = CliRunner()


def run(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output.strip()


def _data_dir(tmp_path, interactions=None, items=None):
    out = tmp_path / "data"
    out.mkdir(exist_ok=True)
    inter = interactions if interactions is not None else pl.DataFrame(
        {"user_id": [1, 1, 1, 2, 2, 2], "item_id": [1, 2, 3, 2, 3, 1], "timestamp": [1, 2, 3, 1, 2, 3]})
    its = items if items is not None else pl.DataFrame({"item_id": [1, 2, 3], "title": ["a", "b", "c"]})
    inter.write_parquet(out / "interactions.parquet")
    its.write_parquet(out / "items.parquet")
    return out


def train(data, tmp_path, *extra):
    return run("train", "--data", data, "--out", tmp_path / "run", "--epochs", 1, *extra)


def test_missing_data_directory(tmp_path):
    code, out = train(tmp_path / "nope", tmp_path)
    assert code == 2 and "nope: data directory not found" in out and "Traceback" not in out


def test_not_parquet(tmp_path):
    data = _data_dir(tmp_path)
    (data / "interactions.parquet").write_text("user_id,item_id\n1,2\n")
    code, out = train(data, tmp_path)
    assert code == 2 and "interactions.parquet: not a readable Parquet file" in out
    assert len(out.splitlines()) == 1


@pytest.mark.parametrize("frame, message", [
    (pl.DataFrame({"user": [1], "item_id": [1], "timestamp": [1]}), "missing column(s) user_id"),
    (pl.DataFrame({"user_id": [1], "item_id": [1.5], "timestamp": [1]}),
     "column 'item_id' has type Float64, expected an integer or string id"),
    (pl.DataFrame({"user_id": [1], "item_id": [1], "timestamp": ["x"]}),
     "column 'timestamp' has type String, expected a number or datetime"),
    (pl.DataFrame({"user_id": [1, None], "item_id": [1, 2], "timestamp": [1, 2]}),
     "column 'user_id' has 1 null value(s)"),
    (pl.DataFrame(schema={"user_id": pl.Int64, "item_id": pl.Int64, "timestamp": pl.Int64}), "no interactions"),
])
def test_bad_interactions_name_file_and_column(tmp_path, frame, message):
    code, out = train(_data_dir(tmp_path, interactions=frame), tmp_path)
    assert code == 2 and "interactions.parquet" in out and message in out, out


def test_items_with_mismatched_id_types(tmp_path):
    items = pl.DataFrame({"item_id": ["1", "2", "3"], "title": ["a", "b", "c"]})
    code, out = train(_data_dir(tmp_path, items=items), tmp_path)
    assert code == 2 and "item_id is Int64 in interactions.parquet but String in items.parquet" in out


def test_unknown_items_are_an_error_or_dropped_with_a_count(tmp_path, caplog):
    items = pl.DataFrame({"item_id": [1, 2], "title": ["a", "b"]})
    data = _data_dir(tmp_path, items=items)
    code, out = train(data, tmp_path)
    assert code == 2 and "2 interaction(s) reference items missing from items.parquet (e.g. item_id 3)" in out
    assert "--drop-unknown-items" in out
    code, out = train(data, tmp_path, "--drop-unknown-items")
    # with item 3 gone each user keeps 2 interactions: too few for leave-one-out, and that is said
    assert code == 2 and "no user has at least 3 interactions (2 users dropped)" in out


def test_dropped_short_users_are_counted(tmp_path, caplog):
    inter = pl.DataFrame({"user_id": [1, 1, 1, 2], "item_id": [1, 2, 3, 1], "timestamp": [1, 2, 3, 1]})
    code, out = train(_data_dir(tmp_path, interactions=inter), tmp_path)
    assert code == 0, out
    assert json.loads((tmp_path / "run" / "sasrec" / "config.json").read_text())["dropped_users"] == 1


def test_unknown_config_key(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text("[sasrec]\nhidden = 3\n")
    code, out = train(_data_dir(tmp_path), tmp_path, "--config", config)
    assert code == 2 and "unknown config key(s) sasrec.hidden" in out


def test_checkpoint_of_another_format_version(tmp_path):
    data = _data_dir(tmp_path)
    assert train(data, tmp_path)[0] == 0
    config_path = tmp_path / "run" / "sasrec" / "config.json"
    config = json.loads(config_path.read_text())
    config["format_version"] = 0
    config_path.write_text(json.dumps(config))
    code, out = run("evaluate", tmp_path / "run")
    assert code == 2 and "checkpoint format version 0" in out


def test_evaluate_missing_or_incomplete_run(tmp_path):
    code, out = run("evaluate", tmp_path / "nope")
    assert code == 2 and "run directory not found" in out
    data = _data_dir(tmp_path)
    assert train(data, tmp_path)[0] == 0
    shutil.rmtree(tmp_path / "run" / "sasrec")
    code, out = run("evaluate", tmp_path / "run", "--model", "sasrec")
    assert code == 2 and "checkpoint not found; train the sasrec stage first" in out


def test_evaluate_after_the_catalogue_changed(tmp_path):
    data = _data_dir(tmp_path)
    assert train(data, tmp_path)[0] == 0
    _data_dir(tmp_path, interactions=pl.DataFrame(
        {"user_id": [1, 1, 1], "item_id": [1, 2, 2], "timestamp": [1, 2, 3]}))
    code, out = run("evaluate", tmp_path / "run")
    assert code == 2 and "item catalogue differs" in out


def test_bad_convert_format_is_a_usage_error(tmp_path):
    code, out = run("data", "convert", "--format", "csv", tmp_path / "x", "--out", tmp_path / "o")
    assert code == 2 and "csv" in out


def test_debug_shows_the_traceback_and_without_it_one_line(tmp_path):
    # The real CLI in its own interpreter: what a user's terminal shows (the test runner would record the exit as an
    # exception either way). A missing users file fails before any model or torch work.
    missing = tmp_path / "missing.parquet"
    args = ["score", str(missing), "--model", str(tmp_path / "art"), "--out", str(tmp_path / "out")]
    plain = subprocess.run([sys.executable, "-m", "laser_batch.cli", *args], capture_output=True, text=True)
    assert plain.returncode == 2
    assert plain.stderr.splitlines() == [f"error: {missing}: file not found"]
    debug = subprocess.run([sys.executable, "-m", "laser_batch.cli", "--debug", *args], capture_output=True,
                           text=True)
    assert debug.returncode == 1, debug.stderr
    assert debug.stderr.startswith("Traceback (most recent call last):")
    assert debug.stderr.splitlines()[-1] == f"laser_batch.errors.InputError: {missing}: file not found"
