"""New items without retraining, measured (issue 23): hold items out before training, add them with `items add`.

    python benchmarks/cold_items.py --dataset ml100k|Scientific [--llm GGUF] [--warm-users 1000]

Protocol, per data set (seeded, resumable: every stage keeps its output under --work and is skipped when present;
the result is stored in benchmarks/results/cold_items.json under the data set's name):

1. 10% of the catalogue's items (uniform, seed 0) are held out with all their interactions; SASRec and Laser (the
   fast combination: 8 LLM blocks, CF tokens after the text, gated fusion, `CONFIGS`) are trained on the rest.
2. The run is exported, and the held-out items are added from their text with `laser_batch.items_add.add_items`,
   once per fallback ID vector (`mean`, `zeros`, `neighbours`), torch-free through the exported graphs.
3. Cold users: every user whose last interaction in the full data is a held-out item. Input: the whole history
   before it (held-out items in it are now catalogue items), K = 10, history excluded, the full catalogue
   (warm + new). Measured: HR@10 and NDCG@10; against popularity (training counts: a new item has none, so it ranks
   last) and against a random order of the new items not in the history put above every warm item (an oracle that
   knows the target is new: HR@10 = min(10, M) / M over the M candidates, NDCG from the same uniform ranks).
   The same Laser scores restricted to the new items (`--allow-items`) compare like with like against that random
   order: what the text adds once the target is known to be new.
4. Warm users (up to --warm-users, seeded sample): the warm data's own test split (history and target warm items),
   scored by the artefacts before and after the addition: the warm metrics must stay as they were; the share of
   their top 10 taken by new items is recorded.

Intervals: paired bootstrap over users (1000 resamples, seed 0).
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
from ranking import BOOTSTRAP, versus_sasrec
from sasrec_s3rec import OVERRIDES, machine

from laser_batch.config import load_config
from laser_batch.contracts import load_data_dir, write_data_dir
from laser_batch.convert import convert
from laser_batch.exporters.export import export_run
from laser_batch.items_add import add_items
from laser_batch.metrics import ndcg_per_user, paired_bootstrap
from laser_batch.score import score_users
from laser_batch.sequences import build_sequences
from laser_batch.train import train_sasrec
from laser_batch.train_laser import train_laser

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared"
HOLDOUT_SHARE = 0.10
SEED = 0
K = 10
FALLBACKS = ("mean", "zeros", "neighbours")
COMBO = {"llm": {"num_layers": 8}, "laser": {"cf_position": "after_text", "fusion": "gated"}}
CONFIGS = {  # data set -> (Laser config file, SASRec config changes); each gets COMBO on top
    "ml100k": (HERE / "configs" / "laser_ml100k_soft_lowlr.toml", {}),
    # Scientific: the best combination there (issue 22), the LLM reads text only (prefix "free").
    "Scientific": (HERE / "configs" / "laser_scientific_text.toml", OVERRIDES["Scientific"]),
    # A check of this script in about a minute: the embedded synthetic example and tiny LLM (examples/laser.toml,
    # all of the tiny LLM's blocks), not a result.
    "example": (HERE.parent / "examples" / "laser.toml", {}),
}


def prepare_full(dataset: str, work: Path) -> Path:
    """The converted full data directory of `dataset`."""
    data = work / "data_full"
    if (data / "card.json").exists():
        return data
    if dataset == "example":
        from laser_batch.examples.synthetic import write_example

        write_example(data, users=1000, items=400, seed=0)
    elif dataset == "ml100k":
        raw = work / "raw"
        subprocess.run(["bash", str(SHARED / "tools" / "fetch-ml100k.sh"), str(raw)], check=True, capture_output=True)
        convert("recbole", [raw / "ml-100k.inter", raw / "ml-100k.item"], data)
    else:
        convert("unisrec", [SHARED / "data" / "amazon" / "Scientific"], data)
    return data


def hold_out(full: Path, work: Path) -> tuple[Path, Path, dict]:
    """(warm data directory, new items Parquet, split facts): 10% of the items and all their interactions removed."""
    warm, new_items, facts_path = work / "data_warm", work / "new_items.parquet", work / "holdout.json"
    if facts_path.exists():
        return warm, new_items, json.loads(facts_path.read_text())
    dataset = load_data_dir(full)
    items = dataset.items.sort("item_id")
    interacted = dataset.interactions["item_id"].unique().sort()
    rng = np.random.default_rng(SEED)
    held = interacted.gather(np.sort(rng.choice(interacted.len(), round(HOLDOUT_SHARE * interacted.len()),
                                                replace=False)))
    is_held = pl.col("item_id").is_in(held.implode())
    warm_interactions = dataset.interactions.filter(~is_held)
    card = write_data_dir(warm_interactions, items.filter(~is_held), warm, source=str(full),
                          input_format="cold-items holdout")
    items.filter(is_held).write_parquet(new_items)
    facts = {"items": interacted.len(), "held_out_items": held.len(),
             "held_out_interactions": dataset.interactions.height - warm_interactions.height,
             "interactions": dataset.interactions.height, "warm_users": card["users"], "seed": SEED}
    facts_path.write_text(json.dumps(facts, indent=2) + "\n")
    return warm, new_items, facts


def train(dataset: str, warm: Path, work: Path, llm: str) -> tuple[Path, dict]:
    config_path, sasrec_changes = CONFIGS[dataset]
    changes = {section: dict(values) for section, values in COMBO.items()}
    if dataset == "example":
        del changes["llm"]["num_layers"]
    changes["llm"]["source"] = llm
    config = load_config(config_path, **changes)
    run = work / "run"
    if not (run / "sasrec" / "config.json").exists():
        train_sasrec(warm, run, load_config(config_path, **sasrec_changes) if sasrec_changes else config,
                     overwrite=True)
    done = work / "training.json"  # train --resume continues an interrupted run but would retrain a finished one
    if done.exists():
        return run, json.loads(done.read_text())
    started = time.perf_counter()
    result = train_laser(run, config, resume=True, overwrite=True)
    training = {"config_file": str(config_path.relative_to(HERE.parent)), "changes": changes, "gate": result.gate,
                "seconds_per_epoch": round(result.seconds_per_epoch, 1),
                "best": [result.best_stage, result.best_epoch], "wall_seconds": round(time.perf_counter() - started)}
    done.write_text(json.dumps(training, indent=2) + "\n")
    return run, training


def cold_users(full: Path, new_ids: set) -> pl.DataFrame:
    """user_id, history (original item ids) and target of every user whose last full-data item is a new one."""
    sequences = build_sequences(load_data_dir(full).interactions)
    original = np.asarray(sequences.item_ids.to_list(), dtype=object)
    rows = [(user, [original[i - 1] for i in seq[:-1]], original[seq[-1] - 1])
            for user, seq in zip(sequences.user_ids.to_list(), sequences.seqs, strict=True)
            if original[seq[-1] - 1] in new_ids]
    user, history, target = zip(*rows, strict=True)
    return pl.DataFrame({"user_id": list(user), "history": list(history), "target": list(target)})


def warm_users(warm: Path, count: int) -> pl.DataFrame:
    """A seeded sample of `count` users of the warm data's test split (history and target are warm items)."""
    sequences = build_sequences(load_data_dir(warm).interactions)
    histories, targets = sequences.split("test")
    original = np.asarray(sequences.item_ids.to_list(), dtype=object)
    chosen = np.sort(np.random.default_rng(SEED).permutation(sequences.num_users)[:count])
    users = sequences.user_ids.to_list()
    return pl.DataFrame({"user_id": [users[u] for u in chosen],
                         "history": [[original[i - 1] for i in histories[u]] for u in chosen],
                         "target": [original[targets[u] - 1] for u in chosen]})


def ranks_of(users: pl.DataFrame, artifacts: Path, out: Path, **options) -> tuple[np.ndarray, pl.DataFrame]:
    """Score `users` (K = 10) with `artifacts` into `out`; each user's 1-based rank of its target (K + 1: not in
    the top K) and the recommendations."""
    out.parent.mkdir(parents=True, exist_ok=True)
    inputs = out.with_suffix(".users.parquet")
    users.select("user_id", "history").write_parquet(inputs)
    if not (out / "_SUCCESS").exists():
        score_users(inputs, artifacts, out, top_k=K, overwrite=True, **options)
    recs = pl.read_parquet(out / "*.parquet")
    order = users.select("user_id", "target").with_row_index().join(
        recs.select("user_id", "item_id", "rank"), left_on=["user_id", "target"], right_on=["user_id", "item_id"],
        how="left").sort("index").with_columns(pl.col("rank").fill_null(K + 1))
    if order.height != users.height:
        raise RuntimeError(f"{out}: {order.height} ranked users for {users.height} scored")
    return order["rank"].to_numpy().astype(np.float64), recs


def summary(ranks: np.ndarray) -> dict:
    return {"HR@10": round(float((ranks <= K).mean()), 5), "NDCG@10": round(float(ndcg_per_user(ranks, K).mean()), 5)}


def versus(base: np.ndarray, other: np.ndarray) -> dict:
    """Paired NDCG@10 difference other - base with its bootstrap interval (the Laser benchmarks' comparison)."""
    return versus_sasrec(other, base)


def random_new(users: pl.DataFrame, new_ids: set) -> tuple[dict, np.ndarray]:
    """Expected HR@10 / NDCG@10 of a uniform random order of the user's M new candidates above every warm item."""
    hit, gain = [], []
    discounts = 1.0 / np.log2(np.arange(2, K + 2))
    for history in users["history"].to_list():
        m = len(new_ids - set(history))
        hit.append(min(K, m) / m)
        gain.append(discounts[:min(K, m)].sum() / m)
    return {"HR@10": round(float(np.mean(hit)), 5), "NDCG@10": round(float(np.mean(gain)), 5)}, np.asarray(gain)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=sorted(CONFIGS), required=True)
    parser.add_argument("--llm", default="tiny", help="LLM source, e.g. SmolLM2-135M-Instruct.Q4_1.gguf "
                        "(default: the embedded tiny LLM, for --dataset example)")
    parser.add_argument("--work", type=Path, help="default: benchmarks/work/cold_DATASET")
    parser.add_argument("--warm-users", type=int, default=1000)
    parser.add_argument("--results", type=Path, default=HERE / "results" / "cold_items.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    work = args.work or HERE / "work" / f"cold_{args.dataset}"
    work.mkdir(parents=True, exist_ok=True)
    full = prepare_full(args.dataset, work)
    warm, new_items, facts = hold_out(full, work)
    run, training = train(args.dataset, warm, work, args.llm)
    artifacts = work / "artifacts"
    if not (artifacts / "manifest.json").exists():
        export_run(run, artifacts, model="laser", overwrite=True)
    new_ids = set(pl.read_parquet(new_items)["item_id"].to_list())
    added, seconds = {}, {}
    for fallback in FALLBACKS:
        added[fallback] = work / f"artifacts_{fallback}"
        if not (added[fallback] / "manifest.json").exists():
            started = time.perf_counter()
            add_items(artifacts, new_items, added[fallback], id_vector=fallback, overwrite=True)
            seconds[fallback] = round(time.perf_counter() - started, 1)

    cold = cold_users(full, new_ids)
    logging.info("%d cold users (last item new), %d new items", cold.height, len(new_ids))
    allow = work / "new_item_ids.txt"
    allow.write_text("".join(f"{i}\n" for i in sorted(new_ids)))
    # Popularity ranks by training counts; a new item has none, so every warm item with a count and not in the
    # history ranks above it (ties among count-0 items broken in the target's favour).
    counted = set(load_data_dir(warm).interactions["item_id"].unique().to_list())
    pop_ranks = np.array([1 + len(counted - set(h)) for h in cold["history"].to_list()], dtype=np.float64)
    random_summary, random_gain = random_new(cold, new_ids)
    result = {"facts": {**facts, "new_items": len(new_ids), "cold_users": cold.height}, "training": training,
              "items_add_seconds": seconds, "cold": {"popularity": summary(pop_ranks),
                                                      "random_order_of_new_items": random_summary}, "warm": {}}
    cold_ranks = {}
    for fallback in FALLBACKS:
        ranks, _ = ranks_of(cold, added[fallback], work / "out" / f"cold_{fallback}")
        cold_ranks[fallback] = ranks
        among, _ = ranks_of(cold, added[fallback], work / "out" / f"cold_{fallback}_among_new", allow_items=str(allow))
        result["cold"][f"laser_{fallback}"] = {
            **summary(ranks), "vs_popularity": versus(pop_ranks, ranks)}
        result["cold"][f"laser_{fallback}_among_new_items"] = {
            **summary(among), "vs_random_order": {
                "diff": round(float(ndcg_per_user(among, K).mean() - random_gain.mean()), 5),
                "ci95": [round(v, 5) for v in paired_bootstrap(random_gain, ndcg_per_user(among, K), **BOOTSTRAP)[1]]}}
    result["cold"]["zeros_vs_mean"] = versus(cold_ranks["mean"], cold_ranks["zeros"])
    result["cold"]["neighbours_vs_mean"] = versus(cold_ranks["mean"], cold_ranks["neighbours"])

    warm_sample = warm_users(warm, args.warm_users)
    before, _ = ranks_of(warm_sample, artifacts, work / "out" / "warm_before")
    result["warm"] = {"users": warm_sample.height, "before": summary(before)}
    for fallback in FALLBACKS:
        after, recs = ranks_of(warm_sample, added[fallback], work / "out" / f"warm_{fallback}")
        result["warm"][f"after_{fallback}"] = {
            **summary(after), "vs_before": versus(before, after),
            "new_items_share_of_top10": round(float(recs["item_id"].is_in(list(new_ids)).mean()), 5)}
    better = max(FALLBACKS, key=lambda f: result["cold"][f"laser_{f}"]["NDCG@10"])
    result["fallback_by_cold_NDCG@10"] = better
    record = json.loads(args.results.read_text()) if args.results.exists() else {}
    record[args.dataset] = {**result, "command": " ".join([Path(sys.executable).name, *sys.argv]),
                            "machine": machine(), "protocol": __doc__.split("\n\n")[2]}
    tmp = args.results.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
    tmp.replace(args.results)
    logging.info("%s", json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
