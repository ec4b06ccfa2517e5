"""How exact must a user embedding be to keep its top-10? The bound behind the 98%-agreement targets.

    python benchmarks/diagnostics/topk_sensitivity.py --run benchmarks/work/ml100k_soft_lowlr/run_laser_no_moe \
        [--users 256]

Any faster encoder (bf16 weights, int8 weights or activations) returns a user embedding at some cosine c < 1 from
the fp32 one; whether that keeps the user's top-10 depends on how close the 10th and 11th items score. This
measures it on held-out (test-split) users of a trained run, for the Laser model and, as a reference, for the
run's SASRec:

- `bf16`: Laser with the LLM's weights in bf16 (the eager-bf16 PyTorch scorer) against fp32: embedding cosine and
  top-10 agreement (same set; mean overlap = the share of the 10 items kept);
- `weight_int8`: Laser with every linear layer of the LLM fake-quantised block-wise (symmetric 8-bit, blocks of 32
  along the input dimension, as `MatMulNBits` lays them out; scale = block absmax / 127, ONNX Runtime's rounding
  convention may differ by a step) and computed in fp32: `nbits8`'s arithmetic at an fp32 `accuracy_level`, the
  most exact 8-bit scheme (int8 compute adds activation rounding on top); no centre
  re-calibration;
- `noise`: each user embedding moved to cosine c from itself in a random direction (isotropic, 5 seeds), for c from
  0.99 to 0.999999: the top-10 agreement at each c, so a variant's measured cosine predicts its agreement, and
  the smallest c that keeps 98% of top-10 sets (or items);
- `gap`: the score gap between each user's 10th and 11th item, in units of the spread of that user's scores.

Writes benchmarks/results/topk_sensitivity.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

BENCHMARKS = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(BENCHMARKS))  # run as a script: the benchmark scripts' shared helpers live one level up
from sasrec_s3rec import machine  # noqa: E402

COSINES = (0.99, 0.995, 0.999, 0.9995, 0.9999, 0.99995, 0.99999, 0.999999)
SEEDS = 5
TARGET = 0.98


def _top10(users: np.ndarray, items: np.ndarray) -> np.ndarray:
    """(B, 10) item rows of the best scores, best first (the package's top-K on users @ items.T)."""
    from laser_batch.metrics import top_k

    return top_k(users @ items.T, 10)[0]


def perturbed(users: np.ndarray, cosine: float, rng: np.random.Generator) -> np.ndarray:
    """Each row moved to exactly `cosine` from itself, in a random direction, keeping its norm."""
    noise = rng.standard_normal(users.shape)
    unit = users / np.linalg.norm(users, axis=1, keepdims=True)
    noise -= (noise * unit).sum(1, keepdims=True) * unit  # orthogonal to the row
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    angle = np.arccos(cosine)
    return np.linalg.norm(users, axis=1, keepdims=True) * (np.cos(angle) * unit + np.sin(angle) * noise)


def fake_quantize_linear_weights(model, bits: int = 8, block: int = 32) -> dict:
    """Round every nn.Linear weight of `model` in place to symmetric `bits`-bit blocks of `block` input columns
    (scale = block absmax / (2**(bits-1) - 1)); returns {module: original weight} to put back."""
    import torch

    top = 2 ** (bits - 1) - 1
    originals = {}
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            w = originals[module] = module.weight.data
            blocks = w.reshape(w.shape[0], -1, block)
            scale = blocks.abs().amax(-1, keepdim=True).clamp_min(1e-12) / top
            module.weight.data = ((blocks / scale).round().clamp(-top, top) * scale).reshape(w.shape)
    return originals


def sweep(users: np.ndarray, items: np.ndarray) -> dict:
    from laser_batch.exporters.validate import agreement

    reference = _top10(users, items)
    rows = []
    for cosine in COSINES:
        runs = [agreement(reference, _top10(perturbed(users, cosine, np.random.default_rng(seed)), items))
                for seed in range(SEEDS)]
        rows.append({"cosine": cosine, **{k: round(float(np.mean([r[k] for r in runs])), 4) for k in runs[0]}})
    needed = {key: next((r["cosine"] for r in rows if r[key] >= TARGET), None) for key in ("same_set", "mean_overlap")}
    scores = users @ items.T
    top = -np.sort(-scores, axis=1)[:, :11]
    gap = (top[:, 9] - top[:, 10]) / scores.std(1)
    return {"rows": rows, f"cosine_needed_for_{TARGET}": needed,
            "gap_10_11_in_score_std": {"median": round(float(np.median(gap)), 5),
                                       "p10": round(float(np.quantile(gap, 0.1)), 5)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="a Laser run directory (benchmarks/laser_ml100k.py)")
    parser.add_argument("--users", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--results", type=Path, default=BENCHMARKS / "results" / "topk_sensitivity.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    import torch

    from laser_batch.checkpoint import SASREC_DIR, load_laser, load_sasrec, read_run_info
    from laser_batch.config import TextConfig
    from laser_batch.contracts import load_data_dir
    from laser_batch.encode import encode_users, laser_inputs
    from laser_batch.exporters.validate import agreement, compare, sample
    from laser_batch.sequences import build_sequences, pad_left

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    dataset = load_data_dir(read_run_info(args.run)["data_dir"])
    sequences = build_sequences(dataset.interactions)
    histories, _ = sample(*sequences.split("test"), args.users)
    model, item_matrix, config = load_laser(args.run)
    inputs = laser_inputs(model.llm, dataset.items, sequences, TextConfig(**config["text"]),
                          model.sasrec.config.max_len)
    items = item_matrix.numpy()
    batch = config["laser"]["item_batch_size"]
    with torch.no_grad():
        model.llm.model.float()
        fp32 = encode_users(model, inputs, histories, batch_size=batch).numpy()
        originals = fake_quantize_linear_weights(model.llm.model)
        weight_int8 = encode_users(model, inputs, histories, batch_size=batch).numpy()
        for module, weight in originals.items():
            module.weight.data = weight
        model.llm.model.to(torch.bfloat16)
        bf16 = encode_users(model, inputs, histories, batch_size=batch).float().numpy()
        sasrec, _ = load_sasrec(args.run / SASREC_DIR)
        width = min(sasrec.config.max_len, max(len(h) for h in histories))
        sasrec_users = sasrec(torch.from_numpy(pad_left(histories, width)))[:, -1].numpy()
        sasrec_items = sasrec.item_vectors().numpy()
    record = {
        "run": str(args.run), "users": len(histories), "seeds": SEEDS,
        "laser": {
            "bf16_vs_fp32": {**compare(fp32, bf16),
                             "top10": agreement(_top10(fp32, items), _top10(bf16, items))},
            "weight_int8_vs_fp32": {**compare(fp32, weight_int8),
                                    "top10": agreement(_top10(fp32, items), _top10(weight_int8, items))},
            **sweep(fp32, items),
        },
        "sasrec": sweep(sasrec_users, sasrec_items),
        "seconds": round(time.perf_counter() - started, 1),
        "command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": machine(),
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(record, indent=2) + "\n")
    logging.info("%s", json.dumps({k: record[k] for k in ("laser", "sasrec")})[:2000])


if __name__ == "__main__":
    main()
