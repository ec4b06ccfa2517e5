"""Offline metrics from the job's output: `laser-batch evaluate --recs OUT_DIR --truth TRUTH.parquet`. No torch.

Each truth row (user_id, item_id) is one case: HR@K = share of cases whose item is in the user's top K,
NDCG@K = mean 1 / log2(rank + 1) over hits, MRR@K = mean 1 / rank over hits. Users of the truth file without
recommendations (rejected, or missing) count as misses and are reported.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from laser_batch.contracts import check_schema, read_parquet
from laser_batch.errors import InputError
from laser_batch.output import scan_recommendations


def evaluate_recommendations(recs_dir: Path, truth_path: Path, ks: list[int]) -> dict:
    recs_dir = Path(recs_dir)
    parts = sorted(recs_dir.glob("part-*.parquet")) if recs_dir.is_dir() else []
    if not parts:
        raise InputError(f"{recs_dir}: no part-*.parquet files (not the output of laser-batch score)")
    if not (recs_dir / "_SUCCESS").exists():
        raise InputError(f"{recs_dir}: no _SUCCESS file; the scoring job did not finish (use score --resume)")
    recs = scan_recommendations(parts)[0].select("user_id", "rank", "item_id").collect()
    truth = read_parquet(truth_path)
    check_schema(truth, truth_path, {"user_id": "id", "item_id": "id"})
    top = int(recs["rank"].max())
    if max(ks) > top:
        raise InputError(f"--k {max(ks)}: the recommendations hold only the top {top} per user")
    if truth.schema["item_id"] != recs.schema["item_id"] or truth.schema["user_id"] != recs.schema["user_id"]:
        raise InputError(f"{truth_path}: id types (user_id {truth.schema['user_id']}, item_id "
                         f"{truth.schema['item_id']}) differ from the recommendations' (user_id "
                         f"{recs.schema['user_id']}, item_id {recs.schema['item_id']})")
    cases = truth.select("user_id", "item_id").join(recs, on=["user_id", "item_id"], how="left")
    ranks = cases["rank"].fill_null(0).to_numpy().astype(np.float64)  # 0 = not recommended
    hit = ranks > 0
    covered = truth.join(recs.select("user_id").unique(), on="user_id", how="semi").height
    metrics = {}
    for k in sorted(set(ks)):
        within = hit & (ranks <= k)
        metrics[f"HR@{k}"] = float(within.mean())
        metrics[f"NDCG@{k}"] = float(np.where(within, 1.0 / np.log2(ranks + 1, where=within, out=np.ones_like(ranks)),
                                              0.0).mean())
        metrics[f"MRR@{k}"] = float(np.where(within, 1.0 / np.maximum(ranks, 1), 0.0).mean())
    return {"cases": truth.height, "cases_without_recommendations": truth.height - covered, "metrics": metrics}
