"""Business filters at score time: allow/deny lists, SQL over the items, per-user exclusions and candidates, backfill.

Every expectation is computed here independently: user vectors from the graphs, every item scored, the masks applied
by hand, the K best taken (and backfilled from the training counts counted here from the data).
"""

import json

import numpy as np
import polars as pl
import pytest
from test_score import _recs, _users, _write, artifacts  # noqa: F401 (the tiny Laser artefacts, built once)
from typer.testing import CliRunner

from laser_batch.artifacts import MANIFEST, Embedder
from laser_batch.cli import app
from laser_batch.errors import ArtifactError, InputError
from laser_batch.files import sha256_file
from laser_batch.score import score_users

K = 5


def _catalogue(art):
    return pl.read_parquet(art / "item_ids.parquet").sort("index")


def _train_counts(root):
    """Each item's interactions in the training split, counted from the data: all but each user's last two."""
    inter = pl.read_parquet(root / "data" / "interactions.parquet").with_row_index("_row")
    ordered = inter.sort("user_id", "timestamp", "_row")
    train = ordered.group_by("user_id", maintain_order=True).agg(pl.col("item_id").head(pl.len() - 2)).explode(
        "item_id").drop_nulls()
    counts = dict(train.group_by("item_id").len().iter_rows())
    return {item: counts.get(item, 0) for item in _catalogue(root / "laser_art")["item_id"]}


def _expected(art, users, *, banned=(), excluded=None, candidates=None, counts=None, k=K):
    """{user_id: [(item_id, source), ...]} by hand: scores of every item, masks, the k best, then backfill."""
    item_ids = _catalogue(art)["item_id"].to_list()
    matrix = np.load(art / "item_matrix.npy")
    embedder = Embedder(art)
    index = {item: i for i, item in enumerate(item_ids)}
    popular = sorted(item_ids, key=lambda i: (-counts[i], index[i])) if counts is not None else None
    out = {}
    for user_id, history in users.select("user_id", "history").iter_rows():
        scores = embedder.embed([np.array([index[i] + 1 for i in history])])[0] @ matrix.T
        blocked = set(history) | set(banned) | set((excluded or {}).get(user_id, ()))
        allowed = (candidates or {}).get(user_id)
        ok = [i for i in item_ids if i not in blocked and (allowed is None or i in allowed)]
        chosen = [(i, "model") for i in sorted(ok, key=lambda i: -scores[index[i]])[:k]]
        if popular is not None:
            taken = {i for i, _ in chosen} | set(history) | set((excluded or {}).get(user_id, ()))
            fill = [i for i in popular if i not in taken and i not in set(banned)]
            chosen += [(i, "backfill") for i in fill[:k - len(chosen)]]
        out[user_id] = chosen
    return out


def _got(out):
    recs = _recs(out)
    source = "source" in recs.columns
    return {u: [(i, s if source else "model") for i, s in zip(g["item_id"], g["source"] if source else g["item_id"],
                                                                strict=True)]
            for (u,), g in recs.group_by("user_id", maintain_order=True)}


def test_the_training_interaction_counts_are_exported(artifacts):  # noqa: F811
    for kind in ("laser_art", "sasrec_art"):
        catalogue = _catalogue(artifacts / kind)
        assert dict(zip(catalogue["item_id"], catalogue["train_interactions"], strict=True)) == _train_counts(
            artifacts)


def test_no_denied_excluded_or_filtered_item_appears_and_every_user_gets_exactly_k(artifacts, tmp_path):  # noqa: F811
    art = artifacts / "laser_art"
    users = _users(artifacts, 30)
    items = pl.read_parquet(art / "items.parquet")
    allowed = items["item_id"].to_list()[:34]
    (tmp_path / "allow.txt").write_text("\n".join(map(str, allowed)) + "\n\n")  # text, one id per line
    denied = items["item_id"].to_list()[::7]
    pl.DataFrame({"item_id": denied}).write_parquet(tmp_path / "deny.parquet")
    sql_out = items.filter(pl.col("category") == "Tea")["item_id"].to_list()
    rng = np.random.default_rng(0)
    pairs = pl.DataFrame({"user_id": np.repeat(users["user_id"].to_numpy(), 3),
                          "item_id": rng.choice(items["item_id"].to_numpy(), size=90)})
    pairs.write_parquet(tmp_path / "exclude.parquet")
    summary = score_users(_write(users, tmp_path / "users.parquet"), art, tmp_path / "out", top_k=K,
                          batch_size=4, allow_items=str(tmp_path / "allow.txt"),
                          deny_items=str(tmp_path / "deny.parquet"), item_filter="category <> 'Tea'",
                          exclude=str(tmp_path / "exclude.parquet"))
    got = _got(tmp_path / "out")
    excluded = {u: set(g["item_id"]) for (u,), g in pairs.group_by("user_id")}
    banned = set(items["item_id"]) - set(allowed) | set(denied) | set(sql_out)
    assert len(banned) < len(items) - K - 20  # enough left: every user can get K
    assert got == _expected(art, users, banned=banned, excluded=excluded)
    recs = _recs(tmp_path / "out")
    assert not set(recs["item_id"]) & banned
    assert not recs.join(pairs, on=["user_id", "item_id"], how="semi").height
    assert recs.group_by("user_id").len()["len"].to_list() == [K] * 30
    assert summary["short_of_k"] == 0 and summary["users_scored"] == 30
    assert summary["filters"]["eligible_items"] == len(items) - len(banned)
    assert summary["filters"]["exclude"]["pairs"] == pairs.unique().height


def test_candidates_rank_only_those_items_and_short_users_get_all_they_can(artifacts, tmp_path):  # noqa: F811
    art = artifacts / "laser_art"
    users = _users(artifacts, 12)
    catalogue = _catalogue(art)["item_id"].to_list()
    rng = np.random.default_rng(1)
    lists = []
    for u, history in enumerate(users["history"].to_list()):
        fresh = [i for i in catalogue if i not in history]
        size = [2, 8, 0][u % 3]  # short, enough, and an empty list (nothing to rank)
        lists.append(rng.choice(fresh, size=size, replace=False).tolist() + [990001] * (u % 2) + history[:1])
    lists[5] = None  # no list: the whole catalogue
    users = users.with_columns(pl.Series("candidates", lists, dtype=pl.List(pl.Int64)))
    summary = score_users(_write(users, tmp_path / "users.parquet"), art, tmp_path / "out", top_k=K)
    got = _got(tmp_path / "out")
    candidates = {u: set(c) if c is not None else None for u, c in zip(users["user_id"], lists, strict=True)}
    expected = _expected(art, users, candidates=candidates)
    assert got == {u: v for u, v in expected.items() if v}
    for u, recs in got.items():
        assert candidates[u] is None or {i for i, _ in recs} <= candidates[u]
    empty = [u for u, c in candidates.items() if c is not None and not (c - {990001} - set(
        users.filter(pl.col("user_id") == u)["history"][0]))]
    rejects = pl.read_parquet(tmp_path / "out" / "rejects.parquet")
    assert sorted(rejects["user_id"]) == sorted(empty) and set(rejects["reason"]) == {"no eligible items"}
    assert summary["unknown_candidates_dropped"] == sum(u % 2 for u in range(12) if u != 5)
    assert summary["short_of_k"] == sum(1 for v in got.values() if len(v) < K) == 4


def test_backfill_popular_fills_short_users_from_popular_eligible_items_with_a_source_column(artifacts,  # noqa: F811
                                                                                           tmp_path):
    art = artifacts / "laser_art"
    users = _users(artifacts, 12)
    catalogue = _catalogue(art)["item_id"].to_list()
    lists = [catalogue[u:u + [1, 9, 0][u % 3]] for u in range(12)]
    users = users.with_columns(pl.Series("candidates", lists, dtype=pl.List(pl.Int64)))
    pairs = pl.DataFrame({"user_id": users["user_id"], "item_id": [catalogue[(u * 5) % 40] for u in range(12)]})
    pairs.write_parquet(tmp_path / "exclude.parquet")
    denied = catalogue[30:]
    (tmp_path / "deny.txt").write_text("\n".join(map(str, denied)))
    options = {"top_k": K, "exclude": str(tmp_path / "exclude.parquet"), "deny_items": str(tmp_path / "deny.txt")}
    path = _write(users, tmp_path / "users.parquet")
    summary = score_users(path, art, tmp_path / "filled", backfill="popular", **options)
    got = _got(tmp_path / "filled")
    counts = _train_counts(artifacts)
    excluded = {u: {i} for u, i in pairs.iter_rows()}
    candidates = {u: set(c) for u, c in zip(users["user_id"], lists, strict=True)}
    assert got == _expected(art, users, banned=denied, excluded=excluded, candidates=candidates, counts=counts)
    assert all(len(v) == K for v in got.values()) and summary["short_of_k"] == 0
    recs = _recs(tmp_path / "filled")
    assert recs.columns == ["user_id", "rank", "item_id", "score", "source"]
    assert not set(recs["item_id"]) & set(denied) and not recs.join(pairs, on=["user_id", "item_id"],
                                                                    how="semi").height
    backfill = recs.filter(pl.col("source") == "backfill")
    assert summary["backfill_items"] == backfill.height > 0
    assert summary["backfilled_users"] == backfill["user_id"].n_unique()
    # model rows first; a backfilled item carries the model's own score for it
    assert recs.group_by("user_id").agg((pl.col("source") == "backfill").arg_max().alias("first"),
                                        (pl.col("source") == "model").sum().alias("model")).filter(
        pl.col("model") < K).select((pl.col("first") == pl.col("model")).all()).item()
    # Without backfill the same users stay short, and are counted.
    short = score_users(path, art, tmp_path / "short", **options)
    assert short["short_of_k"] == sum(1 for v in _got(tmp_path / "short").values() if len(v) < K) > 0
    assert "source" not in _recs(tmp_path / "short").columns and short["backfill_items"] == 0


def test_backfill_needs_the_exported_counts(artifacts, tmp_path):  # noqa: F811
    import shutil

    art = tmp_path / "old"
    shutil.copytree(artifacts / "laser_art", art)
    _catalogue(art).drop("train_interactions").write_parquet(art / "item_ids.parquet")  # as exported before
    manifest = json.loads((art / MANIFEST).read_text())
    manifest["files"]["item_ids.parquet"] = {"bytes": (art / "item_ids.parquet").stat().st_size,
                                             "sha256": sha256_file(art / "item_ids.parquet")}
    (art / MANIFEST).write_text(json.dumps(manifest))
    users = _write(_users(artifacts, 3), tmp_path / "users.parquet")
    with pytest.raises(ArtifactError, match="no 'train_interactions' column .*export again to use --backfill popular"):
        score_users(users, art, tmp_path / "out", backfill="popular")
    score_users(users, art, tmp_path / "plain")  # the rest works as before
    assert _recs(tmp_path / "plain").height == 3 * 20


def _bad_inputs(tmp):
    """(score options, the one-line error) for each bad filter input."""
    pl.DataFrame({"id": [1]}).write_parquet(tmp / "no_item_id.parquet")
    pl.DataFrame({"item_id": ["a"]}).write_parquet(tmp / "string_ids.parquet")
    (tmp / "words.txt").write_text("1\n2\nthree\n")
    (tmp / "unknown.txt").write_text("990001\n990002\n")
    (tmp / "empty.txt").write_text("\n")
    pl.DataFrame({"user_id": [1]}).write_parquet(tmp / "pairs_no_item.parquet")
    pl.DataFrame({"user_id": [1], "item_id": ["x"]}).write_parquet(tmp / "pairs_strings.parquet")
    pl.DataFrame({"user_id": ["u1"], "item_id": [1]}).write_parquet(tmp / "pairs_string_users.parquet")
    return [
        (["--item-filter", "title LIKE"], "--item-filter 'title LIKE': unable to parse 'title LIKE' as Expr"),
        (["--item-filter", "colour = 'red'"], "--item-filter \"colour = 'red'\": unable to find column \"colour\""),
        (["--item-filter", "title"], "--item-filter 'title': filter predicate must be of type `Boolean`"),
        (["--item-filter", "1; DROP TABLE items"], "found unexpected token ';'"),
        (["--allow-items", str(tmp / "missing.txt")], "missing.txt: file not found"),
        (["--allow-items", str(tmp / "no_item_id.parquet")], "no_item_id.parquet: missing column(s) item_id"),
        (["--deny-items", str(tmp / "string_ids.parquet")], "column 'item_id' has type String, but the model's item"),
        (["--deny-items", str(tmp / "words.txt")], "words.txt: 'three' is not an item id"),
        (["--allow-items", str(tmp / "unknown.txt")], "unknown.txt: none of its 2 item ids is in the catalogue"),
        (["--allow-items", str(tmp / "empty.txt")], "empty.txt: no item ids"),
        (["--item-filter", "item_id < 0"], "no catalogue item passes --allow-items, --deny-items and --item-filter"),
        (["--exclude", str(tmp / "pairs_no_item.parquet")], "pairs_no_item.parquet: missing column(s) item_id"),
        (["--exclude", str(tmp / "pairs_strings.parquet")], "column 'item_id' holds String ids, but the model's"),
        (["--exclude", str(tmp / "pairs_string_users.parquet")], "user_id is String, but the input's user_id is Int64"),
        (["--backfill", "random"], "Invalid value for '--backfill'"),
    ]


def test_each_bad_filter_input_is_one_line_exit_2_before_any_model_work(artifacts, tmp_path, monkeypatch):  # noqa: F811
    import laser_batch.artifacts

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the options were checked")

    monkeypatch.setattr(laser_batch.artifacts, "session", no_model)
    users = _write(_users(artifacts, 3), tmp_path / "users.parquet")
    base = ["score", str(users), "--model", str(artifacts / "laser_art"), "--out", str(tmp_path / "out")]
    for options, message in _bad_inputs(tmp_path):
        done = CliRunner().invoke(app, [*base, *options])
        lines = done.stderr.strip().splitlines()
        assert done.exit_code == 2, (options, done.output)
        assert message in done.stderr, (options, done.stderr)
        if not options[0] == "--backfill":  # Typer's own usage error is a box of several lines
            assert len(lines) == 1 and lines[0].startswith("error: "), lines
        assert not (tmp_path / "out").exists()


def test_a_bad_candidates_column_is_refused_before_any_model_work(artifacts, tmp_path, monkeypatch):  # noqa: F811
    import laser_batch.artifacts

    monkeypatch.setattr(laser_batch.artifacts, "session", lambda *a, **k: pytest.fail("a model was loaded"))
    users = _users(artifacts, 3)
    for candidates, message in ((["1 2"] * 3, "column 'candidates' has type String, expected a list of item ids"),
                                ([["a"]] * 3, "column 'candidates' holds String item ids, but the model's item ids "
                                              "are Int64")):
        path = _write(users.with_columns(candidates=pl.Series(candidates)), tmp_path / "users.parquet")
        with pytest.raises(InputError, match=message):
            score_users(path, artifacts / "laser_art", tmp_path / "out")
        assert not (tmp_path / "out").exists()


def test_a_resumed_job_must_have_the_same_filters(artifacts, tmp_path):  # noqa: F811
    users = _write(_users(artifacts, 6), tmp_path / "users.parquet")
    (tmp_path / "deny.txt").write_text("1\n")
    score_users(users, artifacts / "laser_art", tmp_path / "out", deny_items=str(tmp_path / "deny.txt"))
    with pytest.raises(InputError, match="the interrupted job had another filters"):
        score_users(users, artifacts / "laser_art", tmp_path / "out", resume=True, item_filter="item_id > 3")
    job = json.loads((tmp_path / "out" / "_job.json").read_text())
    assert job["filters"]["deny_items"][0] == str((tmp_path / "deny.txt").resolve())
