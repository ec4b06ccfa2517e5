"""Diagnostic: Laser's M-Former and two-stage training with the LLM taken out, on MovieLens-100K.

    python benchmarks/diagnostics/laser_bypass_llm.py [--variant NAME ...]

The embedding is the mean of the M-Former's prefix vectors (centred, L2-normalised) instead of the LLM's
hidden state at the suffix: what is left is the collaborative path (frozen SASRec -> M-Former) and the
training (`train_laser`: cosine / tau over the catalogue, the item matrix re-encoded without gradient at the
start of every stage-1 epoch). SASRec scored by cosine instead of dot product is the ceiling of that path.
The "joint" variants are not Laser: the item matrix is recomputed with gradient at every step, to measure
what the no-gradient item matrix of stage 1 costs. Same data, SASRec run and configuration as
benchmarks/laser_ml100k.py (run that first); 4 epochs of stage 1, tested on all users. Seconds per variant.
Resumable: each finished variant is stored in benchmarks/results/laser_bypass_llm.json at once.
"""

from __future__ import annotations

import logging
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from laser_batch import model as laser_model
from laser_batch.checkpoint import load_sasrec
from laser_batch.config import load_config
from laser_batch.encode import laser_scorer
from laser_batch.evaluate import evaluate_run
from laser_batch.metrics import metrics_from_ranks, rank_targets
from laser_batch.sequences import length_batches
from laser_batch.train_laser import build_laser, train_laser, training_samples

BENCHMARKS = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(BENCHMARKS))  # run as a script: the benchmark scripts' shared helpers live one level up
from laser_ml100k import METRICS, save  # noqa: E402
from laser_tiny_proxy import start  # noqa: E402

COMMON = {"llm": {"source": "tiny", "dtype": "float32"}, "laser": {"stage1_epochs": 4, "stage2_epochs": 0},
          "mformer": {"id_window": 10}}
VARIANTS = {  # name -> config changes on top of COMMON and the benchmark config; "joint": not Laser (see above)
    "window10": {},
    "window1": {"mformer": {"id_window": 1}},
    "window1_no_moe": {"mformer": {"id_window": 1, "num_experts": 1}},
    "window1_top8": {"mformer": {"id_window": 1, "top_k": 8}},
    "window1_8samples": {"mformer": {"id_window": 1}, "laser": {"samples_per_user": 8}},
    "window1_12epochs": {"mformer": {"id_window": 1}, "laser": {"stage1_epochs": 12}},
    "window1_no_moe_joint": {"mformer": {"id_window": 1, "num_experts": 1}, "joint": True},
    # Same number of training targets (12 per user), spread over fewer epochs with more targets per epoch:
    "window1_top8_6x2": {"mformer": {"id_window": 1, "top_k": 8}, "laser": {"stage1_epochs": 6}},
    "window1_top8_3x4": {"mformer": {"id_window": 1, "top_k": 8}, "laser": {"stage1_epochs": 3, "samples_per_user": 4}},
    # the paper's temperature instead of the benchmark's 0.2 (SmolLM2 runs under-fit: diagnostics/laser_fit_gap.py)
    "window1_top8_tau0.05": {"mformer": {"id_window": 1, "top_k": 8}, "laser": {"temperature": 0.05}},
    "window1_top8_tau0.1": {"mformer": {"id_window": 1, "top_k": 8}, "laser": {"temperature": 0.1}},
}


def bypass_llm(self, prefix, input_ids, attention_mask, *, raw=False, items=False):
    """Laser.encode without the LLM: the mean prefix vector, centred and normalised like the real embedding."""
    pooled = prefix.float().mean(1)
    if raw:
        return pooled
    if self.config.center:
        pooled = pooled - self.center
    return F.normalize(pooled, dim=-1)


def train_joint(run: Path, config) -> dict:
    """Stage-1-like epochs where the item matrix is recomputed with gradient at every step (not Laser)."""
    torch.manual_seed(config.train.seed)
    model, inputs, sequences = build_laser(config, run)
    cfg = config.laser
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                  weight_decay=cfg.weight_decay)
    rng = np.random.default_rng(config.train.seed)
    every_item = inputs.items(np.arange(1, sequences.num_items + 1))

    def item_matrix():
        raw = model(*every_item, raw=True, items=True)[0]
        model.center.copy_(raw.mean(0).detach())
        return F.normalize(raw - raw.mean(0), dim=-1)

    for _ in range(cfg.stage1_epochs):
        histories, targets = training_samples(sequences, cfg.samples_per_user, rng)
        model.train()
        for rows in length_batches(np.fromiter(map(len, histories), dtype=np.int64), cfg.batch_size, rng=rng):
            users, lb_loss = model(*inputs.users([histories[r] for r in rows]))
            loss = model.loss(users, item_matrix(), torch.from_numpy(targets[rows]), lb_loss)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        items = item_matrix()
    histories, targets = sequences.split("test")
    return metrics_from_ranks(rank_targets(laser_scorer(model, inputs, items, batch_size=256), histories, targets))


def sasrec_cosine(base: Path) -> dict:
    """SASRec's test metrics when its last state and the item embeddings are compared by cosine."""
    from laser_batch.checkpoint import read_run_info
    from laser_batch.contracts import load_data_dir
    from laser_batch.sequences import build_sequences, pad_left

    sasrec, _ = load_sasrec(base / "sasrec")
    items = F.normalize(sasrec.item_vectors().detach(), dim=-1)
    sequences = build_sequences(load_data_dir(Path(read_run_info(base)["data_dir"])).interactions)
    histories, targets = sequences.split("test")

    def scores(batch):
        ids = torch.from_numpy(pad_left([h[-sasrec.config.max_len:] for h in batch], sasrec.config.max_len))
        with torch.no_grad():
            return (F.normalize(sasrec(ids)[:, -1], dim=-1) @ items.T).numpy()

    return metrics_from_ranks(rank_targets(scores, histories, targets))


def main() -> None:
    args, base, record = start(__doc__, VARIANTS, "laser_bypass_llm.json", COMMON)
    torch.set_num_threads(2)
    if "sasrec_cosine" not in record["reference"]:
        record["reference"]["sasrec_cosine"] = {k: v for k, v in sasrec_cosine(base).items() if k in METRICS}
    laser_model.Laser.encode = bypass_llm
    for name in args.variant or list(VARIANTS):
        if name in record["variants"]:
            logging.info("%s: done already, skipping", name)
            continue
        change = VARIANTS[name]
        run = args.work / "bypass_llm" / name
        shutil.copytree(base, run, dirs_exist_ok=True)
        config = load_config(args.config, llm=COMMON["llm"], laser={**COMMON["laser"], **change.get("laser", {})},
                             mformer={**COMMON["mformer"], **change.get("mformer", {})})
        started = time.perf_counter()
        if change.get("joint"):
            metrics = train_joint(run, config)
        else:
            train_laser(run, config, overwrite=True)
            metrics = evaluate_run(run, model="laser")["metrics"]
        record["variants"][name] = {"changes": change, "test": {k: metrics[k] for k in METRICS},
                                    "seconds": round(time.perf_counter() - started)}
        save(args.results, record)
        logging.info("%s: test %s", name, record["variants"][name]["test"])


if __name__ == "__main__":
    main()
