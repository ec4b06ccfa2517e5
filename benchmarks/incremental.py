"""Incremental nights: `laser-batch score --previous` against a full run of the same night, side by side.

    python benchmarks/incremental.py [--users 100000] [--changed 0.01] [--threads 2] [--model laser|sasrec]

100k users through SmolLM2 do not fit this 2-core CPU's time, so the model is the embedded example's: the
synthetic example data set (`laser-batch data example`) and a Laser run on it with the embedded tiny LLM
(`examples/laser.toml`, the README's first command), exported to ONNX. `--model sasrec` exports only that run's
SASRec stage (trained alone, `examples/sasrec.toml`): the same job without the LLM, for a CPU that another job
keeps busy. The users are synthetic too: the example's
users' histories repeated under new ids up to `--users`. Night 2 gives `--changed` of them (drawn with a fixed seed)
one more item; night 1 is scored in full and is night 2's `--previous`. Night 2 is then scored twice, in full and
incrementally, each in a fresh `laser-batch score` process; the outputs are compared (same users, ranks and items;
largest score difference).

Resumable: every step leaves its result in benchmarks/work/incremental/ and is skipped when it is there (a killed
score run is finished with --resume). Writes benchmarks/results/incremental.json (one entry per --model).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
from sasrec_s3rec import machine

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORK = HERE / "work" / "incremental"
CLI = [sys.executable, "-m", "laser_batch.cli"]
MODELS = {
    "laser": "Laser with the embedded tiny LLM trained on the embedded example (laser-batch data example, "
             "examples/laser.toml), exported to ONNX; not SmolLM2, which is too slow for 100k users on this CPU",
    "sasrec": "SASRec-only artefacts of the embedded example (laser-batch data example, examples/sasrec.toml, export "
              "--model sasrec): no LLM, so encoding is cheap and the gain of reuse is a lower bound of Laser's",
}


def _run(args: list[str]) -> None:
    subprocess.run([*CLI, *args], check=True, cwd=ROOT)


def example_artifacts(work: Path, model: str) -> Path:
    """The README's first command up to `export`: example data, Laser with the tiny LLM (or SASRec alone), ONNX
    artefacts."""
    data, run, artifacts = work / "data", work / f"run_{model}", work / f"artifacts_{model}"
    if not (data / "interactions.parquet").exists():
        _run(["data", "example", "--out", str(data)])
    if not (run / model).exists():
        stage, config = ("all", "laser.toml") if model == "laser" else ("sasrec", "sasrec.toml")
        _run(["train", "--stage", stage, "--data", str(data), "--out", str(run), "--config",
              str(ROOT / "examples" / config), "--overwrite"])
    if not (artifacts / "manifest.json").exists():
        _run(["export", str(run), "--out", str(artifacts), "--model", model, "--overwrite"])
    return artifacts


def nights(data: Path, work: Path, users: int, changed: float, seed: int) -> tuple[Path, Path, int]:
    """night1.parquet (`users` synthetic users) and night2.parquet (`changed` of them with one more item)."""
    night1, night2 = work / "night1.parquet", work / "night2.parquet"
    inter = pl.read_parquet(data / "interactions.parquet").sort("user_id", "timestamp")
    base = inter.group_by("user_id", maintain_order=True).agg(pl.col("item_id").alias("history"))
    copies = -(-users // base.height)
    rows = pl.concat([base.with_columns(pl.col("user_id") + 1_000_000 * i) for i in range(copies)]).head(users)
    rng = np.random.default_rng(seed)
    picked = np.zeros(users, dtype=bool)
    picked[rng.choice(users, size=round(users * changed), replace=False)] = True
    items = inter["item_id"].unique().sort().to_numpy()
    extra = pl.Series("extra", rng.choice(items, size=users))
    tonight = rows.with_columns(pl.when(pl.Series(picked)).then(pl.col("history").list.concat(
        pl.concat_list(pl.lit(extra)))).otherwise("history").alias("history"))
    if not night1.exists():
        rows.write_parquet(night1)
    if not night2.exists():
        tonight.write_parquet(night2)
    return night1, night2, int(picked.sum())


def score(users: Path, artifacts: Path, out: Path, threads: int, *extra: str) -> dict:
    """One `laser-batch score` process (finished with --resume when a run was killed); its summary and wall time."""
    if not (out / "_SUCCESS").exists():
        command = ["--quiet", "score", str(users), "--model", str(artifacts), "--out", str(out), "--threads",
                   str(threads), *extra]
        started = time.perf_counter()
        _run([*command, "--resume"] if out.exists() else command)
        (out / "_wall_seconds").write_text(f"{time.perf_counter() - started:.2f}\n")
    summary = json.loads((out / "summary.json").read_text())
    return {"wall_seconds": float((out / "_wall_seconds").read_text()), "job_seconds": summary["seconds"],
            "users_scored": summary["users_scored"], "reused": summary["incremental"]["reused"],
            "encoded": summary["incremental"]["scored"], "rescore_reason": summary["incremental"]["rescore_reason"]}


def compare(a: Path, b: Path) -> dict:
    """Same users, ranks and items? The largest score difference (batches pad differently)."""
    def recs(out: Path) -> pl.DataFrame:
        return pl.read_parquet(str(out / "part-*.parquet")).sort("user_id", "rank")

    x, y = recs(a), recs(b)
    same = x.select("user_id", "rank", "item_id").equals(y.select("user_id", "rank", "item_id"))
    diff = float((x["score"] - y["score"]).abs().max()) if x.height == y.height else None
    return {"rows": x.height, "same_users_ranks_items": same, "max_abs_score_difference": diff}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--changed", type=float, default=0.01, help="share of users with new activity on night 2")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=WORK)
    parser.add_argument("--model", choices=["laser", "sasrec"], default="laser")
    args = parser.parse_args()
    work = args.work / f"{args.model}_{args.users}_{args.changed}"
    work.mkdir(parents=True, exist_ok=True)
    artifacts = example_artifacts(args.work, args.model)
    night1, night2, changed = nights(args.work / "data", work, args.users, args.changed, args.seed)
    first = score(night1, artifacts, work / "recs1", args.threads)
    full = score(night2, artifacts, work / "recs2_full", args.threads)
    incremental = score(night2, artifacts, work / "recs2_incremental", args.threads, "--previous",
                        str(work / "recs1"))
    record = {
        "command": "python benchmarks/incremental.py " + " ".join(sys.argv[1:]),
        "machine": machine(),
        "configuration": {"users": args.users, "changed_share": args.changed, "changed_users": changed,
                          "threads": args.threads, "seed": args.seed, "top_k": 20, "chunk_size": 50_000},
        "model": MODELS[args.model],
        "users": "synthetic: the example's users' histories repeated under new ids; night 2 appends one random "
                 "catalogue item to the changed users' histories",
        "night1_full": first, "night2_full": full, "night2_incremental": incremental,
        "speedup_wall": round(full["wall_seconds"] / incremental["wall_seconds"], 2),
        "incremental_vs_full": compare(work / "recs2_incremental", work / "recs2_full"),
    }
    out = HERE / "results" / "incremental.json"  # one entry per model; a run replaces its model's entry
    runs = json.loads(out.read_text())["runs"] if out.exists() else {}
    out.write_text(json.dumps({"runs": {**runs, args.model: record}}, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
