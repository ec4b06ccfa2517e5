"""Laser against its baselines on Amazon Scientific (the paper's data), full ranking, test split, 2 CPU cores.

    python benchmarks/laser_scientific.py [--model popularity --model sasrec --model sasrec_tfidf_blend]
    python benchmarks/laser_scientific.py --model NAME --config benchmarks/configs/laser_scientific_NAME.toml \\
        [--llm SmolLM2-135M-Instruct.Q4_1.gguf]

Converts ../shared/data/amazon/Scientific (UniSRec layout) and builds on the SASRec that
`benchmarks/sasrec_s3rec.py --dataset Scientific` trains with the library defaults (trained here if missing,
the same way). Rows: popularity, SASRec, the SASRec + TF-IDF title blend (text_blend.py; its weight chosen on the
validation split) and one Laser row per `--model NAME --config PATH` (train_laser on a copy of the SASRec run; the
LLM defaults to SmolLM2-135M as GGUF, fetched by ../shared/tools/fetch-smollm2.sh).

Every row but SASRec gets the paired difference to SASRec in per-user test NDCG@10 with a 95% bootstrap interval
(1000 resamples over test users, seed 0); each model's per-user test ranks are kept in WORK/ranks/NAME.npy for it.
Resumable: a model is stored in benchmarks/results/laser_scientific.json as soon as it finishes and skipped on the
next start; an interrupted Laser run continues from its last epoch.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from laser_ml100k import fetch, save
from ranking import BOOTSTRAP, Bench, versus_sasrec
from sasrec_s3rec import OVERRIDES, machine
from text_blend import blend_scorer, choose_weight, tfidf_similarity

from laser_batch.config import load_config
from laser_batch.convert import convert
from laser_batch.metrics import metrics_from_ranks
from laser_batch.train import train_sasrec
from laser_batch.train_laser import train_laser

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared"
BASELINES = ("popularity", "sasrec", "sasrec_tfidf_blend")
METRICS = ("HR@10", "NDCG@10", "MRR")
PAPER = {"sasrec": {"HR@10": 0.1305, "NDCG@10": 0.0797, "MRR": 0.0696},  # arXiv 2409.01605, frozen 6B LLM
         "laser": {"HR@10": 0.1396, "NDCG@10": 0.0970, "MRR": 0.0893}}


def sasrec_costs(bench: Bench) -> dict:
    """SASRec's seconds per epoch (training time over epochs run, validation included) and parameter count."""
    from laser_batch.checkpoint import load_sasrec

    saved = json.loads((bench.run_dir / "sasrec" / "config.json").read_text())
    model, _ = load_sasrec(bench.run_dir / "sasrec")
    return {"seconds_per_epoch": round(saved["train_seconds"] / saved["epochs_run"], 2),
            "trained_parameters": sum(p.numel() for p in model.parameters())}


def blend_row(bench: Bench) -> tuple[np.ndarray, dict]:
    """The blend trains nothing beyond SASRec: its one weight is chosen on validation, then test is scored once."""
    similarity = tfidf_similarity(bench.titles())
    sasrec = bench.scorer("sasrec", bench.run_dir)
    with torch.no_grad():
        weight, grid = choose_weight(sasrec, similarity, *bench.splits["valid"])
    ranks = bench.test_ranks(blend_scorer(sasrec, similarity, weight))
    return ranks, {**sasrec_costs(bench), "weight": weight,
                   "valid_NDCG@10": {str(w): round(m["NDCG@10"], 5) for w, m in grid.items()}}


def laser_row(
    bench: Bench, name: str, config_path: Path, llm: str, work: Path, command: str
) -> tuple[np.ndarray, dict]:
    run = work / f"run_{name}"
    if not (run / "sasrec").exists():
        shutil.copytree(bench.run_dir, run, dirs_exist_ok=True)
    config = load_config(config_path, llm={"source": llm})
    started = time.perf_counter()
    result = train_laser(run, config, resume=True, overwrite=True)
    ranks = bench.test_ranks(bench.scorer("laser", run))
    return ranks, {
        "seconds_per_epoch": round(result.seconds_per_epoch, 1),
        "trained_parameters": result.trainable_parameters,
        "gate": getattr(result, "gate", None),  # the fused models' trained g; None for the paper's Laser
        "config_file": str(config_path), "config": config.to_dict(), "command": command,
        "best": [result.best_stage, result.best_epoch], "wall_seconds": round(time.perf_counter() - started),
    }


def prepare(args: argparse.Namespace) -> Path:
    """The Scientific data directory and the SASRec run (as sasrec_s3rec.py trains it); returns the run."""
    data, run = args.work / "data", args.work / "run"
    if not (data / "card.json").exists():
        convert("unisrec", [args.data], data)
    if not (run / "sasrec" / "config.json").exists():
        train_sasrec(data, run, load_config(**OVERRIDES["Scientific"]), overwrite=True)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", help=f"{', '.join(BASELINES)} or a Laser row's name "
                        "(with --config); default: the baselines")
    parser.add_argument("--config", type=Path, help="the Laser config of a --model that is not a baseline")
    parser.add_argument("--llm", help="LLM source; default: SmolLM2-135M-Instruct GGUF fetched at run time")
    parser.add_argument("--data", type=Path, default=SHARED / "data" / "amazon" / "Scientific")
    parser.add_argument("--work", type=Path, default=HERE / "work" / "Scientific")
    parser.add_argument("--results", type=Path, default=HERE / "results" / "laser_scientific.json")
    args = parser.parse_args()
    models = args.model or list(BASELINES)
    lasers = [m for m in models if m not in BASELINES]
    if lasers and args.config is None:
        parser.error(f"--model {lasers[0]} is a Laser row: give its --config")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    command = " ".join([Path(sys.executable).name, *sys.argv])
    bench = Bench(args.work / "data", prepare(args))
    record = json.loads(args.results.read_text()) if args.results.exists() else {"models": {}}
    record.update(config=load_config(**OVERRIDES["Scientific"]).to_dict(), paper=PAPER,
                  protocol="leave-one-out, full ranking over all items, history items excluded", bootstrap=BOOTSTRAP,
                  command=command, machine=machine())
    ranks_dir = args.work / "ranks"
    ranks_dir.mkdir(parents=True, exist_ok=True)
    if not (ranks_dir / "sasrec.npy").exists():
        np.save(ranks_dir / "sasrec.npy", bench.test_ranks(bench.scorer("sasrec", bench.run_dir)))
    sasrec_ranks = np.load(ranks_dir / "sasrec.npy")
    for model in models:
        if model in record["models"]:
            logging.info("%s: done already, skipping", model)
            continue
        if model == "popularity":
            ranks, extra = bench.test_ranks(bench.scorer("popularity", bench.run_dir)), {
                "seconds_per_epoch": None, "trained_parameters": 0}
        elif model == "sasrec":
            ranks, extra = sasrec_ranks, sasrec_costs(bench)
        elif model == "sasrec_tfidf_blend":
            ranks, extra = blend_row(bench)
        else:
            llm = args.llm or str(next(fetch("fetch-smollm2.sh", args.work / "smollm2").glob("*.gguf")))
            ranks, extra = laser_row(bench, model, args.config, llm, args.work, command)
        np.save(ranks_dir / f"{model}.npy", ranks)
        metrics = metrics_from_ranks(ranks)
        record["models"][model] = {
            **{k: metrics[k] for k in METRICS}, "gate": None,
            "ndcg10_vs_sasrec": None if model == "sasrec" else versus_sasrec(ranks, sasrec_ranks), **extra,
        }
        save(args.results, record)
        logging.info("%s: %s", model, {k: v for k, v in record["models"][model].items() if k != "config"})


if __name__ == "__main__":
    main()
