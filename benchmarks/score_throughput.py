"""Scoring throughput: our ONNX Runtime scorer (each artefact variant) vs PyTorch reference scorers, same users.

    python benchmarks/score_throughput.py [--threads 2] [--users 256] [--scaling 10000 100000 1000000]

- smollm2: the best trained SmolLM2-135M Laser (default: Scientific's run_laser_text of
  benchmarks/laser_scientific.py) and its artefacts from `laser-batch export` with the quantised variants (their
  quality gate is read from the manifest); held-out (test-split) users. `--section NAME` stores this comparison
  under another key (another machine, or another run: say which with `--note`). PyTorch references are built
  from the trained torch modules and the Hugging Face LLM: eager fp32, eager with bf16 weights, and torch.compile
  (inductor, freezing) with bf16 weights. Every scorer embeds the same users in the same length-grouped batches;
  users/s counts the user embedding and the cosine scores against the whole item matrix. Top-10 agreement is
  against torch fp32. The CPU's model name and flags (AVX-512 BF16 / VNNI, AMX) are recorded with it.
- tiny: the same with a Laser run on the synthetic example and the embedded tiny LLM.
- scaling: `laser-batch score` (a fresh process each) on 10k / 100k / 1M synthetic users with the tiny artefacts:
  users/s and peak RSS, at each `--max-batch-tokens` given (default: the scorer's default only). `--scaling-model
  sasrec` scores with the SASRec-only artefacts of the same tiny run (the same streaming job, reading, dedup and
  writing, without the LLM), for sizes the LLM makes slow (tiny Laser on 2 AMD EPYC cores: ~400 users/s).

Writes benchmarks/results/score_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from sasrec_s3rec import machine

from laser_batch.score import DEFAULT_MAX_BATCH_TOKENS

HERE = Path(__file__).resolve().parent
WORK = HERE / "work"


def _batches(lengths: np.ndarray, batch_size: int) -> list[np.ndarray]:
    order = np.argsort(lengths, kind="stable")
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def _top10(users: np.ndarray, items: np.ndarray) -> np.ndarray:
    from laser_batch.metrics import top_k

    return top_k(users @ items.T, 10)[0]


def _agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean([set(x) == set(y) for x, y in zip(a.tolist(), b.tolist(), strict=True)]))


def cpu_flags() -> dict:
    """The CPU's model name and the flags that decide bf16 / int8 speed (AVX-512 BF16 and VNNI, AMX tiles)."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    flags = set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "")
    wanted = sorted({"avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8"}
                    | {f for f in flags if f.startswith("amx")})
    return {"model_name": model, **{flag: flag in flags for flag in wanted}}


def compare(run: Path, artifacts: Path, users: int, threads: int, batch_size: int) -> dict:
    """Users/s of torch eager fp32 / bf16 / compiled bf16 and of every ORT variant, on the same users, with each
    variant's quality gate from the export (exporters/gate.py) and `recommended_cpu_variant`."""
    import torch

    from laser_batch.artifacts import Embedder
    from laser_batch.checkpoint import load_laser, read_run_info
    from laser_batch.config import TextConfig
    from laser_batch.contracts import load_data_dir
    from laser_batch.encode import laser_inputs
    from laser_batch.exporters.validate import sample
    from laser_batch.llm import LLMConfig, load_llm
    from laser_batch.sequences import build_sequences

    torch.set_num_threads(threads)
    dataset = load_data_dir(read_run_info(run)["data_dir"])
    sequences = build_sequences(dataset.interactions)
    histories, _ = sample(*sequences.split("test"), users)
    embedder = Embedder(artifacts, device="cpu", threads=threads, variant="fp32")
    item_matrix = np.load(artifacts / "item_matrix.npy").astype(np.float32)
    batches = _batches(embedder.text.lengths(histories), batch_size)
    encoder = embedder.manifest["graphs"]["user_encoder"]
    out: dict = {"model": str(run), "artifacts": str(artifacts), "users": len(histories), "batch_size": batch_size,
                 "recommended_cpu_variant": encoder.get("recommended_cpu_variant"),
                 "recommended_reason": encoder.get("recommended_reason"), "cpu_flags": cpu_flags(),
                 "gate": {k: v for k, v in encoder.get("gate", {}).items() if k != "torch_bf16"}}

    def timed(embed) -> tuple[np.ndarray, float]:
        embed([histories[i] for i in batches[0]])  # warm-up (and compilation)
        result = None
        started = time.perf_counter()
        for rows in batches:
            vectors = embed([histories[i] for i in rows])
            if result is None:
                result = np.empty((len(histories), vectors.shape[1]), dtype=np.float32)
            result[rows] = vectors
            _ = result[rows] @ item_matrix.T
        return result, len(histories) / (time.perf_counter() - started)

    manifest = embedder.manifest
    source = manifest["settings"]["llm"]["source"]
    model, _, config = load_laser(run, llm=load_llm(LLMConfig(source=source, dtype=manifest["settings"][
        "trained_llm_dtype"])))
    inputs = laser_inputs(model.llm, dataset.items, sequences, TextConfig(**config["text"]),
                          model.sasrec.config.max_len)

    def torch_embed(histories_batch):  # the user vectors the item matrix scores, as the ORT scorer makes them
        with torch.no_grad():
            users = model(*inputs.users(histories_batch))[0].float()
            if model.fused:
                users = model.fused_users(users, inputs.id_history(histories_batch))
            return users.numpy()

    model.llm.model.float()
    reference, out["torch_fp32_users_per_s"] = timed(torch_embed)
    model.llm.model.to(torch.bfloat16)
    bf16, out["torch_bf16_users_per_s"] = timed(torch_embed)
    out["torch_bf16_top10_agreement"] = _agreement(_top10(reference, item_matrix), _top10(bf16, item_matrix))
    if "torch_bf16" in encoder.get("gate", {}):
        out["torch_bf16_gate"] = _gate_row(encoder["gate"]["torch_bf16"])
    try:
        import torch._inductor.config as inductor

        inductor.freezing = True
        compiled = torch.compile(model.llm.model, dynamic=True)
        eager = model.llm.model
        model.llm.model = compiled
        _, out["torch_compile_bf16_users_per_s"] = timed(torch_embed)
        model.llm.model = eager
    except Exception as e:  # report, do not hide: compilation needs a C++ toolchain
        out["torch_compile_bf16_users_per_s"] = None
        out["torch_compile_error"] = str(e).splitlines()[0][:300]
    reference_top = _top10(reference, item_matrix)
    out["ort"] = []
    variants = ["fp32", *(name for name, v in encoder.get("variants", {}).items()
                          if "file" in v)]  # not the schemes skipped for this LLM
    for variant in variants:
        ort = Embedder(artifacts, device="cpu", threads=threads, variant=variant, verify=False)
        got, speed = timed(ort.embed)
        row = {"variant": variant, "users_per_s": round(speed, 2),
               "top10_agreement": _agreement(reference_top, _top10(got, item_matrix))}
        if variant == "fp32":
            row.update(non_inferior=True, ndcg10_diff_ci95=[0.0, 0.0], hit_changes=0, top10_overlap=1.0)
        elif "gate" in encoder["variants"][variant]:  # exports before the quality gate have none
            row.update(_gate_row(encoder["variants"][variant]["gate"]))
            row["export_speedup_vs_fp32"] = encoder["variants"][variant]["speedup_vs_fp32"]
        out["ort"].append(row)
    fp32_speed = out["ort"][0]["users_per_s"]
    for row in out["ort"]:
        row["speedup_vs_ort_fp32"] = round(row["users_per_s"] / fp32_speed, 3)
    chosen = out["recommended_cpu_variant"] or "fp32"
    speed = next(r["users_per_s"] for r in out["ort"] if r["variant"] == chosen)
    out["recommended_vs"] = {"ort_fp32": round(speed / fp32_speed, 3),
                             "torch_bf16": round(speed / out["torch_bf16_users_per_s"], 3),
                             **({"torch_compile_bf16": round(speed / out["torch_compile_bf16_users_per_s"], 3)}
                                if out.get("torch_compile_bf16_users_per_s") else {})}
    real = padded = 0
    for rows in batches:
        mask = embedder.feeds([histories[i] for i in rows])["attention_mask"]
        real, padded = real + int(mask.sum()), padded + mask.size
    out["padding_efficiency"] = round(real / padded, 4)
    for key in ("torch_fp32_users_per_s", "torch_bf16_users_per_s", "torch_compile_bf16_users_per_s"):
        if out.get(key) is not None:
            out[key] = round(out[key], 2)
    return out


def _gate_row(gate: dict) -> dict:
    """A variant's quality gate as the benchmark's row shows it."""
    return {"non_inferior": gate["non_inferior"], "ndcg10_diff": round(gate["ndcg10_diff"], 5),
            "ndcg10_diff_ci95": [round(x, 5) for x in gate["ndcg10_diff_ci95"]],
            "non_inferiority_bar": round(gate["non_inferiority_bar"], 5), "hit_changes": gate["hit_changes"],
            "top10_overlap": round(gate["top10_overlap"], 4), "pairs": gate["pairs"]}


def tiny_run(work: Path, threads: int, *, laser: bool = True) -> tuple[Path, Path]:
    """A Laser run on the synthetic example with the tiny LLM, exported (with quantised variants) to `artifacts`;
    its SASRec stage exported alone to `artifacts_sasrec`. `laser=False`: the SASRec stage only."""
    from laser_batch.config import load_config
    from laser_batch.examples.synthetic import write_example
    from laser_batch.exporters.export import export_run
    from laser_batch.train import train_sasrec
    from laser_batch.train_laser import train_laser

    run, artifacts = work / "run", work / "artifacts"
    config = load_config(HERE.parent / "examples" / "laser.toml", train={"threads": threads})
    if not (run / "sasrec" / "config.json").exists():
        write_example(work / "data", users=1000, items=400, seed=0)
        train_sasrec(work / "data", run, config, overwrite=True)
    if not (work / "artifacts_sasrec" / "manifest.json").exists():
        export_run(run, work / "artifacts_sasrec", model="sasrec", threads=threads, overwrite=True)
    if laser and not (artifacts / "manifest.json").exists():
        train_laser(run, config, overwrite=True)
        export_run(run, artifacts, quantize=["int8"], threads=threads, overwrite=True)
    return run, artifacts


def scaling(artifacts: Path, work: Path, sizes: list[int], threads: int, max_batch_tokens: int) -> list[dict]:
    """`laser-batch score` on synthetic users in a fresh process each: users/s and peak RSS."""
    model = json.loads((artifacts / "manifest.json").read_text())["kind"]
    import polars as pl

    item_ids = pl.read_parquet(artifacts / "item_ids.parquet")["item_id"].to_numpy()
    rows = []
    for size in sizes:
        path = work / f"users_{size}.parquet"
        if not path.exists():
            rng = np.random.default_rng(size)
            lengths = rng.integers(3, 30, size=size)
            flat = item_ids[rng.integers(0, len(item_ids), size=int(lengths.sum()))]
            offsets = np.concatenate([[0], np.cumsum(lengths)])
            history = pl.Series("history", [flat[offsets[i]:offsets[i + 1]] for i in range(size)])
            pl.DataFrame({"user_id": np.arange(size), "history": history}).write_parquet(path, row_group_size=50_000)
        # Peak memory: VmHWM of the child since its exec, not ru_maxrss, which Linux carries over execve from the
        # forking parent (this process, with torch and a 1M-user DataFrame, would set the floor).
        code = ("import json, sys; from laser_batch.score import score_users; "
                f"s = score_users({str(path)!r}, {str(artifacts)!r}, {str(work / f'recs_{size}')!r}, "
                f"threads={threads}, max_batch_tokens={max_batch_tokens}, overwrite=True); "
                "s['peak_rss_mb'] = next(int(l.split()[1]) for l in open('/proc/self/status') "
                "if l.startswith('VmHWM:')) / 1024; print(json.dumps(s))")
        done = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
        summary = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append({"users": size, "model": model, "seconds": summary["seconds"],
                     "max_batch_tokens": max_batch_tokens, "users_per_s": summary["users_per_second"],
                     "peak_rss_mb": round(summary["peak_rss_mb"], 1),
                     "padding_efficiency": summary["padding_efficiency"], "provider": summary["provider"]})
        logging.info("scaling %s", rows[-1])
    return rows


def _scaling_key(row: dict) -> tuple:
    """A scaling row replaces an earlier one of the same size, model and token budget."""
    return row["users"], row.get("model", "laser"), row["max_batch_tokens"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=WORK / "Scientific" / "run_laser_text")
    parser.add_argument("--artifacts", type=Path, default=WORK / "Scientific" / "artifacts")
    parser.add_argument("--users", type=int, default=384)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--scaling", type=int, nargs="*", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--max-batch-tokens", type=int, nargs="*", default=[DEFAULT_MAX_BATCH_TOKENS],
                        help="token budgets for the scaling runs (a huge one: batches bounded by users only)")
    parser.add_argument("--scaling-model", choices=["laser", "sasrec"], default="laser",
                        help="artefacts of the tiny run to score the scaling users with")
    parser.add_argument("--skip", action="append", choices=["smollm2", "tiny", "scaling"], default=[])
    parser.add_argument("--results", type=Path, default=HERE / "results" / "score_throughput.json")
    parser.add_argument("--section", default="smollm2", help="the key the SmolLM2 comparison is stored under")
    parser.add_argument("--note", help="stored with the SmolLM2 comparison: why this run, what differs")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    record = json.loads(args.results.read_text()) if args.results.exists() else {}
    record.update(command=" ".join([Path(sys.executable).name, *sys.argv]), machine=machine())

    command = record["command"]
    commands = record.setdefault("commands", {})  # which run wrote each section (runs may do only some)
    machines = record.setdefault("machines", {})  # and on which machine

    def save() -> None:  # after every section, so a long run keeps what it measured
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(record, indent=2) + "\n")

    if "smollm2" not in args.skip:
        section = args.section
        record[section] = compare(args.run, args.artifacts, args.users, args.threads, args.batch_size)
        if args.note:
            record[section]["note"] = args.note
        logging.info("%s %s", section, record[section])
        commands[section] = command
        machines[section] = record["machine"]
        save()
    tiny_work = WORK / "score_tiny"
    if "tiny" not in args.skip or "scaling" not in args.skip:
        laser = "tiny" not in args.skip or args.scaling_model == "laser"
        run, artifacts = tiny_run(tiny_work, args.threads, laser=laser)
    if "tiny" not in args.skip:
        record["tiny"] = compare(run, artifacts, args.users, args.threads, args.batch_size)
        logging.info("tiny %s", record["tiny"])
        commands["tiny"] = command
        machines["tiny"] = record["machine"]
        save()
    if "scaling" not in args.skip:
        scaling_artifacts = artifacts if args.scaling_model == "laser" else tiny_work / "artifacts_sasrec"
        commands["scaling"] = command
        machines["scaling"] = record["machine"]
        for size in args.scaling:
            for budget in args.max_batch_tokens:
                new = scaling(scaling_artifacts, tiny_work, [size], args.threads, budget)
                new[0]["cpu"] = record["machine"]["cpu"]  # rows of several runs are kept
                record["scaling"] = [row for row in record.get("scaling", [])
                                     if _scaling_key(row) != _scaling_key(new[0])] + new
                save()


if __name__ == "__main__":
    main()
