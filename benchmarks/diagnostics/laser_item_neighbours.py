"""Diagnostic: what the item embeddings of trained Laser runs encode, from their saved item matrices.

    python benchmarks/diagnostics/laser_item_neighbours.py --data DATA_DIR --sasrec RUN/sasrec \
        --run NAME=RUN/laser [...]

For each item matrix (and the frozen SASRec's item-embedding table) it takes every item's 10 nearest items by cosine
and reports the share of those neighbours that share a genre with the item (content: what an LLM reading the item
text can see) and the mean overlap of the neighbour lists with SASRec's (collaborative structure: what the next-item
task rewards). A few neighbour lists are kept as examples. No model is run: only the saved matrices are read.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import polars as pl
from safetensors.numpy import load_file

BENCHMARKS = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(BENCHMARKS))  # run as a script: the benchmark scripts' shared helpers live one level up
from sasrec_s3rec import machine  # noqa: E402

K = 10
EXAMPLES = ("Star Wars", "Toy Story", "Fargo", "Scream")


def neighbours(matrix: np.ndarray) -> np.ndarray:
    """Each row's K nearest other rows by cosine, as row indices (n, K)."""
    unit = matrix / np.linalg.norm(matrix, axis=1, keepdims=True).clip(1e-12)
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -np.inf)
    return np.argsort(-similarity, axis=1)[:, :K]


def genre_share(nearest: np.ndarray, genres: list[set[str]]) -> float:
    return float(np.mean([[bool(genres[i] & genres[j]) for j in row] for i, row in enumerate(nearest)]))


def overlap(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean([len(set(x) & set(y)) / K for x, y in zip(a.tolist(), b.tolist(), strict=True)]))


def rows_for(checkpoint: Path, item_ids: np.ndarray, first_row: int) -> list[int]:
    """The matrix rows of `item_ids`, from the checkpoint's item_ids.parquet (row = index - 1 + first_row)."""
    order = pl.read_parquet(checkpoint / "item_ids.parquet")
    row = dict(zip(order["item_id"].to_list(), (order["index"] - 1 + first_row).to_list(), strict=True))
    missing = [i for i in item_ids.tolist() if i not in row]
    if missing:
        raise SystemExit(f"{checkpoint}/item_ids.parquet: item {missing[0]} of the data directory is missing")
    return [row[i] for i in item_ids.tolist()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="the benchmark's data directory (items.parquet)")
    parser.add_argument("--sasrec", type=Path, required=True, help="the frozen SASRec's checkpoint directory")
    parser.add_argument("--run", action="append", required=True, help="NAME=LASER_DIR (a run's laser/ directory)")
    parser.add_argument("--results", type=Path,
                        default=BENCHMARKS / "results" / "laser_item_neighbours.json")
    args = parser.parse_args()

    items = pl.read_parquet(args.data / "items.parquet").sort("item_id")
    item_ids, titles = items["item_id"].to_numpy(), items["title"].to_list()
    genres = [set(g.split(", ")) if g else set() for g in items["genres"].to_list()]
    # SASRec's embedding table has a padding row 0, so index i is row i; the item matrix has no padding row
    table = load_file(args.sasrec / "model.safetensors")["item_embedding.weight"].astype(np.float32)
    matrices = {"sasrec": table[rows_for(args.sasrec, item_ids, first_row=1)]}
    sources = {"sasrec": str(args.sasrec)}
    for spec in args.run:
        name, _, path = spec.partition("=")
        matrix = load_file(Path(path) / "item_matrix.safetensors")["item_matrix"].astype(np.float32)
        matrices[name], sources[name] = matrix[rows_for(Path(path), item_ids, first_row=0)], path

    rng = np.random.default_rng(0)
    pairs = rng.integers(0, len(item_ids), size=(20000, 2))
    record = {"random_genre_share": float(np.mean([bool(genres[a] & genres[b]) for a, b in pairs])), "matrices": {}}
    nearest = {name: neighbours(m) for name, m in matrices.items()}
    picks = [titles.index(t) for t in EXAMPLES if t in titles]
    for name, near in nearest.items():
        record["matrices"][name] = {
            "genre_share@10": genre_share(near, genres),
            "overlap@10_with_sasrec": overlap(near, nearest["sasrec"]),
            "examples": {titles[i]: [titles[j] for j in near[i][:5]] for i in picks},
            "source": sources[name],
        }
    record.update(command=" ".join(["python", "benchmarks/diagnostics/laser_item_neighbours.py", *sys.argv[1:]]),
                  machine=machine())
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(record, indent=1) + "\n")
    for name, r in record["matrices"].items():
        print(f"{name}: genre share@10 {r['genre_share@10']:.3f}, "
              f"overlap@10 with SASRec {r['overlap@10_with_sasrec']:.3f}")
    print(f"random pairs share a genre: {record['random_genre_share']:.3f}")


if __name__ == "__main__":
    main()
