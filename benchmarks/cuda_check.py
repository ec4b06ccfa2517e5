"""CUDA checks of the scoring path, for a machine with an NVIDIA GPU (run once per lent GPU session).

Measured side by side, on the same users and artefacts, in one run:
- `laser-batch score` (the real job, `score_users`) on ONNX Runtime's CPU provider and on its CUDA provider, with and
  without I/O binding, for the fp32 export and the fp16 export (`laser-batch export --dtype fp16`): users/s, which
  provider the sessions really got, and how the CUDA outputs compare with the CPU fp32 job (same top-K set per user,
  mean overlap, largest score difference);
- user embeddings from the exported graphs (`Embedder`, CPU vs CUDA, fp32 and fp16) and from the same trained model in
  PyTorch on the GPU (eager fp32, eager bf16 autocast): cosine against ONNX Runtime CPU fp32, and users/s.

    python benchmarks/cuda_check.py --run runs/example --data runs/example-data --artifacts runs/example-artifacts \
        --artifacts-fp16 runs/example-artifacts-fp16 --out benchmarks/results/cuda_check.json

Every step records its error instead of stopping the script, so one failing part does not cost the others.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

REPEAT = 20  # the example has 1,000 users; the throughput runs score REPEAT copies of them under new ids (--repeat)


def _step(results: dict, name: str, fn) -> None:
    started = time.perf_counter()
    try:
        results[name] = fn()
    except Exception as e:  # noqa: BLE001 - a GPU check records what failed and goes on
        results[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                         "traceback": traceback.format_exc()[-2000:]}
    results[name + "_seconds"] = round(time.perf_counter() - started, 2)
    print(name, json.dumps(results[name])[:600], flush=True)


def machine() -> dict:
    import onnxruntime as ort

    info = {"python": platform.python_version(), "onnxruntime": ort.__version__,
            "ort_available_providers": ort.get_available_providers(), "cpu": platform.processor()}
    try:
        info["nvidia_smi"] = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout.strip()
    except OSError as e:
        info["nvidia_smi"] = str(e)
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception as e:  # noqa: BLE001
        info["torch"] = f"unavailable: {e}"
    return info


def users_file(data: Path, scratch: Path, repeat: int) -> Path:
    """REPEAT copies of the example's users (user_id, history) under new ids: a job big enough to time."""
    import pyarrow.fs as pafs

    from laser_batch.inputs import group_interactions

    grouped = scratch / "users-1.parquet"
    group_interactions(pafs.LocalFileSystem(), [str(data / "interactions.parquet")], str(grouped))
    users = pl.read_parquet(grouped).with_columns(pl.col("user_id").cast(pl.String))
    copies = [users.with_columns(user_id=pl.lit(f"r{r}-") + pl.col("user_id")) for r in range(repeat)]
    path = scratch / "users.parquet"
    pl.concat(copies).write_parquet(path)
    return path


def score_jobs(users: Path, artifacts: dict[str, Path], scratch: Path, cpu_only: bool) -> dict:
    from laser_batch.score import score_users

    configs = [("cpu_fp32", "fp32", "cpu", None)]
    if not cpu_only:
        configs += [("cuda_fp32_iobinding", "fp32", "cuda", True), ("cuda_fp32_no_iobinding", "fp32", "cuda", False),
                    ("cuda_fp16_iobinding", "fp16", "cuda", True), ("cuda_fp16_no_iobinding", "fp16", "cuda", False)]
    out, reference = {}, None
    for name, dtype, device, binding in configs:
        if dtype not in artifacts:
            continue
        record = {}
        try:
            for attempt in range(2):  # the second run is the measurement: sessions and CUDA kernels are warm
                target = scratch / f"recs-{name}"
                summary = score_users(users, artifacts[dtype], target, top_k=10, device=device, io_binding=binding,
                                      overwrite=True, chunk_size=100_000)
                record[f"run{attempt + 1}_users_per_second"] = summary["users_per_second"]
            record.update({k: summary[k] for k in ("users_scored", "provider", "providers", "io_binding",
                                                   "padding_efficiency", "seconds")})
            recs = pl.read_parquet(sorted(target.glob("part-*.parquet")))
            if reference is None:
                reference = recs
            record.update(compare_recs(reference, recs))
        except Exception as e:  # noqa: BLE001
            record["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        out[name] = record
        print(name, record, flush=True)
    return out


def compare_recs(reference: pl.DataFrame, recs: pl.DataFrame) -> dict:
    """Per user: same top-K set as the reference, overlap share; largest |score| difference at equal (user, rank)."""
    a = reference.group_by("user_id").agg(pl.col("item_id").sort().alias("a"))
    b = recs.group_by("user_id").agg(pl.col("item_id").sort().alias("b"))
    both = a.join(b, on="user_id", how="full", coalesce=True)
    same = both.select((pl.col("a") == pl.col("b")).fill_null(False)).to_series()
    overlap = both.select(pl.col("a").list.set_intersection("b").list.len() / pl.col("a").list.len()).to_series()
    ranks = reference.join(recs, on=["user_id", "rank"], suffix="_b")
    return {"users_compared": both.height, "same_top10_set": round(float(same.mean()), 4),
            "mean_top10_overlap": round(float(overlap.fill_null(0).mean()), 4),
            "max_score_diff": float((ranks["score"] - ranks["score_b"]).abs().max())}


def embeddings(run: Path, data: Path, artifacts: dict[str, Path], cpu_only: bool) -> dict:
    """Embeddings of the run's users (full histories) from ORT CPU / CUDA and from PyTorch on the GPU."""
    from laser_batch.artifacts import Embedder
    from laser_batch.contracts import load_data_dir
    from laser_batch.sequences import build_sequences, length_batches

    dataset = load_data_dir(data)
    sequences = build_sequences(dataset.interactions)
    histories = sequences.seqs
    out: dict = {"users": len(histories)}
    embedded: dict[str, np.ndarray] = {}
    runs = [("ort_cpu_fp32", "fp32", "cpu", False)]
    if not cpu_only:
        runs += [("ort_cuda_fp32", "fp32", "cuda", True), ("ort_cuda_fp16", "fp16", "cuda", True)]
    for name, dtype, device, binding in runs:
        try:
            embedder = Embedder(artifacts[dtype], device=device, io_binding=binding)
            lengths = embedder.text.lengths(histories)
            batches = length_batches(lengths, 64, max_tokens=8192)
            result = np.zeros((len(histories), embedder.user_encoder.get_outputs()[0].shape[-1]), dtype=np.float32)
            for _attempt in range(2):
                started = time.perf_counter()
                for rows in batches:
                    result[rows] = embedder.embed([histories[r] for r in rows])
                seconds = time.perf_counter() - started
            embedded[name] = result
            out[name] = {"users_per_second": round(len(histories) / seconds, 1), "provider": embedder.providers[0]}
        except Exception as e:  # noqa: BLE001
            out[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    if not cpu_only:
        try:
            out.update(torch_embeddings(run, dataset, sequences, histories, embedded))
        except Exception as e:  # noqa: BLE001
            out["torch"] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                            "traceback": traceback.format_exc()[-1500:]}
    reference = embedded.get("ort_cpu_fp32")
    for name, value in embedded.items():
        if reference is not None and name != "ort_cpu_fp32":
            cosine = (reference * value).sum(1) / np.maximum(
                np.linalg.norm(reference, axis=1) * np.linalg.norm(value, axis=1), 1e-12)
            out[name]["cosine_vs_ort_cpu_fp32"] = {"mean": float(cosine.mean()), "min": float(cosine.min())}
    return out


def torch_embeddings(run: Path, dataset, sequences, histories: list[np.ndarray], embedded: dict) -> dict:
    import torch

    from laser_batch.checkpoint import load_laser
    from laser_batch.config import LLMConfig, TextConfig, from_dict
    from laser_batch.encode import laser_inputs
    from laser_batch.llm import load_llm

    saved = json.loads((run / "laser" / "config.json").read_text())
    llm = load_llm(LLMConfig(source=saved["llm"]["source"], dtype=saved["llm_dtype"]))
    # Another transformers (the GPU image's 5.x) can fingerprint the same LLM differently; the weights decide.
    out = {"torch_llm_fingerprint_matches": llm.fingerprint == saved["llm"]["fingerprint"]}
    llm.fingerprint = saved["llm"]["fingerprint"]
    laser, _, config = load_laser(run, llm=llm)
    inputs = laser_inputs(laser.llm, dataset.items, sequences, from_dict(TextConfig, config["text"], "text"),
                          laser.sasrec.config.max_len)
    laser = laser.cuda().eval()
    for frozen in (laser.sasrec, laser.llm.model):  # held outside the module tree (not saved), so moved one by one
        frozen.cuda()
    order = np.argsort(inputs.text.lengths(histories), kind="stable")
    batches = [order[i:i + 64] for i in range(0, len(order), 64)]
    for name, dtype in (("torch_cuda_fp32", None), ("torch_cuda_bf16_autocast", torch.bfloat16)):
        try:
            result = torch.empty(len(histories), laser.llm.hidden_size)
            for _attempt in range(2):
                torch.cuda.synchronize()
                started = time.perf_counter()
                with torch.no_grad(), torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
                    for rows in batches:
                        tensors = [t.cuda(non_blocking=True) for t in inputs.users([histories[r] for r in rows])]
                        result[rows] = laser(*tensors)[0].float().cpu()
                torch.cuda.synchronize()
                seconds = time.perf_counter() - started
            embedded[name] = result.numpy()
            out[name] = {"users_per_second": round(len(histories) / seconds, 1)}
        except Exception as e:  # noqa: BLE001
            out[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                         "traceback": traceback.format_exc()[-1500:]}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True, help="The run's data directory.")
    parser.add_argument("--artifacts", type=Path, required=True)
    parser.add_argument("--artifacts-fp16", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--repeat", type=int, default=REPEAT, help="Copies of the example's users to score.")
    parser.add_argument("--cpu-only", action="store_true", help="Check the script itself on a machine without a GPU.")
    args = parser.parse_args()
    try:  # the GPU image's transformers 5 moved is_offline_mode (laser_batch.llm imports it; 4.57 is our pin)
        import huggingface_hub
        import transformers.utils

        if not hasattr(transformers.utils, "is_offline_mode"):
            transformers.utils.is_offline_mode = getattr(huggingface_hub, "is_offline_mode",
                                                         lambda: os.environ.get("HF_HUB_OFFLINE") == "1")
    except Exception as e:  # noqa: BLE001
        print("transformers shim:", e, flush=True)
    try:
        import onnxruntime as ort

        ort.preload_dlls()  # CUDA and cuDNN from the nvidia-* wheels that PyTorch brought
    except Exception as e:  # noqa: BLE001
        print("preload_dlls:", e, flush=True)
    artifacts = {"fp32": args.artifacts}
    if args.artifacts_fp16:
        artifacts["fp16"] = args.artifacts_fp16
    results: dict = {"command": " ".join(["python", *sys.argv]), "artifacts": {k: str(v) for k, v in artifacts.items()}}
    _step(results, "machine", machine)
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        users = users_file(args.data, scratch, args.repeat)
        results["job_users"] = pl.scan_parquet(users).select(pl.len()).collect().item()
        _step(results, "score_jobs", lambda: score_jobs(users, artifacts, scratch, args.cpu_only))
        _step(results, "embeddings", lambda: embeddings(args.run, args.data, artifacts, args.cpu_only))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
