"""`laser-batch items add`: new items encoded by the exported graphs (torch-free), appended atomically, checksummed."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import polars as pl
import pytest
from test_laser import small_config
from test_score import _recs, _users, _write, artifacts  # noqa: F401 (the tiny Laser artefacts, built once)
from typer.testing import CliRunner

from laser_batch.artifacts import MANIFEST, Embedder, load_manifest, manifest_sha256
from laser_batch.cli import app
from laser_batch.errors import ArtifactError, InputError
from laser_batch.files import sha256_file
from laser_batch.items_add import add_items
from laser_batch.score import Recommender, score_users


def _train_variant(root, name, **laser):
    """A Laser variant on the fixture's SASRec, exported to root/NAME_art (built once per session)."""
    from laser_batch.exporters.export import export_run
    from laser_batch.train_laser import train_laser

    art = root / f"{name}_art"
    if not (art / MANIFEST).exists():
        run = root / f"{name}_run"
        shutil.rmtree(run, ignore_errors=True)
        shutil.copytree(root / "run" / "sasrec", run / "sasrec")
        shutil.copy(root / "run" / "run.json", run / "run.json")
        train_laser(run, small_config(laser={"center": True, **laser}))
        export_run(run, art)
    return art


@pytest.fixture(scope="module")
def text_art(artifacts):  # noqa: F811
    """Laser without a prefix (an item is its text alone), trained at a tiny learning rate: the exported graphs
    encode the catalogue as its item matrix was encoded, so a text twin is its original's twin in the matrix."""
    return _train_variant(artifacts, "text_only", prefix="none", lr=1e-7)


@pytest.fixture(scope="module")
def fused_art(artifacts):  # noqa: F811
    return _train_variant(artifacts, "fused", fusion="gated")


def _new_items(art, sources, *, start=5000, suffix=""):
    """Text twins of catalogue rows `sources` under new ids (title + suffix)."""
    items = pl.read_parquet(art / "items.parquet")
    twins = items[list(sources)].with_columns(item_id=pl.int_range(start, start + len(sources), dtype=pl.Int64),
                                              title=pl.col("title") + suffix)
    return twins


def test_new_rows_are_appended_and_the_old_artefacts_and_rows_are_untouched(artifacts, tmp_path):  # noqa: F811
    art = artifacts / "laser_art"
    before = {name: sha256_file(art / name) for name in [*load_manifest(art)["files"], MANIFEST]}
    new = _new_items(art, [3, 8, 20], suffix=" (2027)")
    manifest = add_items(art, _write(new, tmp_path / "new.parquet"), tmp_path / "out", id_vector="mean")
    assert {name: sha256_file(art / name) for name in before} == before
    out = tmp_path / "out"
    old, grown = np.load(art / "item_matrix.npy"), np.load(out / "item_matrix.npy")
    assert grown.shape == (old.shape[0] + 3, old.shape[1]) and np.array_equal(grown[:-3], old)
    np.testing.assert_allclose(np.linalg.norm(grown[-3:], axis=1), 1.0, rtol=1e-5)  # Laser rows are unit vectors
    ids = pl.read_parquet(out / "item_ids.parquet")
    assert ids["item_id"].to_list()[-3:] == [5000, 5001, 5002] and ids["index"].to_list() == list(range(1, 44))
    assert ids["train_interactions"].to_list()[-3:] == [0, 0, 0]
    assert pl.read_parquet(out / "items.parquet").tail(3).equals(new.select(pl.read_parquet(art / "items.parquet")
                                                                            .columns))
    vectors = np.load(out / "item_id_vectors.npy")  # the fallback: the mean ID vector
    np.testing.assert_allclose(vectors[-1], np.load(art / "item_id_vectors.npy").mean(0), rtol=1e-5)
    record = manifest["items_added"][-1]
    assert manifest["parent_manifest_sha256"] == record["parent_manifest_sha256"] == before[MANIFEST]
    assert (record["items"], record["first_index"], record["id_vector"]) == (3, 41, "mean")
    assert record["id_vector_used_by"] == ["mformer"] and manifest["settings"]["num_items"] == 43
    assert record["alignment"]["catalogue_items"] == 40 and record["alignment"]["map"] is not None
    # Warm items score as before: the same users, the same scores for every old item.
    users = _users(artifacts, 10)
    histories = [[i for i in h] for h in users["history"].to_list()]
    index = {item: k + 1 for k, item in enumerate(ids.sort("index")["item_id"].to_list())}
    internal = [np.array([index[i] for i in h]) for h in histories]
    np.testing.assert_allclose(Embedder(out).embed(internal) @ grown[:-3].T, Embedder(art).embed(internal) @ old.T,
                               atol=1e-6)
    # and the scorer ranks the new items among the old ones
    recs, _, _ = Recommender(out, top_k=43).recommend(users)
    assert set(recs["item_id"]) >= {5000, 5001, 5002}


def test_the_manifest_checksums_verify_and_tampered_added_files_are_refused(artifacts, tmp_path):  # noqa: F811
    art = artifacts / "laser_art"
    add_items(art, _write(_new_items(art, [1, 2]), tmp_path / "new.parquet"), tmp_path / "out")
    out = tmp_path / "out"
    manifest = load_manifest(out)  # verifies every size and sha256
    assert set(manifest["files"]) == {p.name for p in out.iterdir()} - {MANIFEST}
    for name, record in manifest["files"].items():
        assert sha256_file(out / name) == record["sha256"]
    for name in ("item_matrix.npy", "items.parquet", "item_ids.parquet", "item_id_vectors.npy"):
        path = out / name
        original = path.read_bytes()
        data = bytearray(original)
        data[-5] ^= 0xFF
        path.write_bytes(bytes(data))
        with pytest.raises(ArtifactError, match=f"{name}: checksum does not match the manifest"):
            Recommender(out)
        with pytest.raises(ArtifactError, match=f"{name}: checksum does not match"):
            add_items(out, tmp_path / "new.parquet", tmp_path / "again")
        path.write_bytes(original)
    Recommender(out)


def test_an_interrupted_items_add_leaves_the_old_artefacts_untouched_and_no_out(artifacts, tmp_path):  # noqa: F811
    art = artifacts / "laser_art"
    before = {p.name: sha256_file(p) for p in art.iterdir()}
    new = _write(_new_items(art, [5]), tmp_path / "new.parquet")
    # kill -9 right before the new manifest is written (every new file is in place by then)
    code = ("import os, laser_batch.items_add as m; m.write_manifest = lambda *a: os.kill(os.getpid(), 9); "
            f"m.add_items({str(art)!r}, {str(new)!r}, {str(tmp_path / 'out')!r})")
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, env=env)
    assert done.returncode == -9, done.stderr.decode()[-2000:]
    assert {p.name: sha256_file(p) for p in art.iterdir()} == before
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.partial")]  # hidden, never taken for OUT
    # an exception on the way (e.g. Ctrl-C) leaves nothing at all
    import laser_batch.items_add as items_add

    def interrupted(*args):
        raise KeyboardInterrupt

    original = items_add.write_manifest
    items_add.write_manifest = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            add_items(art, new, tmp_path / "out2")
    finally:
        items_add.write_manifest = original
    assert not [p for p in tmp_path.iterdir() if "out2" in p.name]
    assert {p.name: sha256_file(p) for p in art.iterdir()} == before
    # and an existing OUT is replaced only by a finished one
    add_items(art, new, tmp_path / "out3")
    first = sha256_file(tmp_path / "out3" / MANIFEST)
    items_add.write_manifest = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            add_items(art, new, tmp_path / "out3", id_vector="zeros", overwrite=True)
    finally:
        items_add.write_manifest = original
    assert sha256_file(tmp_path / "out3" / MANIFEST) == first and load_manifest(tmp_path / "out3")


def test_a_user_whose_history_is_the_new_items_text_neighbours_gets_it_in_the_top_k(text_art, tmp_path):
    sources = [0, 7, 15, 22, 31]
    new = _new_items(text_art, sources)  # exact text twins under new ids
    add_items(text_art, _write(new, tmp_path / "new.parquet"), tmp_path / "out")
    out = tmp_path / "out"
    matrix = np.load(out / "item_matrix.npy")
    ids = pl.read_parquet(out / "item_ids.parquet").sort("index")["item_id"].to_list()
    for k, source in enumerate(sources):
        row = matrix[40 + k]
        assert float(row @ matrix[source]) > 0.999  # the twin lands on its original's row
        similarity = matrix[:40] @ row  # the new item's text neighbours among the catalogue
        neighbours = [ids[j] for j in np.argsort(-similarity)[:3]]
        assert ids[source] in neighbours
        recs, _, _ = Recommender(out, top_k=5).recommend(pl.DataFrame({"user_id": [1], "history": [neighbours]}))
        assert 5000 + k in recs["item_id"].to_list(), (source, recs)


def test_the_fused_export_gives_a_new_item_the_fallback_as_its_sasrec_part(fused_art, tmp_path):
    art = tmp_path / "fused"
    shutil.copytree(fused_art, art)
    manifest = json.loads((art / MANIFEST).read_text())
    manifest["settings"]["gate"] = 0.5  # a gate away from 0, so that the Laser term shows
    (art / MANIFEST).write_text(json.dumps(manifest))
    settings = manifest["settings"]
    old = np.load(art / "item_matrix.npy")
    for id_vector in ("mean", "zeros"):
        out = tmp_path / id_vector
        record = add_items(art, _write(_new_items(art, [4, 9]), tmp_path / "new.parquet"), out,
                           id_vector=id_vector)["items_added"][-1]
        assert record["id_vector_used_by"] == ["mformer", "sasrec"]
        grown = np.load(out / "item_matrix.npy")
        d_id = grown.shape[1] - Embedder(out).user_encoder.get_outputs()[0].shape[-1]
        fallback = old[:, :d_id].mean(0) if id_vector == "mean" else np.zeros(d_id)
        np.testing.assert_allclose(grown[-2:, :d_id], np.stack([fallback, fallback]), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(np.linalg.norm(grown[-2:, d_id:], axis=1), 1.0, rtol=1e-5)
        # score(u, new) = SASRec state . fallback + g / tau * cos(laser_u, laser_new)
        embedder = Embedder(out)
        histories = [np.array([1, 5, 9]), np.array([12, 3])]
        feeds = embedder.feeds(histories)
        users = embedder.run(feeds)
        laser_u = embedder._run(embedder.user_encoder, feeds, "embedding")
        expected = feeds.sasrec_state @ fallback[:, None] + settings["gate"] / settings["temperature"] * (
            laser_u @ grown[-2:, d_id:].T)
        np.testing.assert_allclose(users @ grown[-2:].T, expected, rtol=1e-4, atol=1e-4)


def test_neighbours_gives_a_new_item_the_mean_id_and_sasrec_vectors_of_its_text_neighbours(fused_art, tmp_path):
    record = add_items(fused_art, _write(_new_items(fused_art, [4, 9]), tmp_path / "new.parquet"), tmp_path / "out",
                       id_vector="neighbours")["items_added"][-1]
    assert record["id_vector"] == "neighbours" and record["id_vector_used_by"] == ["mformer", "sasrec"]
    old, grown = np.load(fused_art / "item_matrix.npy"), np.load(tmp_path / "out" / "item_matrix.npy")
    old_ids, grown_ids = np.load(fused_art / "item_id_vectors.npy"), np.load(tmp_path / "out" / "item_id_vectors.npy")
    d_id = grown.shape[1] - Embedder(tmp_path / "out").user_encoder.get_outputs()[0].shape[-1]
    laser = old[:, d_id:] / np.linalg.norm(old[:, d_id:], axis=1, keepdims=True)
    # the neighbours are found from the item encoded with the `mean` ID vector, what `--id-vector mean` adds
    add_items(fused_art, tmp_path / "new.parquet", tmp_path / "mean", id_vector="mean")
    first_pass = np.load(tmp_path / "mean" / "item_matrix.npy")[len(old):, d_id:]
    for k in range(2):
        row = grown[len(old) + k]
        # the ten catalogue items closest to the new item's Laser embedding (with an M-Former prefix from the mean ID
        # vector the embedding is not the text's alone: the text twin need not be among them in this tiny model)
        nearest = np.argsort(-(laser @ first_pass[k]))[:10]
        np.testing.assert_allclose(row[:d_id], old[nearest, :d_id].mean(0), rtol=1e-4, atol=1e-5)
        assert not np.allclose(row[:d_id], old[:, :d_id].mean(0), atol=1e-3)  # not the catalogue mean
    # the M-Former's ID vectors: one per new item, each the mean of catalogue ID vectors (not one broadcast vector)
    added = grown_ids[len(old_ids):]
    assert added.shape == (2, old_ids.shape[1]) and not np.allclose(added[0], added[1])


def test_each_bad_input_is_one_line_and_writes_nothing(artifacts, tmp_path):  # noqa: F811
    art = artifacts / "laser_art"
    items = pl.read_parquet(art / "items.parquet")
    new = _new_items(art, [1])
    cases = [
        (new.with_columns(item_id=pl.lit(items["item_id"][4])), "item_id 5 already in the catalogue"),
        (pl.concat([new, new]), "item_id 5000 appears more than once"),
        (new.drop("brand"), "missing column(s) brand: the model's item text is built from item_id, title, category"),
        (new.with_columns(item_id=pl.lit("x")), "column 'item_id' has type String, but the model's item ids are Int64"),
        (new.clear(), "no rows, no items to add"),
    ]
    runner = CliRunner()
    for frame, message in cases:
        path = _write(frame, tmp_path / "bad.parquet")
        done = runner.invoke(app, ["items", "add", str(art), str(path), "--out", str(tmp_path / "out")])
        assert done.exit_code == 2 and message in done.stderr, (message, done.output)
        assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
    good = _write(new, tmp_path / "new.parquet")
    with pytest.raises(ArtifactError, match="sasrec-only artefacts cannot encode new items"):
        add_items(artifacts / "sasrec_art", good, tmp_path / "out")
    with pytest.raises(InputError, match="must not be ARTIFACTS itself"):
        add_items(art, good, art)
    (tmp_path / "taken").mkdir()
    with pytest.raises(InputError, match="taken: already exists; pass --overwrite"):
        add_items(art, good, tmp_path / "taken")
    with pytest.raises(InputError, match="no_such.parquet: file not found"):
        add_items(art, tmp_path / "no_such.parquet", tmp_path / "out")
    centred = tmp_path / "centred"
    shutil.copytree(art, centred)
    manifest = json.loads((centred / MANIFEST).read_text())
    manifest["settings"]["center_users"] = 64
    (centred / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="users are centred apart from items"):
        add_items(centred, good, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_items_add_then_score_and_a_second_addition_chains_the_manifests(artifacts, tmp_path):  # noqa: F811
    art = artifacts / "laser_art"
    runner = CliRunner()
    _write(_new_items(art, [2, 6]), tmp_path / "a.parquet")
    _write(_new_items(art, [11], start=6000), tmp_path / "b.parquet")
    done = runner.invoke(app, ["items", "add", str(art), str(tmp_path / "a.parquet"), "--out", str(tmp_path / "one"),
                               "--id-vector", "zeros", "--align", "none"])
    assert done.exit_code == 0, done.output
    assert f"2 items added (42 in all), ID vector zeros; parent manifest {manifest_sha256(art)[:12]}" in done.output
    done = runner.invoke(app, ["items", "add", str(tmp_path / "one"), str(tmp_path / "b.parquet"), "--out",
                               str(tmp_path / "two")])
    assert done.exit_code == 0, done.output
    manifest = load_manifest(tmp_path / "two")
    assert [r["items"] for r in manifest["items_added"]] == [2, 1]
    assert [r["parent_manifest_sha256"] for r in manifest["items_added"]] == [manifest_sha256(art),
                                                                             manifest_sha256(tmp_path / "one")]
    assert manifest["items_added"][0]["alignment"]["map"] is None and manifest["settings"]["num_items"] == 43
    np.testing.assert_array_equal(np.load(tmp_path / "two" / "item_id_vectors.npy")[40:42], 0)
    users = _write(_users(artifacts, 5), tmp_path / "users.parquet")
    summary = score_users(users, tmp_path / "two", tmp_path / "recs", top_k=43, with_item_columns="title")
    recs = _recs(tmp_path / "recs")
    assert summary["users_scored"] == 5 and {5000, 5001, 6000} <= set(recs["item_id"])
    assert recs.filter(pl.col("item_id") == 6000)["title"].unique().to_list() == [
        pl.read_parquet(art / "items.parquet")["title"][11]]


@pytest.mark.parametrize("variant", ["laser_art", "fused"])
def test_users_who_met_added_items_are_scored_with_them_as_text_only(artifacts, fused_art, tmp_path, variant):  # noqa: F811
    art = artifacts / "laser_art" if variant == "laser_art" else fused_art
    add_items(art, _write(_new_items(art, [2, 6]), tmp_path / "new.parquet"), tmp_path / "out")
    embedder = Embedder(tmp_path / "out")
    with_new, without, only_new = np.array([3, 41, 7]), np.array([3, 7]), np.array([42, 41])
    feeds = embedder.feeds([with_new, only_new])
    reference = embedder.feeds([without, np.array([5])])
    if "prefix" in feeds:  # the ID path skips the added items (they have no SASRec row): as if they were not there
        np.testing.assert_allclose(feeds["prefix"][0], reference["prefix"][0], atol=1e-6)
    if feeds.sasrec_state is not None:
        np.testing.assert_allclose(feeds.sasrec_state[0], reference.sasrec_state[0], atol=1e-6)
        assert not feeds.sasrec_state[1].any()  # only added items: no SASRec state
    text = embedder.text.encode_users([with_new])[0][0]
    assert np.array_equal(feeds["input_ids"][0][feeds["attention_mask"][0] == 1], text)  # the text reads them all
    vectors = embedder.run(feeds)
    assert np.isfinite(vectors).all()
    users = pl.DataFrame({"user_id": [1, 2], "history": [[4, 5000, 8], [5001]]})
    recs, rejects, _ = Recommender(tmp_path / "out", top_k=5).recommend(users)
    assert rejects.height == 0 and recs.group_by("user_id").len()["len"].to_list() == [5, 5]
    for user_id, history in users.iter_rows():  # each user's history excluded, added items included
        assert not set(history) & set(recs.filter(pl.col("user_id") == user_id)["item_id"])
