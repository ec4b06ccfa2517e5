"""Rewrite the benchmark tables of README.md from benchmarks/results/*.json.

    python benchmarks/readme_table.py          # rewrites README.md in place
    python benchmarks/readme_table.py --check  # exits 1 when README.md is out of date
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- sasrec-table:begin -->", "<!-- sasrec-table:end -->"
DATASETS = ("Beauty", "Sports_and_Outdoors", "LastFM")


def _fmt(metrics: dict | None, key: str) -> str:
    return f"{metrics[key]:.4f}" if metrics and key in metrics else "-"


def sasrec_table(results_dir: Path) -> str:
    rows = [
        "| dataset | model | HR@10 | NDCG@10 | HR@20 | NDCG@20 | MRR | epochs (best) | train time |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in DATASETS:
        path = results_dir / f"sasrec_{name}.json"
        if not path.exists():
            continue
        r = json.loads(path.read_text())
        ours, pop, published = r["models"]["sasrec"], r["models"]["popularity"], r["published"]
        minutes = f"{r['train_seconds'] / 60:.1f} min"
        rows.append(f"| {name} | **SASRec, laser-batch (CE)** | **{_fmt(ours, 'HR@10')}** "
                    f"| **{_fmt(ours, 'NDCG@10')}** | {_fmt(ours, 'HR@20')} | {_fmt(ours, 'NDCG@20')} "
                    f"| {_fmt(ours, 'MRR')} "
                    f"| {r['epochs_run']} ({r['best_epoch']}) | {minutes} |")
        rows.append(f"| {name} | popularity, laser-batch | {_fmt(pop, 'HR@10')} | {_fmt(pop, 'NDCG@10')} "
                    f"| {_fmt(pop, 'HR@20')} | {_fmt(pop, 'NDCG@20')} | {_fmt(pop, 'MRR')} | | |")
        labels = (("SASRec, published (BCE)", "sasrec"), ("SASRec, public CE reference", "sasrec_ce_reference"),
                  ("popularity, published", "popularity"))
        for label, key in labels:
            if key in published:
                m = published[key]
                rows.append(f"| {name} | {label} | {_fmt(m, 'HR@10')} | {_fmt(m, 'NDCG@10')} | {_fmt(m, 'HR@20')} "
                            f"| {_fmt(m, 'NDCG@20')} | - | | |")
    machine = next((json.loads(p.read_text())["machine"] for p in sorted(results_dir.glob("sasrec_*.json"))), None)
    note = f"\nMeasured on {machine['cpu']}, {machine['torch_threads']} threads." if machine else ""
    return "\n".join(rows) + note


def render(readme: str, table: str) -> str:
    head, _, rest = readme.partition(BEGIN)
    _, _, tail = rest.partition(END)
    return f"{head}{BEGIN}\n{table}\n{END}{tail}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    readme_path = ROOT / "README.md"
    readme = readme_path.read_text()
    updated = render(readme, sasrec_table(ROOT / "benchmarks" / "results"))
    if args.check:
        sys.exit(0 if updated == readme else 1)
    readme_path.write_text(updated)


if __name__ == "__main__":
    main()
