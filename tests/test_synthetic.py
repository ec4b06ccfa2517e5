"""The synthetic example dataset: determinism, integrity, and a planted sequential signal that is really there."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

from laser_batch.contracts import CARD_FILE, INTERACTIONS_FILE, ITEMS_FILE, load_data_dir
from laser_batch.errors import ConfigError
from laser_batch.examples.synthetic import MAX_LENGTH, MIN_LENGTH, generate, main, write_example


@pytest.fixture(scope="module")
def default_data() -> tuple[pl.DataFrame, pl.DataFrame]:
    return generate()


def test_same_seed_gives_identical_frames_and_files(tmp_path):
    a_inter, a_items = generate(users=200, items=120, seed=7)
    b_inter, b_items = generate(users=200, items=120, seed=7)
    assert a_inter.equals(b_inter)
    assert a_items.equals(b_items)

    card_a = write_example(tmp_path / "a", users=200, items=120, seed=7)
    card_b = write_example(tmp_path / "b", users=200, items=120, seed=7)
    for name in (INTERACTIONS_FILE, ITEMS_FILE, CARD_FILE):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert card_a == card_b == json.loads((tmp_path / "a" / CARD_FILE).read_text())


def test_different_seed_gives_different_data():
    a_inter, a_items = generate(users=200, items=120, seed=1)
    b_inter, b_items = generate(users=200, items=120, seed=2)
    assert not a_inter.equals(b_inter)
    assert a_items["title"].to_list() != b_items["title"].to_list()


def test_written_directory_loads_and_card_describes_it(tmp_path):
    card = write_example(tmp_path, users=50, items=60, seed=3)
    data = load_data_dir(tmp_path)
    assert card["source"] == "laser_batch.examples.synthetic(seed=3)"
    assert card["input_format"] == "synthetic"
    assert (card["users"], card["items"], card["interactions"]) == (50, 60, data.interactions.height)
    assert data.text_columns == ["category", "brand"]


def test_script_entry_writes_a_data_directory(tmp_path, capsys):
    main([str(tmp_path / "out"), "--users", "20", "--items", "40", "--seed", "5"])
    capsys.readouterr()  # the script's one summary line is not the test's output
    inter = pl.read_parquet(tmp_path / "out" / INTERACTIONS_FILE)
    assert inter.equals(generate(users=20, items=40, seed=5)[0])


@pytest.mark.parametrize("kwargs", [{"users": 0}, {"items": 19}, {"seed": -1}])
def test_bad_sizes_raise_config_error_naming_the_option(kwargs):
    name = next(iter(kwargs))
    with pytest.raises(ConfigError, match=f"{name}="):
        generate(**kwargs)


def test_items_are_readable_and_unique(default_data):
    _, items = default_data
    assert items.columns == ["item_id", "title", "category", "brand"]
    assert items["item_id"].to_list() == list(range(1, 401))
    assert items["title"].n_unique() == items.height
    for column in ("title", "category", "brand"):
        assert items[column].null_count() == 0
        assert items[column].str.strip_chars().str.len_chars().min() > 0
    assert items["title"].str.contains(r"^[A-Z][A-Za-z0-9 '&:,.()\-]+$").all()
    assert 8 <= items["category"].n_unique() <= 10


def test_large_catalogue_titles_stay_unique():
    _, items = generate(users=5, items=3000, seed=0)
    assert items["title"].n_unique() == 3000


def test_interactions_are_consistent(default_data):
    inter, items = default_data
    assert inter.schema == {"user_id": pl.Int64, "item_id": pl.Int64, "timestamp": pl.Int64}
    assert inter["item_id"].is_in(items["item_id"].implode()).all()
    assert inter["user_id"].n_unique() == 1000
    assert 15_000 <= inter.height <= 25_000

    per_user = inter.group_by("user_id", maintain_order=True).agg("item_id", "timestamp")
    lengths = per_user["item_id"].list.len()
    assert lengths.min() >= MIN_LENGTH and lengths.max() <= MAX_LENGTH
    assert lengths.min() < 12 and lengths.max() > 30  # the whole documented range is used
    for seq, times in zip(per_user["item_id"].to_list(), per_user["timestamp"].to_list(), strict=True):
        assert all(a != b for a, b in zip(seq[:-1], seq[1:], strict=True)), "immediate repeat"
        assert all(a < b for a, b in zip(times[:-1], times[1:], strict=True)), "timestamps not strictly increasing"


def test_last_items_of_users_interleave_in_time(default_data):
    inter, _ = default_data
    spans = inter.group_by("user_id").agg(first=pl.col("timestamp").min(), last=pl.col("timestamp").max())
    first, last = spans["first"].to_numpy(), spans["last"].to_numpy()
    # share of users whose last interaction falls strictly inside another user's span
    inside = (first[None, :] < last[:, None]) & (last[:, None] < last[None, :])
    assert inside.any(axis=1).mean() > 0.5


def _top_k(scores: np.ndarray, exclude: np.ndarray, k: int) -> np.ndarray:
    scores = scores.copy()
    scores[0] = -np.inf  # item ids start at 1
    scores[exclude] = -np.inf
    return np.argpartition(-scores, k)[:k]


def _leave_one_out_hit_rates(inter: pl.DataFrame, k: int = 10) -> tuple[float, float]:
    """HR@k of a first-order successor model and of popularity: leave-one-out, history items excluded."""
    grouped = inter.sort("user_id", "timestamp").group_by("user_id", maintain_order=True).agg("item_id")
    sequences = [np.asarray(s) for s in grouped["item_id"].to_list()]
    n = int(inter["item_id"].max()) + 1
    transitions = np.zeros((n, n))
    popularity = np.zeros(n)
    for seq in sequences:
        history = seq[:-1]  # the test transition (history[-1] -> target) is never counted
        np.add.at(transitions, (history[:-1], history[1:]), 1.0)
        np.add.at(popularity, history, 1.0)
    backoff = popularity / (popularity.max() + 1.0)  # below 1: orders ties without outranking a transition
    hits = np.zeros(2)
    for seq in sequences:
        history, target = seq[:-1], seq[-1]
        hits[0] += target in _top_k(transitions[history[-1]] + backoff, history, k)
        hits[1] += target in _top_k(popularity, history, k)
    return hits[0] / len(sequences), hits[1] / len(sequences)


def test_planted_sequential_signal_beats_popularity(default_data):
    inter, _ = default_data
    hr_successor, hr_popularity = _leave_one_out_hit_rates(inter)
    assert hr_popularity > 0.0
    assert hr_successor >= 3.0 * hr_popularity
