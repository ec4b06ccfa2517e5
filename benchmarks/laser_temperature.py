"""Diagnostic: the loss a trained Laser run's embeddings give at other temperatures (issue 3).

    python benchmarks/laser_temperature.py [RUN_DIR] [--users 300]

Loads RUN_DIR/laser (default: the SmolLM2 run of benchmarks/laser_ml100k.py) with its stored item matrix,
encodes a fixed, evenly spread sample of validation users and prints, for each temperature, the full-catalogue
cross-entropy on their validation items next to ln(N), the loss of a uniform guess, and the spread of the
cosines. Ranking metrics do not depend on the temperature; the loss, and so the training signal, does.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from laser_batch.checkpoint import load_laser, read_run_info
from laser_batch.config import TextConfig, from_dict
from laser_batch.contracts import load_data_dir
from laser_batch.encode import encode_users, laser_inputs
from laser_batch.sequences import build_sequences, evenly_spread

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", nargs="?", type=Path, default=HERE / "work" / "ml100k" / "run_laser")
    parser.add_argument("--users", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(2)
    model, items, config = load_laser(args.run)
    data = load_data_dir(Path(read_run_info(args.run)["data_dir"]))
    sequences = build_sequences(data.interactions)
    inputs = laser_inputs(model.llm, data.items, sequences, from_dict(TextConfig, config["text"], "text"),
                          model.sasrec.config.max_len)
    histories, targets = sequences.split("valid")
    rows = evenly_spread(len(targets), args.users)
    users = encode_users(model, inputs, [histories[r] for r in rows], batch_size=32)
    cosine = users @ items.T  # (U, N)
    target = torch.from_numpy(targets[rows] - 1)
    out = {"users": len(rows), "ln_N": round(math.log(items.shape[0]), 3),
           "cosine": {"mean": round(cosine.mean().item(), 4), "std": round(cosine.std().item(), 4),
                      "target_mean": round(cosine.gather(1, target[:, None]).mean().item(), 4),
                      "max_mean": round(cosine.max(1).values.mean().item(), 4)},
           "loss": {str(tau): round(F.cross_entropy(cosine / tau, target).item(), 3)
                    for tau in (0.02, 0.05, 0.1, 0.2, 0.5, 1.0)}}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
