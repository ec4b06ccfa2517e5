"""Seconds per Laser training step (the user side), `laser.cf_position = "prefix"` against `"after_text"`.

    python benchmarks/cf_position_speed.py [--llm tiny|PATH.gguf] [--steps 6] [--text-tokens 300]

One step is what `train_laser` runs per batch: the M-Former over the frozen SASRec, the user encoding
(`Laser.training_forward`: the whole sequence with "prefix"; the text's keys/values without gradients, then the
prefix and suffix positions over them, with "after_text"), the loss against a fixed item matrix, backward and the
AdamW step. The two positions alternate step by step, so load from other processes hits both alike; wall-clock
and CPU seconds are recorded (minimum and median). Inputs are random: token ids (rows `--text-tokens` long, a
tenth of it left padding in all rows but the first, as in a length-sorted batch), histories and an untrained
SASRec; the speed does not depend on their values. The script also records how far the cached path's embeddings
are from the full-sequence forward, and the text keys/values held per user.
Results go to benchmarks/results/cf_position_speed.json, one entry per LLM and dtype (replaced when
re-run).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from sasrec_s3rec import machine

from laser_batch.config import LaserConfig, LLMConfig, MFormerConfig, SASRecConfig
from laser_batch.files import atomic_write
from laser_batch.llm import load_llm
from laser_batch.model import Laser
from laser_batch.sasrec import SASRec

HERE = Path(__file__).resolve().parent
POSITIONS = ("prefix", "after_text")
NUM_ITEMS = 1000  # catalogue rows of the loss: a few KFLOP per user, the same for both positions


def build(llm, position: str, seed: int) -> tuple[Laser, torch.optim.Optimizer]:
    """A default-config Laser with `cf_position = position` (same initial weights for both) and its optimizer."""
    torch.manual_seed(seed)
    sasrec = SASRec(SASRecConfig(), NUM_ITEMS)
    model = Laser(LaserConfig(cf_position=position), MFormerConfig(), llm, sasrec).train()
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)


def step(model: Laser, optimizer: torch.optim.Optimizer, batch: tuple, items: torch.Tensor,
         targets: torch.Tensor) -> tuple[float, float]:
    """One training step, as `train_laser._train_epoch` runs it; returns its (wall, CPU) seconds."""
    wall, cpu = time.perf_counter(), time.process_time()
    users, lb_loss = model.training_forward(*batch)
    model.loss(users, items, targets, lb_loss).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - wall, time.process_time() - cpu


def measure(llm, *, batch_size: int, text_tokens: int, steps: int, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    vocab = llm.model.get_input_embeddings().num_embeddings
    history_len = SASRecConfig().max_len
    batch = (torch.randint(1, NUM_ITEMS + 1, (batch_size, history_len), generator=gen),
             torch.randint(0, vocab, (batch_size, text_tokens), generator=gen),
             torch.ones(batch_size, text_tokens, dtype=torch.long))
    batch[2][1:, : text_tokens // 10] = 0  # some left padding, as in a length-sorted batch
    items = torch.nn.functional.normalize(torch.randn(NUM_ITEMS, llm.hidden_size, generator=gen), dim=-1)
    targets = torch.randint(1, NUM_ITEMS + 1, (batch_size,), generator=gen)
    models = {p: build(llm, p, seed) for p in POSITIONS}

    after, _ = models["after_text"]
    after.eval()  # no dropout, so that both paths compute the same function
    with torch.no_grad():
        full, _ = after(*batch)
        cached, _ = after.training_forward(*batch)
        text = after.encode_text(batch[1], batch[2])
    after.train()
    kv_bytes = sum(t.numel() * t.element_size() for layer in text.cache.layers for t in (layer.keys, layer.values))

    times = {p: [] for p in POSITIONS}
    for i in range(steps + 1):  # the first step of each is a warm-up
        for p in POSITIONS:
            t = step(*models[p], batch, items, targets)
            if i:
                times[p].append(t)
    wall = {p: [w for w, _ in v] for p, v in times.items()}
    cpu = {p: [c for _, c in v] for p, v in times.items()}
    summary = {f"{name}_{stat.__name__}": {p: round(stat(v[p]), 4) for p in POSITIONS}
               for name, v in (("wall", wall), ("cpu", cpu)) for stat in (min, statistics.median)}
    return {
        "seconds_per_step": summary,
        # wall-clock minimum: the step without interference from other processes; CPU seconds: less sensitive to it
        "speedup_after_text": {k: round(v["prefix"] / v["after_text"], 2) for k, v in summary.items()},
        "all_wall_seconds": {p: [round(s, 4) for s in v] for p, v in wall.items()},
        "cached_vs_full_max_abs_diff": float((cached - full).abs().max()),
        "cached_vs_full_min_cosine": float((cached * full).sum(-1).min()),
        "text_kv_bytes_per_user": kv_bytes // batch_size,
        "text_kv_bytes_per_token": kv_bytes // (batch_size * text_tokens),
        "trained_positions": after.mformer_config.num_queries + after.config.num_suffix_tokens,
        "llm": llm.describe(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llm", default="tiny", help="LLM source (tiny, a .gguf file, a directory)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--batch-size", type=int, default=LaserConfig().batch_size)
    parser.add_argument("--text-tokens", type=int, default=300)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per position, after one warm-up step")
    # One thread: its CPU seconds are the step's compute, whatever else the (shared) machine runs; with two, a
    # thread waiting at a barrier for a descheduled partner spins and counts.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", type=Path, default=HERE / "results" / "cf_position_speed.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    llm = load_llm(LLMConfig(source=args.llm, dtype=args.dtype))
    run = measure(llm, batch_size=args.batch_size, text_tokens=args.text_tokens, steps=args.steps, seed=args.seed)
    run.update(command=" ".join([Path(sys.executable).name, *sys.argv]), machine=machine(),
               load_average=[round(x, 2) for x in os.getloadavg()],
               config={"batch_size": args.batch_size, "text_tokens": args.text_tokens, "steps": args.steps,
                       "llm_dtype": args.dtype, "threads": args.threads, "num_items": NUM_ITEMS,
                       "laser": "LaserConfig() defaults", "mformer": "MFormerConfig() defaults"})
    record = json.loads(args.results.read_text()) if args.results.exists() else {"runs": {}}
    record["runs"][f"{Path(args.llm).name} {run['llm']['dtype']}"] = run
    atomic_write(args.results, lambda path: path.write_text(json.dumps(record, indent=2) + "\n"))
    print(json.dumps({k: run[k] for k in ("seconds_per_step", "speedup_after_text", "cached_vs_full_min_cosine")}))


if __name__ == "__main__":
    main()
