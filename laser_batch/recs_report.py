"""What a night's output looks like, in numbers: the body of `report.json` for a `score` output directory. No torch.

Read from OUT (either layout, `output.scan_recommendations`), its `summary.json` and the artefacts' catalogue
(`item_ids.parquet`, with each item's training interaction count):

- users scored, users rejected by reason, users short of K (fewer than `top_k` items);
- coverage: distinct recommended items / catalogue items;
- gini: the Gini index of how often each catalogue item is recommended (items never recommended count as 0):
  0 when every item is recommended equally often, near 1 when a few items take every slot;
- popularity: mean training interaction count of the recommended items (one per recommendation row) against the
  catalogue's mean, and their ratio (`lift` > 1: the output leans to popular items);
- the score distribution (quantiles and a histogram), throughput (from `summary.json`);
- with a previous output: per-user Jaccard@K of the two top-K sets (users in both), users new and gone, and the
  items recommended tonight but not before (new) and before but not tonight (dropped).

`metrics` flattens the scalars that `score --fail-on` and `report --fail-on` can check (`laser_batch.quality`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl

from laser_batch.artifacts import ITEM_IDS
from laser_batch.errors import InputError
from laser_batch.job import SUCCESS, SUMMARY
from laser_batch.output import scan_recommendations

BINS = 40
TOP_ITEMS = 10


def is_recs_dir(path: Path) -> bool:
    """A `score` output: part files and a summary (written just before `_SUCCESS`)."""
    return (path / SUMMARY).is_file() and any(path.glob("part-*.parquet"))


def recs_report(recs_dir: Path, *, previous: Path | None = None, artifacts: Path | None = None
                ) -> tuple[dict, dict[str, np.ndarray]]:
    """The report of OUT (and its comparison with `previous`, another output); see the module docstring.

    Args:
        recs_dir: a `score` output directory (with or without `_SUCCESS`: `--fail-on` withholds it).
        previous: an earlier finished output (`_SUCCESS` required) of the same layout, to compare with.
        artifacts: the artefacts the catalogue comes from; default: the `model` that `summary.json` names.

    Returns:
        (the numbers, as written to report.json; the series the plots draw, per user or item: `item_counts`,
        `scores`, `items_per_user`, `catalogue_popularity`, `recommended_popularity`, `jaccard`).

    Raises:
        InputError: not an output directory, a previous output that is unfinished or of another layout, or
            artefacts that cannot be found.
    """
    recs_dir = Path(recs_dir)
    if not is_recs_dir(recs_dir):
        raise InputError(f"{recs_dir}: not the output of laser-batch score (no {SUMMARY} and part-*.parquet)")
    summary = json.loads((recs_dir / SUMMARY).read_text())
    recs, layout = scan_recommendations(sorted(recs_dir.glob("part-*.parquet")))
    catalogue = _catalogue(Path(artifacts) if artifacts else Path(summary.get("model", "")), recs_dir)
    long = recs.collect()
    top_k = int(summary.get("top_k") or long["rank"].max() or 0)
    series = {"scores": long["score"].to_numpy().astype(np.float64),
              "items_per_user": long.group_by("user_id").len()["len"].to_numpy()}
    report = {
        "kind": "recommendations", "recs_dir": str(recs_dir), "layout": layout,
        "committed": (recs_dir / SUCCESS).exists(), "top_k": top_k,
        "users": {"in": summary.get("users_in"), "scored": summary.get("users_scored"),
                  "rejected": summary.get("users_rejected", {}),
                  "rejected_total": sum(summary.get("users_rejected", {}).values())},
        "recommendations": long.height,
        **_catalogue_numbers(long, catalogue, series),
        "score": _distribution(series["scores"]),
        "short_of_k": _short_of_k(series["items_per_user"], top_k),
        "throughput": {name: summary.get(name) for name in ("users_per_second", "tokens_per_second", "seconds",
                                                              "provider", "padding_efficiency")},
        "previous": _compare(long, layout, Path(previous), series) if previous is not None else None,
    }
    report["metrics"] = _metrics(report)
    return report, series


def _catalogue(artifacts: Path, recs_dir: Path) -> pl.DataFrame:
    """item_id (+ train_interactions when the export recorded it) of every catalogue item."""
    path = artifacts / ITEM_IDS
    if not path.is_file():
        raise InputError(f"{recs_dir}: the catalogue {path} is not there (the artefacts named in {SUMMARY}); pass "
                         "--model ARTIFACTS")
    columns = [c for c in ("item_id", "train_interactions") if c in pl.read_parquet_schema(path)]
    return pl.read_parquet(path, columns=columns)


def _catalogue_numbers(recs: pl.DataFrame, catalogue: pl.DataFrame, series: dict) -> dict:
    counts = catalogue.select("item_id").join(recs.group_by("item_id").len(), on="item_id", how="left")
    per_item = counts["len"].fill_null(0).to_numpy()
    series["item_counts"] = per_item
    popularity = None
    if "train_interactions" in catalogue.columns:
        shown = recs.select("item_id").join(catalogue, on="item_id", how="left")["train_interactions"]
        recommended = float(shown.mean()) if shown.len() else 0.0
        mean = float(catalogue["train_interactions"].mean())
        popularity = {"recommended_mean": recommended, "catalogue_mean": mean,
                      "lift": recommended / mean if mean else None}
        series["catalogue_popularity"] = catalogue["train_interactions"].to_numpy()
        series["recommended_popularity"] = shown.to_numpy()
    return {"catalogue_items": catalogue.height, "distinct_items": int((per_item > 0).sum()),
            "coverage": float((per_item > 0).mean()) if len(per_item) else 0.0, "gini": gini(per_item),
            "popularity": popularity}


def gini(counts: np.ndarray) -> float:
    """Gini index of non-negative counts (0: all equal; (n - 1) / n: one holds everything; 0 for all zeros)."""
    x = np.sort(np.asarray(counts, dtype=np.float64))
    n, total = len(x), x.sum()
    if n == 0 or total == 0:
        return 0.0
    return float(((2 * np.arange(1, n + 1) - n - 1) * x).sum() / (n * total))


def _distribution(values: np.ndarray) -> dict:
    if not len(values):
        return {"count": 0}
    quantiles = np.quantile(values, [0.05, 0.25, 0.5, 0.75, 0.95])
    counts, edges = np.histogram(values, bins=BINS)
    return {"count": len(values), "mean": float(values.mean()), "min": float(values.min()),
            **{f"p{q:02d}": float(v) for q, v in zip((5, 25, 50, 75, 95), quantiles, strict=True)},
            "max": float(values.max()), "histogram": {"edges": edges.tolist(), "counts": counts.tolist()}}


def _short_of_k(per_user: np.ndarray, top_k: int) -> dict:
    lengths, users = np.unique(per_user, return_counts=True)
    short = int((per_user < top_k).sum())
    return {"users": short, "share": short / len(per_user) if len(per_user) else 0.0,
            "items_per_user": {str(n): int(c) for n, c in zip(lengths, users, strict=True)}}


def _compare(recs: pl.DataFrame, layout: str, previous: Path, series: dict) -> dict:
    """Tonight's top-K sets against `previous`'s: per-user Jaccard (users in both), new and dropped items."""
    if not is_recs_dir(previous) or not (previous / SUCCESS).exists():
        raise InputError(f"--previous {previous}: not a finished laser-batch score output (no {SUCCESS}, "
                         f"{SUMMARY} or part-*.parquet)")
    before, before_layout = scan_recommendations(sorted(previous.glob("part-*.parquet")))
    if before_layout != layout:
        raise InputError(f"--previous {previous}: written with --layout {before_layout}, this output with --layout "
                         f"{layout}")
    before = before.select("user_id", "item_id").collect()
    if before.schema != recs.select("user_id", "item_id").schema:
        raise InputError(f"--previous {previous}: id types {dict(before.schema)} differ from this output's")
    now = recs.select("user_id", "item_id")
    sizes = now.group_by("user_id").len("now").join(before.group_by("user_id").len("before"), on="user_id",
                                                    how="full", coalesce=True)
    both = sizes.filter(pl.col("now").is_not_null() & pl.col("before").is_not_null())
    shared = now.join(before, on=["user_id", "item_id"], how="inner").group_by("user_id").len("shared")
    both = both.join(shared, on="user_id", how="left").with_columns(pl.col("shared").fill_null(0))
    jaccard = (both["shared"] / (both["now"] + both["before"] - both["shared"])).to_numpy().astype(np.float64)
    series["jaccard"] = jaccard
    items_now, items_before = now.group_by("item_id").len(), before.group_by("item_id").len()
    new = items_now.join(items_before, on="item_id", how="anti").sort("len", "item_id", descending=[True, False])
    dropped = items_before.join(items_now, on="item_id", how="anti").sort("len", "item_id", descending=[True, False])
    return {"dir": str(previous), "users_compared": both.height,
            "users_new": int(sizes["before"].is_null().sum()), "users_gone": int(sizes["now"].is_null().sum()),
            "jaccard": _distribution(jaccard),
            "items_new": new.height, "items_dropped": dropped.height,
            "items_kept": items_now.join(items_before, on="item_id", how="semi").height,
            "items_new_top": new.head(TOP_ITEMS).rows(), "items_dropped_top": dropped.head(TOP_ITEMS).rows()}


def _metrics(report: dict) -> dict:
    """The scalars `--fail-on` checks (None: not available for this output)."""
    users = report["users"]
    previous = report["previous"] or {}
    popularity = report["popularity"] or {}
    users_in = users["in"] or 0
    return {
        "users_scored": users["scored"], "rejected_share": users["rejected_total"] / users_in if users_in else None,
        "coverage": report["coverage"], "gini": report["gini"], "popularity_lift": popularity.get("lift"),
        "short_of_k_share": report["short_of_k"]["share"], "score_mean": report["score"].get("mean"),
        "jaccard_mean": previous.get("jaccard", {}).get("mean"),
        "jaccard_median": previous.get("jaccard", {}).get("p50"),
        "items_new": previous.get("items_new"), "items_dropped": previous.get("items_dropped"),
    }
