"""Incremental nights (`--previous`), progress and `--dry-run`: the output of a full run, with fewer users encoded."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import polars as pl
import pytest
from test_score import _assert_same_recs, _recs, _users, artifacts  # noqa: F401 (the tiny artefacts, built once)
from typer.testing import CliRunner

from laser_batch.cli import app
from laser_batch.errors import InputError
from laser_batch.incremental import FINGERPRINTS
from laser_batch.score import score_users


def _nights(root, tmp_path, copies=1):
    """Night 1: the example users (x copies); night 2: every third user has a new item, user 2 left, user 99999 new,
    user 7 comes twice (the first row is the one scored)."""
    users = pl.concat([_users(root).with_columns(pl.col("user_id") + 1000 * i) for i in range(copies)])
    first = users["history"][0].to_list()
    changed = users.with_columns(pl.when(pl.col("user_id") % 3 == 0).then(pl.col("history").list.concat(
        pl.lit(first[:1]))).otherwise("history").alias("history")).filter(pl.col("user_id") != 2)
    extra = pl.DataFrame({"user_id": [99999, 7], "history": [first, first]}, schema=users.schema)
    users.write_parquet(tmp_path / "night1.parquet")
    pl.concat([changed, extra]).write_parquet(tmp_path / "night2.parquet")
    return tmp_path / "night1.parquet", tmp_path / "night2.parquet"


def _same_output(a, b):
    _assert_same_recs(_recs(a), _recs(b))
    rejects = [pl.read_parquet(out / "rejects.parquet").sort("user_id", "reason") for out in (a, b)]
    assert rejects[0].equals(rejects[1])
    summaries = [json.loads((out / "summary.json").read_text()) for out in (a, b)]
    for key in ("users_in", "users_scored", "users_rejected", "unknown_items_dropped", "short_of_k"):
        assert summaries[0][key] == summaries[1][key], key


@pytest.mark.parametrize("options", [{}, {"layout": "list", "explain": True}])
def test_an_incremental_night_is_the_full_run_with_only_changed_users_encoded(artifacts, tmp_path, options):  # noqa: F811
    night1, night2 = _nights(artifacts, tmp_path)
    model = artifacts / "laser_art"
    score_users(night1, model, tmp_path / "recs1", top_k=5, chunk_size=25, **options)
    summary = score_users(night2, model, tmp_path / "recs2", top_k=5, chunk_size=25, previous=str(tmp_path / "recs1"),
                          **options)
    score_users(night2, model, tmp_path / "full2", top_k=5, chunk_size=25, **options)
    if options.get("layout") == "list":
        for out in ("recs2", "full2"):  # one row per user: compare as (user, rank) rows
            recs = pl.concat([pl.read_parquet(p) for p in sorted((tmp_path / out).glob("part-*.parquet"))])
            assert recs.columns == ["user_id", "item_ids", "scores", "because_item_id"]
        recs2, full2 = (pl.concat([pl.read_parquet(p) for p in sorted((tmp_path / o).glob("part-*.parquet"))])
                        for o in ("recs2", "full2"))
        assert recs2.select("user_id", "item_ids", "because_item_id").equals(
            full2.select("user_id", "item_ids", "because_item_id"))
    else:
        _same_output(tmp_path / "recs2", tmp_path / "full2")
    users1 = pl.read_parquet(night1)["user_id"]
    changed = (users1 % 3 == 0).sum()
    assert summary["incremental"]["reused"] == users1.len() - changed - 1  # user 2 is gone
    assert summary["incremental"]["scored"] == changed + 1  # and user 99999 is new
    assert summary["incremental"]["rescore_reason"] is None
    assert 2 not in _recs_ids(tmp_path / "recs2") and 99999 in _recs_ids(tmp_path / "recs2")
    prints = pl.concat([pl.read_parquet(p) for p in (tmp_path / "recs2" / FINGERPRINTS).glob("*.parquet")])
    assert sorted(prints["user_id"].to_list()) == sorted(_recs_ids(tmp_path / "recs2"))
    full = pl.concat([pl.read_parquet(p) for p in (tmp_path / "full2" / FINGERPRINTS).glob("*.parquet")])
    assert prints.sort("user_id").equals(full.sort("user_id"))  # the next night sees the same fingerprints


def _recs_ids(out):
    return pl.concat([pl.read_parquet(p, columns=["user_id"]) for p in out.glob("part-*.parquet")])[
        "user_id"].unique().to_list()


def test_a_changed_model_or_option_rescores_everyone_and_says_why(artifacts, tmp_path):  # noqa: F811
    night1, _ = _nights(artifacts, tmp_path)
    deny = tmp_path / "deny.txt"
    deny.write_text("999999\n")
    score_users(night1, artifacts / "laser_art", tmp_path / "recs1", top_k=5, deny_items=str(deny))
    cases = {"top_k": ({"top_k": 6, "deny_items": str(deny)}, "options changed: top_k"),
             "no deny list": ({"top_k": 5}, "options changed: filters.deny_items"),
             "model": ({"top_k": 5, "deny_items": str(deny), "model": "sasrec_art"}, "the model changed")}
    for name, (options, reason) in cases.items():
        model = artifacts / options.pop("model", "laser_art")
        summary = score_users(night1, model, tmp_path / name, previous=str(tmp_path / "recs1"), **options)
        assert summary["incremental"]["rescore_reason"].startswith(reason), name
        assert summary["incremental"]["reused"] == 0 and summary["incremental"]["scored"] == summary["users_scored"]
    same = score_users(night1, artifacts / "laser_art", tmp_path / "same", top_k=5, deny_items=str(deny),
                       previous=str(tmp_path / "recs1"))
    assert same["incremental"]["scored"] == 0
    deny.write_text("999998\n")  # the same path with other contents is another option
    changed = score_users(night1, artifacts / "laser_art", tmp_path / "content", top_k=5, deny_items=str(deny),
                          previous=str(tmp_path / "recs1"))
    assert changed["incremental"]["rescore_reason"] == "options changed: filters.deny_items"


def test_bad_previous_directories_are_one_line_exit_2_before_any_work(artifacts, tmp_path):  # noqa: F811
    night1, _ = _nights(artifacts, tmp_path)
    score_users(night1, artifacts / "laser_art", tmp_path / "recs1", top_k=5)
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "part-00000.parquet").write_bytes(b"")
    base = ["score", str(night1), "--model", str(artifacts / "laser_art"), "--top-k", "5"]
    cases = [(["--out", str(tmp_path / "o1"), "--previous", str(unfinished)], "no _SUCCESS"),
             (["--out", str(tmp_path / "o2"), "--previous", str(tmp_path / "recs1"), "--layout", "list"],
              "written with --layout long, this job writes --layout list"),
             (["--out", str(tmp_path / "o3"), "--previous", str(tmp_path / "nowhere")], "no such directory"),
             (["--out", str(tmp_path / "recs1"), "--previous", str(tmp_path / "recs1"), "--overwrite"], "is --out")]
    for args, message in cases:
        result = CliRunner().invoke(app, [*base, *args])
        assert result.exit_code == 2, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0] and "--previous" in lines[0]
    assert not any((tmp_path / o).exists() for o in ("o1", "o2", "o3"))
    assert (tmp_path / "recs1" / "_SUCCESS").exists()


def test_kill_9_and_resume_of_an_incremental_night_gives_the_full_run(artifacts, tmp_path):  # noqa: F811
    night1, night2 = _nights(artifacts, tmp_path, copies=10)  # 600 users; a third of them changed
    command = [sys.executable, "-m", "laser_batch.cli", "score", "--model", str(artifacts / "laser_art"),
               "--chunk-size", "20", "--batch-size", "8", "--threads", "1", "--top-k", "5"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([*command, str(night1), "--out", str(tmp_path / "recs1")], env=env, check=True,
                   capture_output=True)
    tonight = [*command, str(night2), "--previous", str(tmp_path / "recs1"), "--out", str(tmp_path / "killed")]
    job = subprocess.Popen(tonight, env=env, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (tmp_path / "killed" / "part-00003.parquet").exists() and time.time() < deadline:
        time.sleep(0.01)
    job.send_signal(signal.SIGKILL)
    job.wait()
    assert not (tmp_path / "killed" / "_SUCCESS").exists(), "the job ended before it could be killed"
    subprocess.run([*tonight, "--resume"], env=env, check=True, capture_output=True)
    subprocess.run([*command, str(night2), "--out", str(tmp_path / "full")], env=env, check=True, capture_output=True)
    _same_output(tmp_path / "killed", tmp_path / "full")
    summary = json.loads((tmp_path / "killed" / "summary.json").read_text())
    assert summary["incremental"]["reused"] + summary["incremental"]["scored"] == summary["users_scored"]
    assert summary["incremental"]["reused"] > 300
    # Resuming with another --previous is another job.
    (tmp_path / "killed" / "_SUCCESS").unlink()
    with pytest.raises(InputError, match="another previous"):
        score_users(night2, artifacts / "laser_art", tmp_path / "killed", chunk_size=20, top_k=5, resume=True,
                    previous=str(tmp_path / "full"))


def test_progress_is_log_lines_without_a_terminal_and_silent_with_quiet(artifacts, tmp_path):  # noqa: F811
    night1, _ = _nights(artifacts, tmp_path)
    base = ["score", str(night1), "--model", str(artifacts / "laser_art"), "--chunk-size", "25", "--top-k", "3"]
    started = time.perf_counter()
    loud = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "a")])
    wall = time.perf_counter() - started
    assert loud.exit_code == 0, loud.output
    lines = [line for line in loud.stderr.splitlines() if line.startswith("chunk ")]
    assert [line.split(":")[0] for line in lines] == ["chunk 1/3", "chunk 2/3", "chunk 3/3"]
    assert "25/60 users" in lines[0] and "60/60 users" in lines[-1] and "users/s, ETA" in lines[0]
    # The rate is users done over the time since the job started: at least what the whole command averaged, and
    # not timed from the first chunk's own callback (which once gave 1.5e8 users/s on a one-chunk job).
    rates = [float(re.search(r"([0-9.]+) users/s", line).group(1)) for line in lines]
    assert rates[-1] >= 60 / wall and all(r < 1e5 for r in rates)
    quiet = CliRunner().invoke(app, ["--quiet", *base, "--out", str(tmp_path / "b")])
    assert quiet.exit_code == 0 and quiet.stderr == ""


def test_dry_run_checks_times_a_probe_and_writes_nothing(artifacts, tmp_path):  # noqa: F811
    night1, night2 = _nights(artifacts, tmp_path)
    score_users(night1, artifacts / "laser_art", tmp_path / "recs1", top_k=5)
    base = ["score", "--model", str(artifacts / "laser_art"), "--top-k", "5", "--chunk-size", "25", "--dry-run"]
    result = CliRunner().invoke(app, [*base, str(night2), "--out", str(tmp_path / "new"), "--previous",
                                      str(tmp_path / "recs1")])
    assert result.exit_code == 0, result.output
    plan = dict(line.split(None, 1) for line in result.stdout.strip().splitlines())
    users = pl.read_parquet(night2).height
    assert plan["users"] == str(users) and plan["chunks"] == "3"
    assert plan["probe_users"] == str(users)  # all 61: fewer than --batch-size
    changed = (pl.read_parquet(night1)["user_id"] % 3 == 0).sum()
    assert plan["reusable_users"] == str(60 - changed - 1)  # user 7's second row is a duplicate, not reusable
    assert float(plan["estimated_seconds"]) > 0 and int(plan["estimated_output_bytes"]) > 0
    assert not (tmp_path / "new").exists()
    before = sorted((p.name, p.stat().st_mtime_ns) for p in (tmp_path / "recs1").rglob("*"))
    again = CliRunner().invoke(app, [*base, str(night2), "--out", str(tmp_path / "recs1"), "--overwrite"])
    assert again.exit_code == 0, again.output
    assert sorted((p.name, p.stat().st_mtime_ns) for p in (tmp_path / "recs1").rglob("*")) == before
    bad = CliRunner().invoke(app, [*base, str(night2), "--out", str(tmp_path / "x"), "--deny-items", "nope.txt"])
    assert bad.exit_code == 2 and "--deny-items nope.txt: file not found" in bad.stderr
    assert not (tmp_path / "x").exists()
