"""Export the SmolLM2-135M Laser run of the ML-100K benchmark to ONNX: time, sizes, parity, quantised variants.

    python benchmarks/export_smollm2.py [--run benchmarks/work/ml100k/run_laser] [--threads 2] [--scheme nbits8 ...]

Needs the run written by benchmarks/laser_ml100k.py (model "laser"). Exports the fp32 graphs through Optimum,
validates them against torch (two shapes per part, end to end on held-out users), then adds every quantised
user-encoder variant (exporters/quantize.py), each measured against the fp32 graph on the same held-out users
in the same process (speed ratios, top-10 agreement, Recall@10 change). Writes
benchmarks/results/export_smollm2.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from sasrec_s3rec import machine

from laser_batch.exporters.export import export_run

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=HERE / "work" / "ml100k" / "run_laser")
    parser.add_argument("--out", type=Path, default=HERE / "work" / "ml100k" / "artifacts")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--users", type=int, default=256, help="held-out users for the checks")
    parser.add_argument("--results", type=Path, default=HERE / "results" / "export_smollm2.json")
    parser.add_argument("--scheme", action="append", help="quantisation scheme to add (repeatable); default: every one")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    import torch

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    manifest = export_run(args.run, args.out, quantize=args.scheme or ["int8"], validate_users=args.users,
                          threads=args.threads, overwrite=True)
    graphs = manifest["graphs"]
    record = {
        "run": str(args.run), "llm": manifest["settings"]["llm"], "trained_llm_dtype":
            manifest["settings"]["trained_llm_dtype"],
        "export_seconds": manifest["export_seconds"], "wall_seconds": round(time.perf_counter() - started, 1),
        "files": {name: f["bytes"] for name, f in manifest["files"].items()},
        "fp32": {
            "parity": {name: g["parity"] for name, g in graphs.items()},
            "export_seconds": {name: g["export_seconds"] for name, g in graphs.items()},
            "end_to_end": manifest["end_to_end"],
        },
        "int8": graphs["user_encoder"].get("variants", {}),
        "recommended_cpu_variant": graphs["user_encoder"].get("recommended_cpu_variant"),
        "tolerance": manifest["tolerance"], "versions": manifest["versions"],
        "command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": machine(),
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(record, indent=2) + "\n")
    logging.info("wrote %s", args.results)


if __name__ == "__main__":
    main()
