"""The nightly job: every user accounted for once, the same result in any chunking, resumable after kill -9."""

import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import polars as pl
import pytest
from test_laser import small_config

from laser_batch.artifacts import Embedder
from laser_batch.errors import ArtifactError, InputError
from laser_batch.exporters.export import export_run
from laser_batch.score import Recommender, SeenUsers, score_users
from laser_batch.train import train_sasrec
from laser_batch.train_laser import train_laser


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """The example data, a tiny run and its exports (laser_art, sasrec_art): built once per test session, and
    shared by the modules that import this fixture (test_ray, test_score_boundaries)."""
    from laser_batch.examples.synthetic import write_example

    root = tmp_path_factory.getbasetemp() / "score_artifacts"
    if (root / "built").exists():
        return root
    shutil.rmtree(root, ignore_errors=True)  # a build that failed part way
    write_example(root / "data", users=60, items=40, seed=11)
    config = small_config(laser={"center": True})
    train_sasrec(root / "data", root / "run", config)
    export_run(root / "run", root / "sasrec_art", model="sasrec")
    train_laser(root / "run", config)
    export_run(root / "run", root / "laser_art")
    (root / "built").write_text("")
    return root


def _users(root, n=None):
    """The example users' full histories (user_id, history), oldest first."""
    inter = pl.read_parquet(root / "data" / "interactions.parquet").sort("user_id", "timestamp")
    users = inter.group_by("user_id", maintain_order=True).agg(pl.col("item_id").alias("history"))
    return users if n is None else users.head(n)


def _write(df, path):
    df.write_parquet(path)
    return path


def _recs(out):
    return pl.concat([pl.read_parquet(p) for p in sorted(out.glob("part-*.parquet"))]).sort("user_id", "rank")


def _assert_same_recs(a, b):
    """The same items at the same ranks; scores equal up to float rounding (batches pad differently)."""
    assert a.select("user_id", "rank", "item_id").equals(b.select("user_id", "rank", "item_id"))
    np.testing.assert_allclose(a["score"].to_numpy(), b["score"].to_numpy(), atol=1e-5)


@pytest.mark.parametrize("kind", ["laser_art", "sasrec_art"])
def test_recommendations_are_the_top_k_by_score_excluding_history(artifacts, tmp_path, kind):
    users = _users(artifacts, 25)
    summary = score_users(_write(users, tmp_path / "users.parquet"), artifacts / kind, tmp_path / "out", top_k=5,
                          batch_size=4)
    recs = _recs(tmp_path / "out")
    assert summary["users_scored"] == 25 and (tmp_path / "out" / "_SUCCESS").exists()
    assert recs.schema == pl.Schema({"user_id": pl.Int64, "rank": pl.Int32, "item_id": pl.Int64,
                                     "score": pl.Float32})
    # Independently: embed with the graphs, score every item, drop the history, take the 5 best.
    embedder = Embedder(artifacts / kind)
    item_ids = pl.read_parquet(artifacts / kind / "item_ids.parquet").sort("index")["item_id"].to_list()
    index = {item: i + 1 for i, item in enumerate(item_ids)}
    matrix = np.load(artifacts / kind / "item_matrix.npy")
    for user_id, history in users.iter_rows():
        internal = np.array([index[i] for i in history])
        scores = embedder.embed([internal])[0] @ matrix.T
        scores[internal - 1] = -np.inf
        expected = [item_ids[j] for j in np.argsort(-scores, kind="stable")[:5]]
        mine = recs.filter(pl.col("user_id") == user_id)
        assert mine["rank"].to_list() == [1, 2, 3, 4, 5]
        assert mine["item_id"].to_list() == expected
        assert not set(mine["item_id"]) & set(history)
        np.testing.assert_allclose(mine["score"].to_numpy(), np.sort(scores)[::-1][:5], rtol=1e-5)


def test_every_input_user_is_in_the_output_or_rejects_exactly_once(artifacts, tmp_path):
    good = _users(artifacts, 12)
    known = good["history"][0].to_list()
    bad = pl.DataFrame({
        "user_id": [good["user_id"][0], None, 9001, 9002, 9003, 9004, 9005],
        "history": [known, known, [], None, [777777, 888888], [777777] * 3 + known * 40, known[:1]],
    }, schema={"user_id": pl.Int64, "history": pl.List(pl.Int64)})
    users = pl.concat([good, bad])
    summary = score_users(_write(users, tmp_path / "u.parquet"), artifacts / "laser_art", tmp_path / "out",
                          top_k=3, chunk_size=5)
    recs, rejects = _recs(tmp_path / "out"), pl.read_parquet(tmp_path / "out" / "rejects.parquet")
    scored = recs["user_id"].unique().to_list()
    assert sorted(scored) == sorted([*good["user_id"].to_list(), 9004, 9005])
    assert sorted(rejects.rows(), key=str) == sorted([
        (good["user_id"][0], "duplicate user"), (None, "null user_id"), (9001, "empty history"),
        (9002, "empty history"), (9003, "no known items")], key=str)
    assert len(scored) + rejects.height == users.height == summary["users_in"]
    assert summary["users_rejected"] == {"null user_id": 1, "duplicate user": 1, "empty history": 2,
                                         "no known items": 1, "no eligible items": 0}
    assert summary["unknown_items_dropped"] == 5  # 2 of user 9003 and 3 of the very long history 9004


def test_chunking_and_batching_do_not_change_the_result(artifacts, tmp_path):
    path = _write(_users(artifacts), tmp_path / "users.parquet")
    score_users(path, artifacts / "laser_art", tmp_path / "a", chunk_size=7, batch_size=3)
    score_users(path, artifacts / "laser_art", tmp_path / "b", chunk_size=1000, batch_size=64)
    _assert_same_recs(_recs(tmp_path / "a"), _recs(tmp_path / "b"))
    assert len(list((tmp_path / "a").glob("part-*.parquet"))) == 9


def test_interactions_input_is_grouped_by_time(artifacts, tmp_path):
    inter = pl.read_parquet(artifacts / "data" / "interactions.parquet").sample(fraction=1.0, shuffle=True, seed=1)
    score_users(_write(inter, tmp_path / "inter.parquet"), artifacts / "laser_art", tmp_path / "a",
                interactions=True)
    score_users(_write(_users(artifacts), tmp_path / "users.parquet"), artifacts / "laser_art", tmp_path / "b")
    assert _recs(tmp_path / "a").select("user_id", "item_id").equals(_recs(tmp_path / "b").select("user_id",
                                                                                                   "item_id"))
    assert not (tmp_path / "a" / "_work").exists()


def test_resume_after_kill_9_gives_the_uninterrupted_result(artifacts, tmp_path):
    users = _users(artifacts)
    many = pl.concat([users.with_columns(pl.col("user_id") + 1000 * i) for i in range(40)])  # 2400 users
    path = _write(many, tmp_path / "users.parquet")
    command = [sys.executable, "-m", "laser_batch.cli", "score", str(path), "--model", str(artifacts / "laser_art"),
               "--chunk-size", "20", "--batch-size", "8", "--threads", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    job = subprocess.Popen([*command, "--out", str(tmp_path / "killed")], env=env, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (tmp_path / "killed" / "part-00003.parquet").exists() and time.time() < deadline:
        time.sleep(0.01)
    job.send_signal(signal.SIGKILL)
    job.wait()
    assert not (tmp_path / "killed" / "_SUCCESS").exists(), "the job ended before it could be killed"
    refused = subprocess.run([*command, "--out", str(tmp_path / "killed")], env=env, capture_output=True, text=True)
    assert refused.returncode == 2 and "not empty; pass --resume" in refused.stderr
    subprocess.run([*command, "--out", str(tmp_path / "killed"), "--resume"], env=env, check=True,
                   capture_output=True)
    subprocess.run([*command, "--out", str(tmp_path / "straight")], env=env, check=True, capture_output=True)
    killed, straight = _recs(tmp_path / "killed"), _recs(tmp_path / "straight")
    assert killed.height == straight.height == 2400 * 20
    assert killed.select("user_id", "rank", "item_id").equals(straight.select("user_id", "rank", "item_id"))
    assert killed.select("user_id", "rank").is_unique().all()
    summary = json.loads((tmp_path / "killed" / "summary.json").read_text())
    assert summary["users_in"] == summary["users_scored"] == 2400
    assert not list((tmp_path / "killed").glob(".*tmp*"))


@pytest.mark.parametrize("make, message", [
    (lambda p: p.write_bytes(b"not parquet at all"), "not a readable Parquet file"),
    (lambda p: p.write_bytes(b""), "not a readable Parquet file"),
    (lambda p: pl.DataFrame({"user_id": [1], "items": [[1]]}).write_parquet(p), "missing column(s) history"),
    (lambda p: pl.DataFrame({"user_id": [1], "history": ["1 2 3"]}).write_parquet(p),
     "column 'history' has type String, expected a list of item ids"),
    (lambda p: pl.DataFrame({"user_id": [1.5], "history": [[1]]}).write_parquet(p),
     "column 'user_id' has type Float64"),
    (lambda p: pl.DataFrame({"user_id": [1], "history": [["a"]]}).write_parquet(p),
     "holds String item ids, but the model's item ids are Int64"),
    (lambda p: pl.DataFrame(schema={"user_id": pl.Int64, "history": pl.List(pl.Int64)}).write_parquet(p),
     "no rows, nothing to score"),
])
def test_bad_input_is_one_clear_error_and_writes_nothing(artifacts, tmp_path, make, message):
    make(tmp_path / "users.parquet")
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        score_users(tmp_path / "users.parquet", artifacts / "laser_art", tmp_path / "out")
    assert not (tmp_path / "out" / "_SUCCESS").exists() and not list(tmp_path.glob("out/part-*"))


def test_device_cuda_without_a_gpu_is_an_error(artifacts):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.InferenceSession(
            str(artifacts / "laser_art" / "sasrec.onnx"), providers=["CUDAExecutionProvider"]).get_providers():
        pytest.skip("this machine has a working CUDA provider")
    with pytest.raises(ArtifactError, match="--device cuda: ONNX Runtime could not start its CUDA"):
        Recommender(artifacts / "laser_art", device="cuda")


def test_evaluate_from_outputs_matches_the_torch_evaluation(artifacts, tmp_path):
    from typer.testing import CliRunner

    from laser_batch.cli import app
    from laser_batch.evaluate import evaluate_run

    users = _users(artifacts)
    held_in = users.with_columns(pl.col("history").list.slice(0, pl.col("history").list.len() - 1))
    truth = users.select("user_id", pl.col("history").list.last().alias("item_id"))
    score_users(_write(held_in, tmp_path / "users.parquet"), artifacts / "laser_art", tmp_path / "out", top_k=20)
    _write(truth, tmp_path / "truth.parquet")
    result = CliRunner().invoke(app, ["evaluate", "--recs", str(tmp_path / "out"), "--truth",
                                      str(tmp_path / "truth.parquet"), "--k", "10", "--k", "20",
                                      "--json", str(tmp_path / "m.json")])
    assert result.exit_code == 0, result.output
    mine = json.loads((tmp_path / "m.json").read_text())
    torch_eval = evaluate_run(artifacts / "run", model="laser", split="test")["metrics"]
    assert mine["cases"] == 60 and mine["cases_without_recommendations"] == 0
    assert mine["metrics"]["HR@10"] == pytest.approx(torch_eval["HR@10"], abs=1 / 60)
    assert mine["metrics"]["NDCG@20"] == pytest.approx(torch_eval["NDCG@20"], abs=0.02)
    too_deep = CliRunner().invoke(app, ["evaluate", "--recs", str(tmp_path / "out"), "--truth",
                                        str(tmp_path / "truth.parquet"), "--k", "50"])
    assert too_deep.exit_code == 2 and "only the top 20" in too_deep.output


def test_cli_score_shows_the_top_titles(artifacts, tmp_path):
    from typer.testing import CliRunner

    from laser_batch.cli import app

    path = _write(_users(artifacts, 6), tmp_path / "users.parquet")
    result = CliRunner().invoke(app, ["score", str(path), "--model", str(artifacts / "laser_art"), "--out",
                                      str(tmp_path / "out"), "--show", "2", "--top-k", "5"])
    assert result.exit_code == 0, result.output
    assert "6 users scored, 0 rejected" in result.output
    titles = set(pl.read_parquet(artifacts / "laser_art" / "items.parquet")["title"])
    shown = [line.strip() for line in result.output.splitlines() if re.match(r"  \d+\. ", line)]
    assert len(shown) == 10 and all(line.split(". ", 1)[1].rsplit("  (", 1)[0] in titles for line in shown)


def test_the_scorers_batches_keep_length_order_and_both_limits():
    from laser_batch.sequences import length_batches

    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 300, size=500)
    lengths[7] = 5000  # longer than the budget: runs alone
    groups = length_batches(lengths, 64, max_tokens=2048)
    assert sorted(np.concatenate(groups).tolist()) == list(range(500))
    flat = np.concatenate(groups)
    assert (np.diff(lengths[flat]) >= 0).all()  # grouped by length, shortest first
    for group in groups:
        assert len(group) <= 64 and (len(group) * lengths[group].max() <= 2048 or len(group) == 1)
    assert [7] in [g.tolist() for g in groups]
    assert max(map(len, length_batches(np.full(100, 10), 64, max_tokens=10**9))) == 64  # the user limit applies


def test_seen_users_answers_as_a_set_in_logarithmically_many_runs():
    rng = np.random.default_rng(0)
    seen, reference = SeenUsers(), set()
    for _ in range(37):
        hashes = rng.integers(0, 5_000, size=100).astype(np.uint64)  # repeats within and across chunks
        queries = rng.integers(0, 5_000, size=300).astype(np.uint64)
        assert seen.contains(queries).tolist() == [q in reference for q in queries.tolist()]
        seen.add(hashes)
        reference.update(hashes.tolist())
        lengths = [len(run) for run in seen.runs]
        assert all(a >= 2 * b for a, b in itertools.pairwise(lengths)) and len(lengths) <= np.log2(sum(lengths)) + 1
        assert all(np.all(np.diff(run.astype(np.int64)) >= 0) for run in seen.runs)
    assert seen.contains(np.array([2**64 - 1], dtype=np.uint64)).tolist() == [2**64 - 1 in reference]
    assert not SeenUsers().contains(np.array([1, 2], dtype=np.uint64)).any()


def test_a_token_budget_bounds_every_graph_run_and_keeps_the_result(artifacts, tmp_path):
    path = _write(_users(artifacts), tmp_path / "users.parquet")
    recommender = Recommender(artifacts / "laser_art", top_k=20, batch_size=64, max_batch_tokens=200)
    shapes = []
    run = recommender.embedder.run
    recommender.embedder.run = lambda feeds: shapes.append(feeds["attention_mask"].shape) or run(feeds)
    recs, _, _ = recommender.recommend(pl.read_parquet(path))
    assert len(shapes) > 3 and all(b * t <= 200 or b == 1 for b, t in shapes)
    score_users(path, artifacts / "laser_art", tmp_path / "big", max_batch_tokens=10**6)
    big = _recs(tmp_path / "big")
    _assert_same_recs(recs.sort("user_id", "rank"), big)
    with pytest.raises(InputError, match="--max-batch-tokens 0: expected a positive integer"):
        Recommender(artifacts / "laser_art", max_batch_tokens=0)


@pytest.mark.parametrize("kind", ["laser_art", "sasrec_art"])
def test_io_binding_gives_the_same_embeddings_as_session_run(artifacts, kind):
    import onnxruntime as ort

    histories = [np.asarray(h) for h in _internal(artifacts / kind, _users(artifacts, 9))]
    plain = Embedder(artifacts / kind, device="cpu", io_binding=False)
    bound = Embedder(artifacts / kind, device="cpu", io_binding=True)
    assert not plain.io_binding and bound.io_binding and Embedder(artifacts / kind, device="cpu").io_binding is False
    feeds = bound.feeds(histories)
    if kind == "laser_art":
        assert isinstance(feeds["prefix"], ort.OrtValue)  # handed from the M-Former to the user encoder as is
    np.testing.assert_array_equal(bound.run(feeds), plain.embed(histories))


def test_sessions_do_not_spin(artifacts):
    embedder = Embedder(artifacts / "laser_art", device="cpu")
    for graph in (embedder.sasrec, embedder.mformer, embedder.user_encoder):
        assert graph.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_io_binding_job_gives_the_same_recommendations(artifacts, tmp_path):
    path = _write(_users(artifacts), tmp_path / "users.parquet")
    plain = score_users(path, artifacts / "laser_art", tmp_path / "a", device="cpu")
    bound = score_users(path, artifacts / "laser_art", tmp_path / "b", device="cpu", io_binding=True)
    assert (plain["io_binding"], bound["io_binding"]) == (False, True)
    assert _recs(tmp_path / "a").equals(_recs(tmp_path / "b"))


def _internal(art, users):
    item_ids = pl.read_parquet(art / "item_ids.parquet").sort("index")["item_id"].to_list()
    index = {item: i + 1 for i, item in enumerate(item_ids)}
    return [[index[i] for i in h] for h in users["history"].to_list()]


def _split(users, directory, parts):
    directory.mkdir()
    for k, rows in enumerate(np.array_split(np.arange(users.height), parts)):
        users[rows.tolist()].write_parquet(directory / f"users-{k}.parquet")
    return directory


def test_a_directory_of_parquet_files_is_one_input(artifacts, tmp_path):
    users = _users(artifacts)
    directory = _split(users, tmp_path / "in", 3)
    (directory / "_SUCCESS").write_text("")
    (directory / ".users-9.parquet.tmp").write_bytes(b"partial")
    pl.DataFrame({"x": [1]}).write_parquet(directory / "_hidden.parquet")  # skipped, as "_" and "." names are
    (directory / "sub").mkdir()
    (directory / "notes.txt").write_text("not read")
    score_users(directory, artifacts / "laser_art", tmp_path / "dir", chunk_size=25)
    score_users(_write(users, tmp_path / "one.parquet"), artifacts / "laser_art", tmp_path / "file")
    _assert_same_recs(_recs(tmp_path / "dir"), _recs(tmp_path / "file"))
    # A user in two files is a duplicate, as within one file.
    users[:2].write_parquet(directory / "users-3.parquet")
    summary = score_users(directory, artifacts / "laser_art", tmp_path / "dup")
    assert summary["users_rejected"]["duplicate user"] == 2 and summary["users_in"] == users.height + 2


def test_a_directory_of_interactions(artifacts, tmp_path):
    inter = pl.read_parquet(artifacts / "data" / "interactions.parquet").sample(fraction=1.0, shuffle=True, seed=2)
    directory = _split(inter, tmp_path / "inter", 4)  # a user's rows are spread over the files
    score_users(directory, artifacts / "laser_art", tmp_path / "a", interactions=True)
    score_users(_write(inter, tmp_path / "inter.parquet"), artifacts / "laser_art", tmp_path / "b",
                interactions=True)
    assert _recs(tmp_path / "a").equals(_recs(tmp_path / "b"))


@pytest.mark.parametrize("make, message", [
    (lambda d: None, "in: directory holds no .parquet files"),
    (lambda d: pl.DataFrame({"user_id": [1], "history": [["a"]]}).write_parquet(d / "b.parquet"),
     r"b.parquet: schema differs from a.parquet \(history: List\(String\) vs List\(Int64\)\)"),
    (lambda d: pl.DataFrame({"user_id": [1], "history": [[1]], "extra": [0]}).write_parquet(d / "b.parquet"),
     r"b.parquet: schema differs from a.parquet \(extra: Int64 vs missing\)"),
    (lambda d: (d / "b.parquet").write_bytes(b"nope"), "b.parquet: not a readable Parquet file"),
    (lambda d: pl.DataFrame({"user_id": [1], "items": [[1]]}).write_parquet(d / "b.parquet"),
     "b.parquet: missing column"),
])
def test_a_bad_file_in_an_input_directory_is_named(artifacts, tmp_path, make, message):
    directory = tmp_path / "in"
    directory.mkdir()
    if "no .parquet" not in message:
        pl.DataFrame({"user_id": [1], "history": [[1]]}).write_parquet(directory / "a.parquet")
    make(directory)
    with pytest.raises(InputError, match=message):
        score_users(directory, artifacts / "laser_art", tmp_path / "out")
    assert not list(tmp_path.glob("out/part-*"))


def test_resume_of_a_directory_input(artifacts, tmp_path):
    users = pl.concat([_users(artifacts).with_columns(pl.col("user_id") + 1000 * i) for i in range(3)])
    directory = _split(users, tmp_path / "in", 4)

    def stop_after_two(progress):
        if progress.chunk == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        score_users(directory, artifacts / "laser_art", tmp_path / "out", chunk_size=40, on_chunk=stop_after_two)
    assert len(list((tmp_path / "out").glob("part-*"))) == 2 and not (tmp_path / "out" / "_SUCCESS").exists()
    finished = []
    score_users(directory, artifacts / "laser_art", tmp_path / "out", chunk_size=40, resume=True,
                on_chunk=lambda progress: finished.append((progress.chunk, progress.done)))
    score_users(directory, artifacts / "laser_art", tmp_path / "straight", chunk_size=40)
    assert finished == [(2, 120), (3, 160), (4, 180)]  # only the open chunks ran again; done counts the resumed
    assert _recs(tmp_path / "out").equals(_recs(tmp_path / "straight"))
    assert _recs(tmp_path / "out")["user_id"].n_unique() == users.height
    # Another set of files is another input: resuming on it is refused.
    (tmp_path / "out" / "_SUCCESS").unlink()
    users[:1].with_columns(pl.col("user_id") + 99_000).write_parquet(directory / "users-4.parquet")
    with pytest.raises(InputError, match="the interrupted job had another input_files"):
        score_users(directory, artifacts / "laser_art", tmp_path / "out", chunk_size=40, resume=True)
