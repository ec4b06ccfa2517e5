"""Readable output: --explain, --with-item-columns, --score cosine|prob and --layout long|list, checked by hand."""

import json
import shutil

import numpy as np
import polars as pl
import pytest
from test_items_add import fused_art  # noqa: F401 (a gated-fusion export of the same run)
from test_score import _recs, _users, _write, artifacts  # noqa: F401 (the tiny Laser artefacts, built once)
from typer.testing import CliRunner

from laser_batch.artifacts import MANIFEST, Embedder
from laser_batch.cli import app
from laser_batch.errors import ArtifactError, InputError
from laser_batch.files import sha256_file
from laser_batch.score import score_users


def _index(art):
    ids = pl.read_parquet(art / "item_ids.parquet").sort("index")["item_id"].to_list()
    return ids, {item: i for i, item in enumerate(ids)}


@pytest.mark.parametrize("kind", ["laser_art", "sasrec_art"])
def test_because_item_id_is_the_closest_history_item_and_always_in_the_history(artifacts, tmp_path, kind):  # noqa: F811
    art = artifacts / kind
    ids, index = _index(art)
    users = _users(artifacts, 20)
    everything = pl.DataFrame({"user_id": [9005], "history": [ids]}, schema=users.schema)  # rejected: nothing left
    users = pl.concat([users.head(7), everything, users.tail(13)])
    summary = score_users(_write(users, tmp_path / "users.parquet"), art, tmp_path / "out", top_k=6, explain=True)
    assert summary["users_rejected"]["no eligible items"] == 1 and summary["users_scored"] == 20
    recs = _recs(tmp_path / "out")
    assert recs.columns == ["user_id", "rank", "item_id", "score", "because_item_id"]
    matrix = np.load(art / "item_matrix.npy")
    unit = matrix / np.linalg.norm(matrix, axis=1, keepdims=True)
    histories = dict(users.iter_rows())
    for user_id, item_id, because in recs.select("user_id", "item_id", "because_item_id").iter_rows():
        history = histories[user_id]
        assert because in history
        similarity = {h: float(unit[index[item_id]] @ unit[index[h]]) for h in history}
        assert similarity[because] == pytest.approx(max(similarity.values()), abs=1e-6)


def test_explain_covers_backfilled_items_too(artifacts, tmp_path):  # noqa: F811
    users = _users(artifacts, 10)
    users = users.with_columns(candidates=pl.col("history").list.head(1))  # only a history item: all backfilled
    score_users(_write(users, tmp_path / "users.parquet"), artifacts / "laser_art", tmp_path / "out", top_k=4,
                explain=True, backfill="popular")
    recs = _recs(tmp_path / "out").join(users, on="user_id")
    assert set(recs["source"]) == {"backfill"} and recs.height == 40
    assert recs.select(pl.col("history").list.contains(pl.col("because_item_id")).all()).item()


def test_item_columns_are_joined_by_item(artifacts, tmp_path):  # noqa: F811
    art = artifacts / "laser_art"
    score_users(_write(_users(artifacts, 8), tmp_path / "users.parquet"), art, tmp_path / "out", top_k=5,
                with_item_columns="title, brand")
    recs = _recs(tmp_path / "out")
    assert recs.columns == ["user_id", "rank", "item_id", "score", "title", "brand"]
    items = pl.read_parquet(art / "items.parquet")
    expected = recs.select("item_id").join(items, on="item_id", how="left", maintain_order="left")
    assert recs.select("title", "brand").equals(expected.select("title", "brand"))
    assert recs["title"].null_count() == 0


@pytest.mark.parametrize("kind", ["laser_art", "sasrec_art"])
def test_prob_is_the_softmax_of_the_training_logits_over_the_whole_catalogue(artifacts, tmp_path, kind):  # noqa: F811
    art = artifacts / kind
    users = _users(artifacts, 10)
    path = _write(users, tmp_path / "users.parquet")
    score_users(path, art, tmp_path / "cos", top_k=8)
    score_users(path, art, tmp_path / "prob", top_k=8, score="prob")
    cos, prob = _recs(tmp_path / "cos"), _recs(tmp_path / "prob")
    assert prob.select("user_id", "rank", "item_id").equals(cos.select("user_id", "rank", "item_id"))
    manifest = json.loads((art / MANIFEST).read_text())
    scale = 1 / manifest["settings"]["temperature"] if kind == "laser_art" else 1.0
    assert kind == "sasrec_art" or scale == 1 / 0.05  # the training temperature of the test config
    ids, index = _index(art)
    matrix = np.load(art / "item_matrix.npy").astype(np.float64)
    embedder = Embedder(art)
    for user_id, history in users.iter_rows():
        logits = embedder.embed([np.array([index[i] + 1 for i in history])])[0].astype(np.float64) @ matrix.T * scale
        softmax = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()  # history included
        mine = prob.filter(pl.col("user_id") == user_id)
        np.testing.assert_allclose(mine["score"].to_numpy(), softmax[[index[i] for i in mine["item_id"]]],
                                   rtol=2e-4, atol=1e-7)
        assert 0 < mine["score"].sum() < 1
    assert (prob["score"] > 0).all()


def test_prob_needs_the_temperature_in_the_manifest(artifacts, tmp_path):  # noqa: F811
    art = tmp_path / "old"
    shutil.copytree(artifacts / "laser_art", art)
    manifest = json.loads((art / MANIFEST).read_text())
    del manifest["settings"]["temperature"]  # as exported before it was recorded
    (art / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="does not record the training temperature.*export again to use --score "
                                            "prob"):
        score_users(_write(_users(artifacts, 2), tmp_path / "u.parquet"), art, tmp_path / "out", score="prob")
    assert sha256_file(art / MANIFEST)  # untouched otherwise; the plain score still works
    score_users(tmp_path / "u.parquet", art, tmp_path / "plain")


def test_list_layout_is_one_row_per_user_with_the_long_rows_as_lists(artifacts, tmp_path):  # noqa: F811
    users = _users(artifacts, 15)
    users = users.with_columns(candidates=pl.when(pl.col("user_id") % 3 == 0).then(pl.col("history").list.head(2))
                               .otherwise(None))
    path = _write(users, tmp_path / "users.parquet")
    options = {"top_k": 5, "explain": True, "with_item_columns": ["title"], "backfill": "popular"}
    score_users(path, artifacts / "laser_art", tmp_path / "long", **options)
    score_users(path, artifacts / "laser_art", tmp_path / "list", layout="list", chunk_size=4, **options)
    long = _recs(tmp_path / "long")
    listed = pl.concat([pl.read_parquet(p) for p in sorted((tmp_path / "list").glob("part-*.parquet"))])
    assert listed.columns == ["user_id", "item_ids", "scores", "source", "because_item_id", "title"]
    assert listed["user_id"].is_unique().all() and listed.height == 15
    back = listed.explode("item_ids", "scores", "source", "because_item_id", "title").with_columns(
        rank=pl.int_range(1, pl.len() + 1, dtype=pl.Int32).over("user_id")).rename(
        {"item_ids": "item_id", "scores": "score"}).select(long.columns).sort("user_id", "rank")
    assert back.drop("score").equals(long.drop("score"))  # the scores: up to the rounding of other batches
    np.testing.assert_allclose(back["score"].to_numpy(), long["score"].to_numpy(), atol=1e-5)


def test_evaluate_and_show_read_the_list_layout(artifacts, tmp_path):  # noqa: F811
    users = _users(artifacts)
    held_in = users.with_columns(pl.col("history").list.slice(0, pl.col("history").list.len() - 1))
    _write(users.select("user_id", pl.col("history").list.last().alias("item_id")), tmp_path / "truth.parquet")
    path = _write(held_in, tmp_path / "users.parquet")
    runner = CliRunner()
    for layout in ("long", "list"):
        done = runner.invoke(app, ["score", str(path), "--model", str(artifacts / "laser_art"), "--out",
                                   str(tmp_path / layout), "--layout", layout, "--show", "2"])
        assert done.exit_code == 0, done.output
        assert sum(line.startswith("  ") for line in done.output.splitlines()) == 10
        runner.invoke(app, ["evaluate", "--recs", str(tmp_path / layout), "--truth", str(tmp_path / "truth.parquet"),
                            "--json", str(tmp_path / f"{layout}.json")])
    assert json.loads((tmp_path / "list.json").read_text()) == json.loads((tmp_path / "long.json").read_text())


@pytest.mark.parametrize("options, message", [
    (["--with-item-columns", "colour"], "--with-item-columns colour: no such column in"),
    (["--with-item-columns", "score"], "--with-item-columns score: the output already has a column of that name"),
    (["--with-item-columns", "title,,brand"], "an empty column name"),
    (["--with-item-columns", "title,title"], "a column is named twice"),
])
def test_bad_output_options_are_one_line_before_any_model_work(artifacts, tmp_path, monkeypatch, options,  # noqa: F811
                                                               message):
    import laser_batch.artifacts

    monkeypatch.setattr(laser_batch.artifacts, "session", lambda *a, **k: pytest.fail("a model was loaded"))
    path = _write(_users(artifacts, 2), tmp_path / "users.parquet")
    done = CliRunner().invoke(app, ["score", str(path), "--model", str(artifacts / "laser_art"), "--out",
                                    str(tmp_path / "out"), *options])
    assert done.exit_code == 2 and done.stderr.strip().splitlines() == [done.stderr.strip()]
    assert message in done.stderr and not (tmp_path / "out").exists()


def test_item_columns_need_laser_artefacts(artifacts, tmp_path):  # noqa: F811
    with pytest.raises(InputError, match="has no items.parquet \\(SASRec-only artefacts carry no item columns\\)"):
        score_users(_write(_users(artifacts, 2), tmp_path / "u.parquet"), artifacts / "sasrec_art", tmp_path / "o",
                    with_item_columns="title")


def test_prob_of_a_gated_fusion_is_the_softmax_of_sasrec_dot_plus_g_cos_over_tau(fused_art, artifacts,  # noqa: F811
                                                                                 tmp_path):
    art = tmp_path / "fused"
    shutil.copytree(fused_art, art)
    manifest = json.loads((art / MANIFEST).read_text())
    manifest["settings"]["gate"] = 0.5  # a gate away from 0, so that the Laser term counts
    (art / MANIFEST).write_text(json.dumps(manifest))
    g, tau = 0.5, manifest["settings"]["temperature"]
    users = _users(artifacts, 6)
    score_users(_write(users, tmp_path / "users.parquet"), art, tmp_path / "prob", top_k=5, score="prob")
    prob = _recs(tmp_path / "prob")
    ids, index = _index(art)
    matrix = np.load(art / "item_matrix.npy").astype(np.float64)
    embedder = Embedder(art)
    d_llm = embedder.user_encoder.get_outputs()[0].shape[-1]
    sasrec_items, laser_items = matrix[:, :-d_llm], matrix[:, -d_llm:]
    for user_id, history in users.iter_rows():
        feeds = embedder.feeds([np.array([index[i] + 1 for i in history])])
        laser_u = embedder._run(embedder.user_encoder, feeds, "embedding")[0]
        logits = feeds.sasrec_state[0] @ sasrec_items.T + g * (laser_u @ laser_items.T) / tau
        softmax = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        mine = prob.filter(pl.col("user_id") == user_id)
        np.testing.assert_allclose(mine["score"].to_numpy(), softmax[[index[i] for i in mine["item_id"]]],
                                   rtol=2e-4, atol=1e-7)
