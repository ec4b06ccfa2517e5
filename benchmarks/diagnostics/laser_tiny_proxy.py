"""Laser's training dynamics on MovieLens-100K with the embedded tiny LLM: a fast proxy for the SmolLM2 benchmark.

    python benchmarks/diagnostics/laser_tiny_proxy.py [--variant NAME ...]

Same data, frozen SASRec and configuration as benchmarks/laser_ml100k.py (run that first: it fetches the data
and trains SASRec), but the frozen LLM is the embedded tiny one (float32), so a Laser epoch takes seconds
instead of most of an hour on a 2-core CPU. Each variant runs 4 epochs of stage 1 (item re-encoding every
epoch) and is evaluated on the test split; its per-epoch loss and validation metrics come from its
metrics.jsonl. Resumable: each finished variant is stored in benchmarks/results/laser_tiny_proxy.json at once.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

from laser_batch.config import load_config
from laser_batch.evaluate import evaluate_run
from laser_batch.train_laser import train_laser

BENCHMARKS = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(BENCHMARKS))  # run as a script: the benchmark scripts' shared helpers live one level up
from laser_ml100k import METRICS, save  # noqa: E402
from sasrec_s3rec import machine  # noqa: E402

COMMON = {"llm": {"source": "tiny", "dtype": "float32"}, "laser": {"stage1_epochs": 4, "stage2_epochs": 0},
          "mformer": {"id_window": 10}}  # the setting of every recorded variant (the benchmark config now has 1)
VARIANTS = {  # name -> [laser] changes on top of COMMON and the benchmark config
    "lr1e-3_center": {"lr": 1e-3, "center": True},
    "lr1e-4_center": {"lr": 1e-4, "center": True},
    "lr1e-3_no_center": {"lr": 1e-3, "center": False},
    "lr1e-4_no_center": {"lr": 1e-4, "center": False},
    "lr1e-4_center_users": {"lr": 1e-4, "center": True, "center_users": 256},
    "lr1e-4_center_tau0.2": {"lr": 1e-4, "center": True, "temperature": 0.2},
    "lr1e-4_center_tau0.5": {"lr": 1e-4, "center": True, "temperature": 0.5},
    "lr3e-4_center_tau0.2": {"lr": 3e-4, "center": True, "temperature": 0.2},
    "lr1e-4_center_tau0.2_4samples": {"lr": 1e-4, "center": True, "temperature": 0.2, "samples_per_user": 4},
}


def start(doc: str, variants: dict, results_name: str, common: dict):
    """The variant benchmarks' common start: (args, base run dir, record with popularity and SASRec references)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--variant", action="append", choices=list(variants))
    parser.add_argument("--work", type=Path, default=BENCHMARKS / "work" / "ml100k")
    parser.add_argument("--config", type=Path, default=BENCHMARKS / "configs" / "laser_ml100k.toml")
    parser.add_argument("--results", type=Path, default=BENCHMARKS / "results" / results_name)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    base = args.work / "run"
    if not (base / "sasrec" / "config.json").exists():
        sys.exit(f"{base}/sasrec: missing; run benchmarks/laser_ml100k.py --model sasrec first")
    record = json.loads(args.results.read_text()) if args.results.exists() else {"variants": {}}
    record.update(common=common, machine=machine(), command=" ".join([Path(sys.executable).name, *sys.argv]))
    if "reference" not in record:
        record["reference"] = {m: {k: evaluate_run(base, model=m)["metrics"][k] for k in METRICS}
                               for m in ("popularity", "sasrec")}
    return args, base, record


def main() -> None:
    args, base, record = start(__doc__, VARIANTS, "laser_tiny_proxy.json", COMMON)
    for name in args.variant or list(VARIANTS):
        if name in record["variants"]:
            logging.info("%s: done already, skipping", name)
            continue
        run = args.work / "tiny_proxy" / name
        shutil.copytree(base, run, dirs_exist_ok=True)
        config = load_config(args.config, llm=COMMON["llm"], laser={**COMMON["laser"], **VARIANTS[name]},
                             mformer=COMMON["mformer"])
        started = time.perf_counter()
        result = train_laser(run, config, overwrite=True)
        metrics = evaluate_run(run, model="laser")["metrics"]
        epochs = [json.loads(line) for line in (result.checkpoint / "metrics.jsonl").read_text().splitlines()]
        record["variants"][name] = {
            "laser": VARIANTS[name], "test": {k: metrics[k] for k in METRICS},
            "best": [result.best_stage, result.best_epoch], "wall_seconds": round(time.perf_counter() - started),
            "cpu": machine()["cpu"],
            "epochs": [{k: e[k] for k in ("stage", "epoch", "loss", "HR@10", "NDCG@10")} for e in epochs],
        }
        save(args.results, record)
        logging.info("%s: test %s", name, record["variants"][name]["test"])


if __name__ == "__main__":
    main()
