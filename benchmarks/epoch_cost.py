"""Seconds per Laser training epoch on Amazon Scientific, the paper's setup against the best combination, side by side.

    python benchmarks/epoch_cost.py [--llm SmolLM2-135M-Instruct.Q4_1.gguf] [--paper configs/laser_scientific.toml]
        [--fast configs/laser_scientific_combo.toml] [--steps 12] [--items 256] [--users 256] [--repeats 2]

A stage-1 epoch of `train_laser` is three kinds of work: re-encoding the catalogue (`encode_items`, no gradient),
the training steps over one sample per user (`train_laser.training_loss`, backward and the AdamW step) and the
validation users' encoding (`encode_users`). A whole epoch of the paper's setup takes ~45 minutes on 2 cores, and
the two full-epoch timings in laser_scientific.json ran beside other work, so this script measures each kind on a
slice of the real data for both models in one process, interleaved (paper, fast, paper, fast, ...) so that other
load hits both alike, and scales each slice to its full count:

    epoch = items_s * N_items / items + steps_s * steps_per_epoch / steps + users_s * valid_users / users

Both models are built on the same Scientific SASRec run as laser_scientific.py's rows (prepared there), from the
same configs. The slices: the first `--items` catalogue items, the first `--steps` length-sorted training batches
of one seeded draw (the same batches for both), the first `--users` validation users. The best of `--repeats`
passes counts (wall-clock; CPU seconds are recorded too). Results: benchmarks/results/epoch_cost.json.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from laser_ml100k import save
from laser_scientific import prepare
from sasrec_s3rec import machine

from laser_batch.config import load_config
from laser_batch.encode import encode_items, encode_users
from laser_batch.sequences import length_batches
from laser_batch.train_laser import _prepare, build_laser, heldout_sasrec, training_loss, training_samples
from laser_batch.training import NoProgress

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared"
PARTS = ("items", "steps", "users")


def timed(work) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    work()
    return time.perf_counter() - wall, time.process_time() - cpu


class Side:
    """One model with what its epoch works on, and the work of each slice."""

    def __init__(self, name: str, config_path: Path, llm: str, run: Path, args: argparse.Namespace) -> None:
        self.name, self.config_path = name, config_path
        self.config = load_config(config_path, llm={"source": llm})
        if self.config.train.threads:
            torch.set_num_threads(self.config.train.threads)
        self.model, self.inputs, self.sequences = build_laser(self.config, run)
        self.training = _prepare(self.config, self.model, self.inputs, self.sequences, NoProgress)
        cfg = self.config.laser
        self.once_per_run = 0.0  # `gate_fit = "residual"`: the held-out SASRec, fitted once before the first epoch
        if self.model.fused and cfg.gate_fit == "residual":
            (args.work / f"heldout_{name}").mkdir(parents=True, exist_ok=True)
            started = time.perf_counter()
            self.training.heldout = heldout_sasrec(self.config, self.sequences, args.work / f"heldout_{name}")
            self.once_per_run = time.perf_counter() - started
        histories, targets = training_samples(self.sequences, cfg.samples_per_user, np.random.default_rng(0))
        batches = length_batches(np.fromiter((len(h) for h in histories), dtype=np.int64), cfg.batch_size,
                                 rng=np.random.default_rng(0))
        self.steps_per_epoch = math.ceil(len(batches) / cfg.grad_accumulation)
        self.batches = [([histories[r] for r in rows], targets[rows]) for rows in batches[: args.steps]]
        self.valid_users = len(self.training.valid[1])
        self.user_slice = self.training.valid[0][: args.users]
        self.items_slice = args.items
        gen = torch.Generator().manual_seed(0)
        self.item_matrix = torch.nn.functional.normalize(
            torch.randn(self.sequences.num_items, self.model.llm.hidden_size, generator=gen), dim=-1)

    def items(self) -> None:
        encode_items(self.model, self.inputs, self.items_slice, batch_size=self.config.laser.item_batch_size)

    def steps(self) -> None:
        self.model.train()
        optimizer = self.training.optimizer
        for histories, targets in self.batches:
            training_loss(self.training, histories, targets, self.item_matrix).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    def users(self) -> None:
        encode_users(self.model, self.inputs, self.user_slice, batch_size=self.config.laser.item_batch_size)

    def scale(self, part: str) -> float:
        """Full count / slice count of `part` in one stage-1 epoch."""
        return {"items": self.sequences.num_items / self.items_slice,
                "steps": self.steps_per_epoch / len(self.batches),
                "users": self.valid_users / len(self.user_slice)}[part]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llm", required=True, help="the LLM both configs use (SmolLM2-135M-Instruct GGUF)")
    parser.add_argument("--paper", type=Path, default=HERE / "configs" / "laser_scientific.toml")
    parser.add_argument("--fast", type=Path, default=HERE / "configs" / "laser_scientific_combo.toml")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--items", type=int, default=256)
    parser.add_argument("--users", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--data", type=Path, default=SHARED / "data" / "amazon" / "Scientific")
    parser.add_argument("--work", type=Path, default=HERE / "work" / "Scientific")
    parser.add_argument("--results", type=Path, default=HERE / "results" / "epoch_cost.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    run = prepare(args)
    sides = [Side("paper", args.paper, args.llm, run, args), Side("fast", args.fast, args.llm, run, args)]
    seconds = {s.name: {p: {"wall": [], "cpu": []} for p in PARTS} for s in sides}
    load_before = os.getloadavg()
    for part in PARTS:
        for repeat in range(args.repeats):
            for side in sides:
                wall, cpu = timed(getattr(side, part))
                seconds[side.name][part]["wall"].append(round(wall, 3))
                seconds[side.name][part]["cpu"].append(round(cpu, 3))
                logging.info("%s %s pass %d: %.1f s wall, %.1f s CPU", side.name, part, repeat + 1, wall, cpu)
    epoch = {s.name: {p: round(min(seconds[s.name][p]["wall"]) * s.scale(p), 1) for p in PARTS} for s in sides}
    for side in sides:
        epoch[side.name]["total"] = round(sum(epoch[side.name][p] for p in PARTS), 1)
    record = {
        "seconds_per_epoch": {s.name: epoch[s.name]["total"] for s in sides},
        "speedup": round(epoch["paper"]["total"] / epoch["fast"]["total"], 2),
        "per_part": epoch,
        "once_per_run_seconds": {s.name: round(s.once_per_run, 1) for s in sides},
        "measured_seconds": seconds,
        "slices": {s.name: {"items": s.items_slice, "of_items": s.sequences.num_items, "steps": len(s.batches),
                            "of_steps": s.steps_per_epoch, "users": len(s.user_slice), "of_users": s.valid_users}
                   for s in sides},
        "configs": {s.name: str(s.config_path) for s in sides},
        "llm": {s.name: {"source": Path(args.llm).name,
                         "num_layers": s.config.llm.num_layers or s.model.llm.source_layers,
                         "cf_position": s.config.laser.cf_position, "fusion": s.config.laser.fusion} for s in sides},
        "load_average": {"before": [round(x, 2) for x in load_before],
                         "after": [round(x, 2) for x in os.getloadavg()]},
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine(),
    }
    save(args.results, record)
    logging.info("seconds per epoch %s, speedup %.2fx", record["seconds_per_epoch"], record["speedup"])


if __name__ == "__main__":
    main()
