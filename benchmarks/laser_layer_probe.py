"""Pick `llm.num_layers` for SmolLM2-135M by measurement: training cost and quality at several N (issue 22, 2a).

    python benchmarks/laser_layer_probe.py timing [--layers 4 8 12 16 20 30] [--rounds 8]
    python benchmarks/laser_layer_probe.py probe
    python benchmarks/laser_layer_probe.py laser [--layers 8 30 4 16] [--epochs 1]

Data, LLM and config as benchmarks/laser_ml100k.py: ML-100K and SmolLM2-135M (GGUF) fetched at run time, one
SASRec trained with benchmarks/configs/laser_ml100k.toml, and Laser with that config plus `llm.num_layers = N`.

- timing: SmolLM2 loaded once and cut to each N by `keep_first_layers` (what `llm.num_layers = N` does), a fresh
  Laser per N, and `--rounds` rounds; a round measures at every N in turn one training step (the user side forward,
  cross-entropy against a catalogue matrix, backward, AdamW step; training's shuffled length pools, the config's
  batch size; the same batch at every N), one no-grad batch of items and one of validation users (the config's
  item batch size). The cores are shared, so rounds interleave the N and both the fastest and the median repetition
  are kept. The stage-1 epoch estimate is training samples / batch x step + catalogue / item batch x item batch +
  validation users / item batch x user batch.
- probe: a linear probe on the suffix state at every depth from ONE pass of the full model: the text template plus
  the suffix token (Laser's initial suffix, the EOS embedding; no prefix), hidden states after each block captured at
  the suffix position, and the final norm applied (exactly what `num_layers = N` computes, tests/test_llm_layers.py).
  Per N, a shared linear map (width -> `PROBE_WIDTH`) is trained for `PROBE_STEPS` full-batch AdamW steps on the
  training targets (each user's last training item, from the history before it) with Laser's loss (centred cosine /
  tau, softmax over the catalogue); reported: validation HR@10 / NDCG@10 / MRR (full ranking, history excluded).
  This measures how much the frozen layers' suffix state says about the next item when only a small head is
  trained, not what a trained prefix and suffix can draw out of them.
- laser: per N, a short Laser run (`--epochs` of stage 1, no stage 2, one target per user, 300 validation users):
  the trained suffix state itself, at the price of a backward pass through N blocks per step.

Resumable: each result (a timing round, the probe, a Laser run per N) is stored in
benchmarks/results/laser_layer_probe.json as soon as it finishes; the probe and finished Laser runs are skipped on
the next start; a Laser run interrupted mid-epoch restarts its epoch (train --resume).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from laser_ml100k import HERE, METRICS, save
from sasrec_s3rec import machine

from laser_batch.config import load_config
from laser_batch.convert import convert
from laser_batch.llm import fingerprint, keep_first_layers, load_llm
from laser_batch.metrics import metrics_from_ranks, rank_targets
from laser_batch.sequences import length_batches
from laser_batch.train import train_sasrec
from laser_batch.train_laser import build_laser, train_laser, training_samples
from laser_batch.training import seed_everything

LAYERS = (4, 8, 12, 16, 20, 30)
PROBE_WIDTH, PROBE_STEPS, PROBE_LR, PROBE_TAU = 128, 300, 3e-3, 0.2
SHORT_RUN = {"stage2_epochs": 0, "samples_per_user": 1, "valid_users": 300}
NOTES = [
    "SASRec: trained once with the config, its time capped by --sasrec-minutes (sasrec.max_minutes) to fit the "
    "budget; the same frozen SASRec under every N.",
    "timing: on 2 cores shared with other sessions; 'fastest' is the least disturbed round, 'median' shows the "
    "disturbance; the stage-1 epoch estimate uses the config's laser.samples_per_user.",
    "probe: validation users, full ranking, history excluded; no prefix, the untrained suffix (EOS embedding); "
    "a linear head trained on each user's last training item.",
    "laser: capped to laser.stage1_epochs = --epochs, one target per user, no stage 2 and 300 validation users to fit "
    "about 40 minutes for all N; one epoch is far from converged, so this compares how fast each depth learns, not "
    "where it ends.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=["timing", "probe", "laser"])
    parser.add_argument("--layers", type=int, nargs="+", default=list(LAYERS))
    parser.add_argument("--llm", help="LLM source; default: SmolLM2-135M-Instruct GGUF fetched at run time")
    parser.add_argument("--work", type=Path, default=HERE / "work" / "ml100k")
    parser.add_argument("--tools", type=Path, default=HERE.parent.parent / "shared" / "tools",
                        help="the directory of fetch-ml100k.sh and fetch-smollm2.sh")
    parser.add_argument("--config", type=Path, default=HERE / "configs" / "laser_ml100k.toml")
    parser.add_argument("--results", type=Path, default=HERE / "results" / "laser_layer_probe.json")
    parser.add_argument("--sasrec-minutes", type=float, default=0.0,
                        help="cap SASRec's training time (train.max_minutes; 0: the config's own)")
    parser.add_argument("--rounds", type=int, default=8, help="timing: measurement rounds over all N")
    parser.add_argument("--epochs", type=int, default=1, help="laser: stage-1 epochs per short run")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    llm = args.llm or str(next(fetch(args.tools / "fetch-smollm2.sh", args.work / "smollm2").glob("*.gguf")))
    raw = fetch(args.tools / "fetch-ml100k.sh", args.work / "raw")
    sasrec_cap = {"max_minutes": args.sasrec_minutes} if args.sasrec_minutes else {}
    base = prepare(raw, args.work, load_config(args.config, llm={"source": llm}, train=sasrec_cap))
    record = json.loads(args.results.read_text()) if args.results.exists() else {}
    sasrec = json.loads((base / "sasrec" / "config.json").read_text())
    record["sasrec"] = {**{k: sasrec.get(k) for k in ("best_epoch", "epochs_run", "stopped_by", "valid_metrics")},
                        "max_minutes": sasrec["train"]["max_minutes"] or None}
    record.update(machine=machine(), config=load_config(args.config, llm={"source": llm}).to_dict(),
                  config_file=str(args.config.relative_to(HERE.parent)), notes=NOTES)
    part = record.setdefault(args.part, {"results": {}})
    part.update(command=" ".join([Path(sys.executable).name, *sys.argv]), started=time.strftime("%Y-%m-%d %H:%M %Z"))
    if args.part == "probe":
        part.update(settings={"width": PROBE_WIDTH, "steps": PROBE_STEPS, "lr": PROBE_LR, "temperature": PROBE_TAU})
        if not part["results"]:
            part["results"] = probe_all_depths(args.config, llm, base)
        save(args.results, record)
        return
    if args.part == "timing":
        part["settings"] = {"rounds": args.rounds, "per_round": "1 training step, 1 item batch, 1 user batch per N"}

        def report(results: dict, rounds: int) -> None:
            part.update(results=results, rounds_done=rounds)
            save(args.results, record)
            logging.info("timing: round %d of %d done", rounds, args.rounds)

        time_layers(load_config(args.config, llm={"source": llm}), base, args.layers, args.rounds, report)
        return
    for n in args.layers:
        if str(n) in part["results"]:
            logging.info("laser N=%d: done already, skipping", n)
            continue
        config = load_config(args.config, llm={"source": llm, "num_layers": n},
                             laser={"stage1_epochs": args.epochs, **SHORT_RUN})
        part["settings"] = {"stage1_epochs": args.epochs, **SHORT_RUN}
        part["results"][str(n)] = short_laser_run(config, base, args.work / f"run_layers{n}")
        save(args.results, record)
        logging.info("laser N=%d: %s", n, part["results"][str(n)])


def fetch(script: Path, target: Path) -> Path:
    """Run one of the shared fetch scripts (they skip what is there already)."""
    subprocess.run(["bash", str(script), str(target)], check=True, capture_output=True)
    return target


def prepare(raw: Path, work: Path, config) -> Path:
    """ML-100K converted and a trained SASRec (the layout of benchmarks/laser_ml100k.py's work directory)."""
    data, base = work / "data", work / "run"
    if not (data / "card.json").exists():
        convert("recbole", [raw / "ml-100k.inter", raw / "ml-100k.item"], data)
    if not (base / "sasrec" / "config.json").exists():
        train_sasrec(data, base, config, overwrite=True)
    return base


def time_layers(config, base: Path, layers: list[int], rounds: int, report) -> None:
    """Seconds per training step and per no-grad encoding batch at every N, measured in interleaved rounds.

    The LLM is loaded once; each N gets a copy cut by `keep_first_layers` (what `llm.num_layers = N` does). The cores
    are shared with other work, so one round measures every N in turn (same batches), and `report(results, rounds)`
    gets the summary after each round: a disturbance then slows every N alike instead of one N's whole measurement.
    """
    torch.set_num_threads(config.train.threads)
    full = load_llm(config.llm)
    benches = {}
    for n in layers:
        model = copy.deepcopy(full.model)
        keep_first_layers(model, n, source=full.source)
        seed_everything(config.train.seed)  # the same M-Former and suffix at every N
        benches[n] = _StepTimer(config, base, dataclasses.replace(full, model=model, fingerprint=fingerprint(model)))
    del full
    for bench in benches.values():
        bench.measure(0, warm_up=True)
    for done in range(1, rounds + 1):
        for bench in benches.values():
            bench.measure(done)
        report({str(n): bench.summary() for n, bench in benches.items()}, done)


class _StepTimer:
    """One N: a fresh Laser on the truncated LLM, fixed training batches, and the seconds each measurement took."""

    def __init__(self, config, base: Path, llm) -> None:
        self.cfg = cfg = config.laser
        self.model, self.inputs, sequences = build_laser(config, base, llm)
        self.histories, self.targets = training_samples(sequences, cfg.samples_per_user, np.random.default_rng(0))
        self.lengths = self.inputs.text.lengths(self.histories)
        self.batches = length_batches(self.lengths, cfg.batch_size, rng=np.random.default_rng(0))
        self.items = F.normalize(torch.randn(sequences.num_items, llm.hidden_size,
                                             generator=torch.Generator().manual_seed(0)), dim=-1)  # values: no matter
        self.item_ids = np.arange(1, sequences.num_items + 1)
        self.valid = sequences.split("valid")[0]
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=cfg.lr)
        valid_users = min(cfg.valid_users or len(self.valid), len(self.valid))
        self.counts = {"training_steps": len(self.targets) / cfg.batch_size,
                       "item_batches": sequences.num_items / cfg.item_batch_size,
                       "valid_user_batches": valid_users / cfg.item_batch_size}
        self.epoch_parts = {"training_samples": len(self.targets), "items": sequences.num_items,
                            "valid_users": valid_users}
        self.seconds: dict[str, list[float]] = {"step": [], "item_batch": [], "user_batch": []}
        self.tokens: list[int] = []

    def measure(self, round_: int, *, warm_up: bool = False) -> None:
        """Round r: training batch r (forward, loss, backward, AdamW step), item batch r and user batch r."""
        cfg, model = self.cfg, self.model
        rows = self.batches[round_ % len(self.batches)]
        model.train()
        tick = time.perf_counter()
        users, lb_loss = model(*self.inputs.users([self.histories[r] for r in rows]))
        model.loss(users, self.items, torch.from_numpy(self.targets[rows]), lb_loss).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        step = time.perf_counter() - tick
        model.eval()
        with torch.no_grad():
            items = self.item_ids[round_ * cfg.item_batch_size:][: cfg.item_batch_size]
            tick = time.perf_counter()
            model(*self.inputs.items(items), items=True)
            item_batch = time.perf_counter() - tick
            users = self.valid[round_ * cfg.item_batch_size:][: cfg.item_batch_size]
            tick = time.perf_counter()
            model(*self.inputs.users(users))
            user_batch = time.perf_counter() - tick
        if not warm_up:
            for name, value in (("step", step), ("item_batch", item_batch), ("user_batch", user_batch)):
                self.seconds[name].append(round(value, 3))
            self.tokens.append(int(self.lengths[rows].max()) * len(rows))

    def summary(self) -> dict:
        llm = self.model.llm
        out = {
            "num_layers": llm.describe()["num_layers"],
            "llm_parameters": sum(p.numel() for p in llm.model.parameters()),
            "llm_bytes": sum(p.numel() * p.element_size() for p in llm.model.parameters()),
            "llm_dtype": llm.describe()["dtype"], "batch_size": self.cfg.batch_size,
            "item_batch_size": self.cfg.item_batch_size, "tokens_per_step": self.tokens,
            **{f"{name}_seconds": values for name, values in self.seconds.items()},
            "epoch_parts": self.epoch_parts,
        }
        # The fastest repetition is the least disturbed one; the median shows how much the shared cores disturbed.
        for name, pick in (("fastest", min), ("median", statistics.median)):
            step, item_batch, user_batch = (pick(self.seconds[k]) for k in ("step", "item_batch", "user_batch"))
            out[name] = {"seconds_per_step": step, "seconds_per_item_batch": item_batch,
                         "seconds_per_user_batch": user_batch, "estimated_seconds_per_stage1_epoch": round(
                             self.counts["training_steps"] * step + self.counts["item_batches"] * item_batch
                             + self.counts["valid_user_batches"] * user_batch, 1)}
        return out


def probe_all_depths(config_path: Path, llm_source: str, base: Path) -> dict:
    """Suffix states after every block from one full-depth pass, then a linear probe per depth (see the docstring)."""
    config = load_config(config_path, llm={"source": llm_source}, laser={"prefix": "none"})
    torch.set_num_threads(config.train.threads)
    seed_everything(config.train.seed)
    model, inputs, sequences = build_laser(config, base)
    model.eval()
    train_histories, train_targets = training_samples(sequences, 1, np.random.default_rng(0))
    valid_histories, valid_targets = sequences.split("valid")
    started, batch = time.perf_counter(), config.laser.item_batch_size
    item_ids = np.arange(1, sequences.num_items + 1)
    states = {
        "items": _states_by_depth(model, lambda rows: inputs.items(item_ids[rows]),
                                  inputs.text.lengths([np.array([i]) for i in item_ids]), batch),
        "train": _states_by_depth(model, lambda rows: inputs.users([train_histories[r] for r in rows]),
                                  inputs.text.lengths(train_histories), batch),
        "valid": _states_by_depth(model, lambda rows: inputs.users([valid_histories[r] for r in rows]),
                                  inputs.text.lengths(valid_histories), batch),
    }
    encode_seconds = time.perf_counter() - started
    results = {}
    for depth in range(1, states["items"].shape[0] + 1):
        head = _fit_probe(states["train"][depth - 1], states["items"][depth - 1], train_targets)
        with torch.no_grad():
            users, items = (head(states[split][depth - 1]) for split in ("valid", "items"))
            scores = (users @ items.T).numpy()
        ranks = rank_targets(lambda _, s=scores: s, valid_histories, valid_targets, batch_size=len(valid_targets))
        results[str(depth)] = {k: round(v, 4) for k, v in metrics_from_ranks(ranks, [10]).items() if k in METRICS}
        logging.info("probe depth %d: %s", depth, results[str(depth)])
    return {"encode_seconds_all_depths": round(encode_seconds), "users": len(valid_targets), "by_depth": results}


@torch.no_grad()
def _states_by_depth(model, make_inputs, lengths: np.ndarray, batch_size: int) -> torch.Tensor:
    """(depth, rows, D) float32: the final norm of the hidden state after each block, at the last (suffix) position."""
    blocks, norm = model.llm.model.layers, model.llm.model.norm
    captured: list[torch.Tensor] = []

    def keep_last(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        captured.append(norm(hidden[:, -1]).float())

    handles = [block.register_forward_hook(keep_last) for block in blocks]
    out = torch.empty(len(blocks), len(lengths), model.llm.hidden_size)
    try:
        for rows in length_batches(lengths, batch_size):
            captured.clear()
            model(*make_inputs(rows), raw=True)
            out[:, rows] = torch.stack(captured)
    finally:
        for handle in handles:
            handle.remove()
    return out


def _fit_probe(users: torch.Tensor, items: torch.Tensor, targets: np.ndarray) -> torch.nn.Module:
    """A shared linear map on centred states, trained with Laser's loss (cosine / tau over the whole catalogue)."""
    centre = items.mean(0)
    torch.manual_seed(0)
    linear = torch.nn.Linear(users.shape[1], PROBE_WIDTH)
    head = torch.nn.Sequential(_Centre(centre), linear, _Normalise())
    optimizer = torch.optim.AdamW(head.parameters(), lr=PROBE_LR, weight_decay=0.01)
    target = torch.from_numpy(targets - 1)
    for _ in range(PROBE_STEPS):
        loss = F.cross_entropy(head(users) @ head(items).T / PROBE_TAU, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return head.eval()


class _Centre(torch.nn.Module):
    def __init__(self, centre: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("centre", centre)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - self.centre


class _Normalise(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1)


def short_laser_run(config, base: Path, run: Path) -> dict:
    """A short Laser run at `config.llm.num_layers`; its validation metrics (the config's validation users)."""
    if not (run / "sasrec").exists():
        shutil.copytree(base, run, dirs_exist_ok=True)
    started = time.perf_counter()
    result = train_laser(run, config, resume=True, overwrite=True)
    epochs = [json.loads(line) for line in (result.checkpoint / "metrics.jsonl").read_text().splitlines()]
    return {"valid": {k: round(result.valid_metrics[k], 4) for k in METRICS if k in result.valid_metrics},
            "seconds_per_epoch": round(result.seconds_per_epoch, 1),
            "wall_seconds": round(time.perf_counter() - started),
            "trainable_parameters": result.trainable_parameters, "epochs": epochs}


if __name__ == "__main__":
    main()
