"""Diagnostic: how much does a trained Laser's text signal add to SASRec, and how does it compare with TF-IDF titles?

    python benchmarks/diagnostics/laser_fusion_probe.py --run RUN_DIR [--data DATA_DIR] [--users 1000]
        [--results FILE] [--name NAME]

On the validation split only (the users `laser.valid_users` picks: evenly spread), for one trained Laser run on
Amazon Scientific (benchmarks/laser_scientific.py's work directory by default), it ranks the full catalogue, history
excluded, by:
- each signal alone: SASRec's scores S, Laser's cosine C (user suffix state against the item matrix), Laser's
  item-item similarity I (the candidate's Laser item vector against the last 5 history items' vectors, weighted
  0.7^age, as the TF-IDF blend does) and the TF-IDF title similarity T (text_blend.py);
- blends, each weight chosen here on the same users (so these are upper bounds, not results): the gated fusion
  S + g * C / tau as `laser.gate_fit = "valid"` fits it, per-user z-scored z(S) + w z(C), z(S) + w z(I),
  z(S) + w z(T) (the TF-IDF blend), and z(S) + w1 z(T) + w2 z(C) (does Laser add anything beyond TF-IDF?).
Reads the run; trains nothing. Each blend's NDCG@10 and weights go to the results file under --name.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from laser_batch.checkpoint import load_laser
from laser_batch.config import TextConfig, from_dict
from laser_batch.encode import encode_users, laser_inputs
from laser_batch.metrics import exclude_items, metrics_from_ranks, target_ranks
from laser_batch.sequences import evenly_spread

BENCHMARKS = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(BENCHMARKS))  # run as a script: the benchmark scripts' shared helpers live one level up
from laser_ml100k import save  # noqa: E402
from ranking import Bench  # noqa: E402
from sasrec_s3rec import machine  # noqa: E402
from text_blend import DECAY, LAST_ITEMS, text_scores, tfidf_similarity, zscore  # noqa: E402

WEIGHTS = (0.0, 0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0)
GATES = (0.0, 0.01, 0.03, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    work = BENCHMARKS / "work" / "Scientific"
    parser.add_argument("--run", type=Path, required=True, help="a trained Laser run (laser_scientific.py's run_NAME)")
    parser.add_argument("--data", type=Path, default=work / "data")
    parser.add_argument("--base", type=Path, default=work / "run", help="the SASRec run the Laser run was built on")
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--name", help="the key in the results file; default: the run directory's name")
    parser.add_argument("--results", type=Path, default=BENCHMARKS / "results" / "laser_fusion_probe.json")
    args = parser.parse_args()
    started = time.perf_counter()
    bench = Bench(args.data, args.base)
    histories, targets = bench.splits["valid"]
    rows = evenly_spread(len(targets), args.users)
    histories, targets = [histories[r] for r in rows], targets[rows]

    model, items, config = load_laser(args.run)
    inputs = laser_inputs(model.llm, bench.items, bench.sequences, from_dict(TextConfig, config["text"], "text"),
                          model.sasrec.config.max_len)
    users = encode_users(model, inputs, histories, batch_size=config["laser"]["item_batch_size"])
    with torch.no_grad():
        sasrec = (model.sasrec_state(inputs.id_history(histories)) @ model.sasrec.item_vectors().T).numpy()
    cosine = (users @ items.T).numpy()
    item_vectors = items.numpy()
    item_item = text_scores(item_vectors @ item_vectors.T, histories)  # the TF-IDF blend's history weighting
    tfidf = text_scores(tfidf_similarity(bench.titles()), histories)

    def ndcg(scores: np.ndarray) -> float:
        scores = np.array(scores, dtype=np.float32)
        exclude_items(scores, histories)
        return round(metrics_from_ranks(target_ranks(scores, targets))["NDCG@10"], 5)

    def best(candidates: dict) -> dict:
        weight, value = max(candidates.items(), key=lambda kv: (kv[1], -sum(np.atleast_1d(kv[0]))))
        return {"NDCG@10": value, "weight": weight}

    tau = model.config.temperature
    z_s, z_c, z_i, z_t = zscore(sasrec), zscore(cosine), zscore(item_item), zscore(tfidf)
    signals = {"sasrec": ndcg(sasrec), "laser_user": ndcg(cosine), "laser_item_item": ndcg(item_item),
               "tfidf": ndcg(tfidf)}
    blends = {
        "gated_raw": best({g: ndcg(sasrec + g * cosine / tau) for g in GATES}),
        "z_laser_user": best({w: ndcg(z_s + w * z_c) for w in WEIGHTS}),
        "z_laser_item_item": best({w: ndcg(z_s + w * z_i) for w in WEIGHTS}),
        "z_tfidf": best({w: ndcg(z_s + w * z_t) for w in WEIGHTS}),
        "z_tfidf_and_laser_user": best({(a, b): ndcg(z_s + a * z_t + b * z_c)
                                        for a in (0.1, 0.2, 0.3, 0.5) for b in (0.0, 0.05, 0.1, 0.2, 0.3)}),
    }
    for blend in blends.values():
        blend["weight"] = list(np.atleast_1d(blend["weight"]).tolist())
    record = json.loads(args.results.read_text()) if args.results.exists() else {"runs": {}}
    record["runs"][args.name or args.run.name] = {
        "run": str(args.run), "best": [config["best_stage"], config["best_epoch"]], "gate": config.get("gate"),
        "users": len(targets), "split": "valid", "alone_NDCG@10": signals, "blends": blends,
        "history_weighting": {"last_items": LAST_ITEMS, "decay": DECAY},
        "command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": machine(),
        "seconds": round(time.perf_counter() - started),
    }
    save(args.results, record)
    print(json.dumps(record["runs"][args.name or args.run.name], indent=1))


if __name__ == "__main__":
    main()
