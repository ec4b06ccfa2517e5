"""The Ray engine on a local Ray cluster: the local engine's result, through a dead actor and a failed job."""

import importlib
import json
import os
import subprocess
import sys

import numpy as np
import polars as pl
import pytest
from test_score import _recs, _users, artifacts  # noqa: F401 (the tiny Laser artefacts, built once per module)
from typer.testing import CliRunner

from laser_batch.artifacts import MANIFEST, manifest_sha256
from laser_batch.cli import app
from laser_batch.errors import ArtifactError, EngineError, InputError
from laser_batch.score import score_users

# CI installs the dev extra, Ray included: there a missing Ray or a cluster that will not start fails the suite
# instead of skipping it, so a green CI always means these tests ran. Elsewhere both skip.
IN_CI = os.environ.get("CI") == "true"


@pytest.fixture(scope="module")
def ray_cluster():
    ray = importlib.import_module("ray") if IN_CI else pytest.importorskip("ray")
    for attempt in range(3):  # Ray's raylet gives its agents 15 s to start, which a loaded machine can miss
        try:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
            break
        except Exception as e:
            ray.shutdown()
            if attempt == 2:
                (pytest.fail if IN_CI else pytest.skip)(
                    f"Ray could not start a local cluster here (3 tries): {str(e).splitlines()[0]}")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def users_dir(artifacts, tmp_path_factory):  # noqa: F811
    """Three files: the example users, and bad rows among them; user 1 and user 6 appear again in a later file
    with other histories (the first occurrence is the one scored); user 9005's history holds the whole catalogue.
    Also the same rows as one file."""
    users = _users(artifacts)
    known = users["history"][0].to_list()
    catalogue = pl.read_parquet(artifacts / "laser_art" / "item_ids.parquet")["item_id"].to_list()
    bad = pl.DataFrame({
        "user_id": [users["user_id"][0], None, 9001, 9002, 9003, 9004, users["user_id"][5], 9005],
        "history": [known[:2], known, [], None, [777777, 888888], [777777, *known], known[:3], catalogue],
    }, schema={"user_id": pl.Int64, "history": pl.List(pl.Int64)})
    rows = pl.concat([users, bad])
    root = tmp_path_factory.mktemp("ray_input")
    (root / "dir").mkdir()
    for name, start, length in (("a", 0, 25), ("b", 25, 30), ("c", 55, None)):
        rows.slice(start, length).write_parquet(root / "dir" / f"{name}.parquet")
    rows.write_parquet(root / "all.parquet")
    return root


@pytest.fixture(scope="module")
def local_out(artifacts, users_dir, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("local") / "out"
    score_users(users_dir / "all.parquet", artifacts / "laser_art", out, top_k=5, chunk_size=16)
    return out


def score_ray_dir(artifacts, users_dir, out, *, model=None, **options):  # noqa: F811
    from laser_batch.ray_engine import score_ray

    return score_ray(str(users_dir / "dir"), model or str(artifacts / "laser_art"), str(out), top_k=5, chunk_size=16,
                     workers=1, **options)


def _assert_same_result(ray_out, local_out):
    mine, local = _recs(ray_out), _recs(local_out)
    assert mine.schema == local.schema
    assert mine.select("user_id", "rank", "item_id").equals(local.select("user_id", "rank", "item_id"))
    np.testing.assert_allclose(mine["score"].to_numpy(), local["score"].to_numpy(), atol=1e-5)
    rejects = [pl.read_parquet(out / "rejects.parquet").sort("user_id", "reason") for out in (ray_out, local_out)]
    assert rejects[0].equals(rejects[1])
    summaries = [json.loads((out / "summary.json").read_text()) for out in (ray_out, local_out)]
    for key in ("users_in", "users_scored", "users_rejected", "unknown_items_dropped", "manifest_sha256"):
        assert summaries[0][key] == summaries[1][key], key
    assert (ray_out / "_SUCCESS").exists() and not (ray_out / "_temporary").exists()
    assert mine.select("user_id", "rank").is_unique().all()


def test_ray_output_equals_the_local_engine_and_every_user_is_accounted_for(artifacts, users_dir, local_out,  # noqa: F811
                                                                            ray_cluster, tmp_path):
    summary = score_ray_dir(artifacts, users_dir, tmp_path / "out", model=(artifacts / "laser_art").as_uri(),
                            expect_manifest_sha256=manifest_sha256(artifacts / "laser_art"))
    _assert_same_result(tmp_path / "out", local_out)
    rows = pl.read_parquet(users_dir / "all.parquet")
    scored = _recs(tmp_path / "out")["user_id"].unique()
    rejects = pl.read_parquet(tmp_path / "out" / "rejects.parquet")
    assert scored.len() + rejects.height == rows.height == summary["users_in"]
    assert summary["users_rejected"] == {"null user_id": 1, "duplicate user": 2, "empty history": 2,
                                         "no known items": 1, "no eligible items": 1}
    assert rejects.filter(pl.col("user_id") == 9005)["reason"].to_list() == ["no eligible items"]
    assert summary["engine"] == "ray" and summary["chunks"] >= 3


@pytest.fixture
def fault(monkeypatch):
    """fault(**spec) makes the Ray engine's scorers die as `ray_engine._FAULT` says, for this test only."""
    from laser_batch import ray_engine

    return lambda **spec: monkeypatch.setattr(ray_engine, "_FAULT", spec)


def test_a_scorer_that_dies_once_is_retried_and_the_result_is_unchanged(artifacts, users_dir, local_out,  # noqa: F811
                                                                      ray_cluster, fault, tmp_path):
    marker = tmp_path / "died"
    fault(marker=str(marker), mode="exit")
    score_ray_dir(artifacts, users_dir, tmp_path / "out")
    assert marker.exists(), "the fault was not injected"
    _assert_same_result(tmp_path / "out", local_out)  # the dead attempt's part file was not committed


def test_a_scorer_that_always_dies_fails_the_job_instead_of_retrying_forever(artifacts, users_dir,  # noqa: F811
                                                                           ray_cluster, fault, tmp_path):
    out = tmp_path / "out"
    fault(marker=str(tmp_path / "dies"), mode="exit", always=True)
    with pytest.raises(EngineError, match="the Ray job failed, OUT is not finished"):
        score_ray_dir(artifacts, users_dir, out)
    assert not (out / "_SUCCESS").exists() and not list(out.glob("part-*.parquet"))


def test_a_failed_job_never_looks_finished_and_rerunning_completes_it(artifacts, users_dir, local_out,  # noqa: F811
                                                                      ray_cluster, fault, tmp_path):
    out = tmp_path / "out"
    fault(marker=str(tmp_path / "failed"), mode="raise")
    with pytest.raises(EngineError, match="the Ray job failed, OUT is not finished .*RuntimeError: injected fault"):
        score_ray_dir(artifacts, users_dir, out)
    assert not (out / "_SUCCESS").exists() and not list(out.glob("part-*.parquet"))
    with pytest.raises(InputError, match="not empty; pass --resume"):
        score_ray_dir(artifacts, users_dir, out)
    score_ray_dir(artifacts, users_dir, out, resume=True)
    _assert_same_result(out, local_out)


def test_interactions_are_grouped_as_the_local_engine_groups_them(artifacts, ray_cluster, tmp_path):  # noqa: F811
    from laser_batch.ray_engine import score_ray

    inter = pl.read_parquet(artifacts / "data" / "interactions.parquet").sample(fraction=1.0, shuffle=True, seed=3)
    inter = pl.concat([inter, pl.DataFrame({"user_id": [None], "item_id": [inter["item_id"][0]],
                                            "timestamp": [inter["timestamp"][0]]}, schema=inter.schema)])
    (tmp_path / "in").mkdir()
    for k in range(3):  # a user's rows are spread over the files
        inter.gather_every(3, offset=k).write_parquet(tmp_path / "in" / f"part-{k}.parquet")
    score_users(tmp_path / "in", artifacts / "laser_art", tmp_path / "local", top_k=5, chunk_size=16,
                interactions=True)
    summary = score_ray(str(tmp_path / "in"), str(artifacts / "laser_art"), str(tmp_path / "ray"), top_k=5,
                        chunk_size=16, workers=1, interactions=True)
    _assert_same_result(tmp_path / "ray", tmp_path / "local")
    assert summary["users_in"] == inter["user_id"].n_unique() and summary["users_rejected"]["null user_id"] == 1
    # A histories file is not interactions: the schema check names the missing column before any Ray work.
    _users(artifacts).write_parquet(tmp_path / "users.parquet")
    with pytest.raises(InputError, match="missing column"):
        score_ray(str(tmp_path / "users.parquet"), str(artifacts / "laser_art"), str(tmp_path / "bad"),
                  interactions=True)
    assert not (tmp_path / "bad").exists()


def test_cli_engine_ray_and_its_errors(artifacts, users_dir, local_out, ray_cluster, tmp_path):  # noqa: F811
    model = str(artifacts / "laser_art")
    base = ["score", str(users_dir / "dir"), "--model", model, "--top-k", "5", "--chunk-size", "16"]
    done = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "out"), "--engine", "ray", "--workers", "1"])
    assert done.exit_code == 0, done.output
    assert "61 users scored, 7 rejected" in done.output
    _assert_same_result(tmp_path / "out", local_out)
    misplaced = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "x"), "--workers", "2"])
    assert misplaced.exit_code == 2 and "need --engine ray" in misplaced.output
    pl.DataFrame({"user_id": [1], "items": [[1]]}).write_parquet(tmp_path / "bad.parquet")
    bad = CliRunner().invoke(app, ["score", str(tmp_path / "bad.parquet"), "--model", model, "--out",
                                   str(tmp_path / "y"), "--engine", "ray"])
    assert bad.exit_code == 2 and "missing column(s) history" in bad.output
    assert not (tmp_path / "y").exists()


def test_ray_refuses_a_file_as_out_and_unpinned_artefacts_before_any_work(artifacts, tmp_path):  # noqa: F811
    importlib.import_module("ray") if IN_CI else pytest.importorskip("ray")
    from laser_batch.ray_engine import score_ray

    (tmp_path / "recs").write_text("a file")
    done = CliRunner().invoke(app, ["score", str(tmp_path / "no-users"), "--model", str(tmp_path / "no-model"),
                                    "--out", str(tmp_path / "recs"), "--engine", "ray"])
    assert done.exit_code == 2 and done.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'recs'}: is a file, not a directory; --out names the directory to write the results to"]
    art = artifacts / "laser_art"
    other = "f" * 64
    with pytest.raises(ArtifactError, match=f"{art / MANIFEST}: sha256 {manifest_sha256(art)}, but "
                                            f"--expect-manifest-sha256 is {other}"):
        score_ray(str(tmp_path / "no-users"), str(art), str(tmp_path / "out"), expect_manifest_sha256=other)
    assert not (tmp_path / "out").exists()


def _run(code):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


def test_the_local_engine_never_imports_ray(artifacts, tmp_path):  # noqa: F811
    path = tmp_path / "users.parquet"
    _users(artifacts, 4).write_parquet(path)
    args = ["score", str(path), "--model", str(artifacts / "laser_art"), "--out", str(tmp_path / "out")]
    done = _run(f"import sys; from laser_batch.cli import app; app({args!r}, standalone_mode=False); "
                "assert 'ray' not in sys.modules, 'ray imported'; print('ok')")
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr


def test_engine_ray_without_ray_installed_is_one_clear_line(artifacts, tmp_path):  # noqa: F811
    path = tmp_path / "users.parquet"
    _users(artifacts, 4).write_parquet(path)
    args = ["score", str(path), "--model", str(artifacts / "laser_art"), "--out", str(tmp_path / "out"),
            "--engine", "ray"]
    done = _run(f"import sys; sys.modules['ray'] = None; from laser_batch.cli import app; app({args!r})")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("error: --engine ray needs Ray Data")
    assert "pip install 'laser-batch[ray]'" in done.stderr and not (tmp_path / "out").exists()


def test_ray_output_equals_the_local_engine_with_every_filter_on(artifacts, ray_cluster, tmp_path):  # noqa: F811
    from laser_batch.ray_engine import score_ray

    users = _users(artifacts)
    catalogue = pl.read_parquet(artifacts / "laser_art" / "item_ids.parquet").sort("index")["item_id"].to_list()
    lists = [None if u % 4 == 0 else [*catalogue[u % 30:u % 30 + u % 7], 990001] for u in range(users.height)]
    rows = pl.concat([users, users.head(2).with_columns(pl.col("history").list.head(2))])  # two duplicated users
    rows = rows.with_columns(pl.Series("candidates", lists + [[catalogue[0]], None], dtype=pl.List(pl.Int64)))
    (tmp_path / "in").mkdir()
    for k, (start, length) in enumerate(((0, 25), (25, 20), (45, None))):
        rows.slice(start, length).write_parquet(tmp_path / "in" / f"{k}.parquet")
    pl.DataFrame({"user_id": users["user_id"], "item_id": [catalogue[(3 * u) % 40] for u in range(users.height)]}
                 ).write_parquet(tmp_path / "exclude.parquet")
    (tmp_path / "deny.txt").write_text("\n".join(map(str, catalogue[35:])))
    pl.DataFrame({"item_id": catalogue[2:]}).write_parquet(tmp_path / "allow.parquet")
    options = {"top_k": 5, "chunk_size": 16, "allow_items": str(tmp_path / "allow.parquet"),
               "deny_items": str(tmp_path / "deny.txt"), "item_filter": "category <> 'Tea'",
               "exclude": str(tmp_path / "exclude.parquet"), "backfill": "popular"}
    local = score_users(tmp_path / "in", artifacts / "laser_art", tmp_path / "local", **options)
    ray = score_ray(str(tmp_path / "in"), str(artifacts / "laser_art"), str(tmp_path / "ray"), workers=1, **options)
    _assert_same_result(tmp_path / "ray", tmp_path / "local")
    assert _recs(tmp_path / "ray")["source"].equals(_recs(tmp_path / "local")["source"])
    for key in ("short_of_k", "unknown_candidates_dropped", "backfilled_users", "backfill_items", "filters"):
        assert ray[key] == local[key], key
    assert local["backfill_items"] > 0 and local["unknown_candidates_dropped"] > 0
    assert local["users_rejected"]["duplicate user"] == 2


def test_ray_output_equals_the_local_engine_with_every_output_option(artifacts, users_dir, ray_cluster,  # noqa: F811
                                                                     tmp_path):
    from laser_batch.ray_engine import score_ray

    options = {"top_k": 5, "chunk_size": 16, "explain": True, "with_item_columns": "title,category",
               "score": "prob", "layout": "list"}
    local = score_users(users_dir / "all.parquet", artifacts / "laser_art", tmp_path / "local", **options)
    ray = score_ray(str(users_dir / "dir"), str(artifacts / "laser_art"), str(tmp_path / "ray"), workers=1, **options)
    mine, theirs = (pl.concat([pl.read_parquet(p) for p in sorted((tmp_path / out).glob("part-*.parquet"))])
                    .sort("user_id") for out in ("ray", "local"))
    assert mine.columns == ["user_id", "item_ids", "scores", "because_item_id", "title", "category"]
    assert mine.drop("scores").equals(theirs.drop("scores"))
    np.testing.assert_allclose(mine["scores"].explode().to_numpy(), theirs["scores"].explode().to_numpy(),
                               rtol=1e-4, atol=1e-7)
    assert ray["users_scored"] == local["users_scored"] == mine.height


def test_ray_with_previous_equals_the_local_engine_with_previous(artifacts, users_dir, local_out,  # noqa: F811
                                                                 ray_cluster, tmp_path):
    """Night 2 (every third user with a new item, one user gone) on Ray with --previous = the local full run."""
    night2 = tmp_path / "night2"
    night2.mkdir()
    first = _users(artifacts)["history"][0].to_list()
    for name in ("a", "b", "c"):
        rows = pl.read_parquet(users_dir / "dir" / f"{name}.parquet")
        rows.with_columns(pl.when(pl.col("user_id") % 3 == 0).then(pl.col("history").list.concat(pl.lit(first[:1])))
                          .otherwise("history").alias("history")).filter(pl.col("user_id") != 4
                                                                         ).write_parquet(night2 / f"{name}.parquet")
    from laser_batch.ray_engine import score_ray

    summary = score_ray(str(night2), str(artifacts / "laser_art"), str(tmp_path / "ray"), top_k=5, chunk_size=16,
                        workers=1, previous=str(local_out))
    local = score_users(night2, artifacts / "laser_art", tmp_path / "local", top_k=5, chunk_size=16,
                        previous=str(local_out))
    _assert_same_result(tmp_path / "ray", tmp_path / "local")
    assert summary["incremental"]["reused"] == local["incremental"]["reused"] > 20
    assert summary["incremental"]["scored"] == local["incremental"]["scored"] > 10
    prints = [pl.concat([pl.read_parquet(p) for p in (out / "_fingerprints").glob("*.parquet")]).sort("user_id")
              for out in (tmp_path / "ray", tmp_path / "local")]
    assert prints[0].equals(prints[1])
