"""Diagnostic: does a trained Laser run fit its training targets better than held-out ones (memorisation), or not
even those (under-fitting)? Compared with the frozen SASRec it was built on.

    python benchmarks/diagnostics/laser_fit_gap.py --run RUN_DIR [--users 300] [--results FILE]

For the same users (evenly spread, the ones `laser.valid_users` picks) it ranks the full catalogue, history excluded,
for three targets: the last training item (a target in every epoch, since `training_samples` always takes it), an
earlier training item at a random cut point (a target only in the epochs that drew it), and the validation item
(never trained on). HR@10, NDCG@10 and MRR for Laser and SASRec. Reads the run; trains nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from laser_batch.checkpoint import read_run_info
from laser_batch.contracts import load_data_dir
from laser_batch.evaluate import run_scorer  # the scorer `laser-batch evaluate` uses, for targets it has no split for
from laser_batch.metrics import metrics_from_ranks, rank_targets
from laser_batch.sequences import build_sequences, evenly_spread

BENCHMARKS = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(BENCHMARKS))  # run as a script: the benchmark scripts' shared helpers live one level up
from laser_ml100k import METRICS  # noqa: E402
from sasrec_s3rec import machine  # noqa: E402


def targets(seqs: list[np.ndarray], users: np.ndarray, rng: np.random.Generator) -> dict:
    """name -> (histories, targets) for the chosen users; sequences are train items + valid + test."""
    last, earlier, valid = ([], []), ([], []), ([], [])
    for u in users:
        s = seqs[u]
        train = s[:-2]
        last[0].append(train[:-1])
        last[1].append(train[-1])
        cut = int(rng.integers(1, len(train) - 1)) if len(train) > 2 else len(train) - 1
        earlier[0].append(train[:cut])
        earlier[1].append(train[cut])
        valid[0].append(s[:-2])
        valid[1].append(s[-2])
    return {name: (h, np.asarray(t, dtype=np.int64)) for name, (h, t) in
            {"train_last": last, "train_earlier": earlier, "valid": valid}.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="a run directory with sasrec/ and laser/")
    parser.add_argument("--users", type=int, default=300)
    parser.add_argument("--results", type=Path, default=BENCHMARKS / "results" / "laser_fit_gap.json")
    args = parser.parse_args()
    torch.set_num_threads(2)

    dataset = load_data_dir(Path(read_run_info(args.run)["data_dir"]))
    sequences = build_sequences(dataset.interactions)
    seqs = sequences.seqs
    users = evenly_spread(len(seqs), args.users)  # the users training validated on, when --users = valid_users
    cases = targets(seqs, users, np.random.default_rng(0))

    # histories only matter to the popularity scorer
    scorers = {model: run_scorer(model, args.run, sequences, [], dataset.items) for model in ("laser", "sasrec")}
    started = time.perf_counter()
    results = {model: {name: {k: v for k, v in metrics_from_ranks(rank_targets(score, h, t, batch_size=64)).items()
                              if k in METRICS} for name, (h, t) in cases.items()}
               for model, score in scorers.items()}
    record = {"run": str(args.run), "users": int(len(users)), "results": results,
              "seconds": round(time.perf_counter() - started),
              "command": " ".join(["python", "benchmarks/diagnostics/laser_fit_gap.py", *sys.argv[1:]]),
              "machine": machine()}
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(record, indent=1) + "\n")
    for model, by_case in results.items():
        print(model, {name: round(m["HR@10"], 4) for name, m in by_case.items()})


if __name__ == "__main__":
    main()
