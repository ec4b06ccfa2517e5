"""Where `laser-batch score` spends its time: cProfile of the scoring job on a trained run's held-out users.

    python benchmarks/score_profile.py --artifacts work/Scientific/artifacts --run work/Scientific/run_laser_text \
        --label after [--users 256] [--variant auto]

Users: the run's test histories (original item ids), spread evenly. The job is `laser_batch.score.score_users`
(the CLI's `score`), run once to warm up on 32 users, then profiled; the top entries by own time and by cumulative
time go into results/score_profile.json under LABEL, with the users/s of the profiled run (cProfile slows
Python-heavy code, not the graph runs), the command, the machine and the code's git commit. To profile
the package of another checkout: run with PYTHONPATH=WORKTREE (e.g. a worktree of the commit before a change), so
before and after run side by side on one machine.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def users_file(run: Path, count: int, path: Path) -> Path:
    import numpy as np
    import polars as pl

    from laser_batch.checkpoint import read_run_info
    from laser_batch.contracts import load_data_dir
    from laser_batch.exporters.validate import sample
    from laser_batch.sequences import build_sequences

    sequences = build_sequences(load_data_dir(read_run_info(run)["data_dir"]).interactions)
    histories, _ = sample(*sequences.split("test"), count)
    ids = sequences.item_ids.to_numpy()
    pl.DataFrame({"user_id": np.arange(len(histories)),
                  "history": [ids[h - 1].tolist() for h in histories]}).write_parquet(path)
    return path


def entries(stats: pstats.Stats, key: str, top: int) -> list[dict]:
    stats.sort_stats(key)
    rows = []
    for func in stats.fcn_list[:top]:
        calls, _, own, cumulative, _ = stats.stats[func]
        rows.append({"function": f"{Path(func[0]).name}:{func[1]}({func[2]})", "calls": calls,
                     "own_s": round(own, 3), "cumulative_s": round(cumulative, 3)})
    return rows


def encoder_file(manifest: dict, variant: str) -> tuple[str, str]:
    """(file, name) of the user encoder that `score --variant VARIANT` runs on the CPU ("": the code's default); code
    from before `--variant auto` runs the exported graph."""
    try:
        from laser_batch.artifacts import resolve_variant
    except ImportError:  # a checkout before --variant auto (--repo): "" is the exported graph
        graph = manifest["graphs"]["user_encoder"]
        return (graph["variants"][variant]["file"], variant) if variant else (graph["file"], "fp32")
    chosen = resolve_variant(manifest, variant or "auto", "CPUExecutionProvider")
    return chosen.file, chosen.name


def op_profile(artifacts: Path, run: Path, count: int, threads: int, variant: str, top: int) -> dict:
    """ONNX Runtime's own profile of the user encoder on the same users: time per operator type."""
    import onnxruntime as ort

    from laser_batch.artifacts import Embedder

    embedder = Embedder(artifacts, device="cpu", threads=threads, variant="", verify=False)  # feeds only
    file, name = encoder_file(embedder.manifest, variant)
    with tempfile.TemporaryDirectory() as tmp:
        import polars as pl

        users = pl.read_parquet(users_file(run, count, Path(tmp) / "users.parquet"))
        ids = pl.read_parquet(artifacts / "item_ids.parquet").sort("index")["item_id"].to_list()
        index = {item: i + 1 for i, item in enumerate(ids)}
        import numpy as np

        histories = [np.array([index[i] for i in h]) for h in users["history"].to_list()]
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "ort")
        graph = ort.InferenceSession(str(artifacts / file), sess_options=options, providers=["CPUExecutionProvider"])
        for start in range(0, len(histories), 32):
            graph.run(["embedding"], embedder.feeds(histories[start:start + 32]))
        trace = json.loads(Path(graph.end_profiling()).read_text())
    by_op: dict[str, float] = {}
    for event in trace:
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
            op = event.get("args", {}).get("op_name", "?")
            by_op[op] = by_op.get(op, 0.0) + event["dur"] / 1e6
    total = sum(by_op.values())
    ranked = sorted(by_op.items(), key=lambda kv: -kv[1])[:top]
    return {"graph": file, "variant": name, "users": len(histories), "kernel_seconds": round(total, 2),
            "top_ops": [{"op": op, "seconds": round(sec, 3), "share": round(sec / total, 4)} for op, sec in ranked]}


SWEEP = [  # (name, session options): one change at a time from the scorer's session (`laser_batch.artifacts.session`)
    ("scorer", {}),
    ("spinning on", {"spinning": True}),
    ("1 thread", {"threads": 1}),
    ("graph optimisation basic", {"level": "ORT_ENABLE_BASIC"}),
    ("graph optimisation extended", {"level": "ORT_ENABLE_EXTENDED"}),
    ("no CPU memory arena", {"arena": False}),
    ("sequential execution, no mem pattern", {"mem_pattern": False}),
    ("scorer, again", {}),  # the first and the last row differ only by drift and order: the sweep's noise
]


def session_sweep(artifacts: Path, run: Path, count: int, threads: int, variant: str, repeats: int = 3) -> list[dict]:
    """Users/s of the user encoder graph alone under each of `SWEEP`'s session options, on the same feeds."""
    import numpy as np
    import onnxruntime as ort
    import polars as pl

    from laser_batch.artifacts import Embedder, session

    embedder = Embedder(artifacts, device="cpu", threads=threads, variant="", verify=False)  # feeds only
    file = encoder_file(embedder.manifest, variant)[0]
    with tempfile.TemporaryDirectory() as tmp:
        users = pl.read_parquet(users_file(run, count, Path(tmp) / "users.parquet"))
    ids = pl.read_parquet(artifacts / "item_ids.parquet").sort("index")["item_id"].to_list()
    index = {item: i + 1 for i, item in enumerate(ids)}
    histories = [np.array([index[i] for i in h]) for h in users["history"].to_list()]
    feeds = [embedder.feeds(histories[i:i + 32]) for i in range(0, len(histories), 32)]
    rows = []
    for name, change in SWEEP:
        if not change:
            graph = session(artifacts / file, ["CPUExecutionProvider"], threads=threads)
        else:
            options = ort.SessionOptions()
            options.intra_op_num_threads = change.get("threads", threads)
            options.add_session_config_entry("session.intra_op.allow_spinning", "1" if change.get("spinning") else "0")
            if "level" in change:
                options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, change["level"])
            options.enable_cpu_mem_arena = change.get("arena", True)
            options.enable_mem_pattern = change.get("mem_pattern", True)
            graph = ort.InferenceSession(str(artifacts / file), sess_options=options,
                                         providers=["CPUExecutionProvider"])
        graph.run(["embedding"], feeds[0])  # warm-up
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            for f in feeds:
                graph.run(["embedding"], f)
            best = min(best, time.perf_counter() - started)
        rows.append({"options": name, "users_per_s": round(len(histories) / best, 2)})
        print(rows[-1])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", type=Path, required=True)
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--label", required=True)
    parser.add_argument("--users", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variant", default=None, help="--variant of score (default: the code's default)")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--sweep", action="store_true", help="also ONNX Runtime session options, one at a time")
    parser.add_argument("--ort-profile", action="store_true",
                        help="also ONNX Runtime's per-operator profile of the user encoder on the same users")
    parser.add_argument("--results", type=Path, default=HERE / "results" / "score_profile.json")
    args = parser.parse_args()
    from sasrec_s3rec import machine

    from laser_batch.score import score_users

    options = {"threads": args.threads, "overwrite": True}
    if args.variant is not None:
        options["variant"] = args.variant
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        users = users_file(args.run, args.users, tmp / "users.parquet")
        warm = users_file(args.run, 32, tmp / "warm.parquet")
        score_users(warm, args.artifacts, tmp / "warm_out", **options)
        profiler = cProfile.Profile()
        started = time.perf_counter()
        profiler.enable()
        summary = score_users(users, args.artifacts, tmp / "out", **options)
        profiler.disable()
        seconds = time.perf_counter() - started
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    import laser_batch

    commit = subprocess.run(["git", "-C", str(Path(laser_batch.__file__).parent), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    record = json.loads(args.results.read_text()) if args.results.exists() else {}
    record[args.label] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": machine(),
        "package": str(Path(laser_batch.__file__).parent), "commit": commit,
        "artifacts": str(args.artifacts), "users": args.users, "seconds": round(seconds, 2),
        "users_per_s": round(args.users / seconds, 2), "variant": summary.get("variant", args.variant or ""),
        "top_own": entries(stats, "tottime", args.top), "top_cumulative": entries(stats, "cumulative", args.top)}
    if args.ort_profile:
        record[args.label]["ort_ops"] = op_profile(args.artifacts, args.run, args.users, args.threads,
                                                   args.variant or "", args.top)
        for row in record[args.label]["ort_ops"]["top_ops"]:
            print(f"{row['seconds']:8.2f} {row['share']:6.1%} {row['op']}")
    if args.sweep:
        record[args.label]["session_sweep"] = session_sweep(args.artifacts, args.run, min(args.users, 128),
                                                            args.threads, args.variant or "")
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(record, indent=2) + "\n")
    for row in record[args.label]["top_own"]:
        print(f"{row['own_s']:8.2f} {row['cumulative_s']:8.2f} {row['calls']:7d} {row['function']}")
    print(f"{args.users / seconds:.2f} users/s")


if __name__ == "__main__":
    main()
