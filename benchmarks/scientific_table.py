"""The generated tables of the Amazon Scientific benchmark (results/laser_scientific.json); used by readme_table.py."""

from __future__ import annotations

import json
from pathlib import Path

ROWS = (("popularity", "popularity"), ("sasrec", "SASRec (library defaults)"),
        ("sasrec_tfidf_blend", "SASRec + TF-IDF title blend (no LLM)"))
RESULTS = "laser_scientific.json"


def _fmt(metrics: dict | None, key: str) -> str:
    return f"{metrics[key]:.4f}" if metrics and metrics.get(key) is not None else "-"


def versus_cell(row: dict) -> str:
    """A row's paired NDCG@10 difference to SASRec with its interval, as a table cell."""
    v = row.get("ndcg10_vs_sasrec")
    return f"{v['diff']:+.4f} [{v['ci95'][0]:+.4f}, {v['ci95'][1]:+.4f}]" if v else ""


def _label(name: str, row: dict) -> str:
    label = dict(ROWS).get(name, f"Laser `{name}`")
    return f"{label}, w = {row['weight']}" if "weight" in row else label


def laser_scientific_table(results_dir: Path) -> str:
    """Every row of the benchmark, then the Laser paper's numbers for reference."""
    path = results_dir / RESULTS
    if not path.exists():
        return "(no results yet: run python benchmarks/laser_scientific.py)"
    r = json.loads(path.read_text())
    rows = ["| model | HR@10 | NDCG@10 | MRR | NDCG@10 vs SASRec [95% CI] | s / epoch | trained parameters | g |",
            "|---|---|---|---|---|---|---|---|"]
    order = [k for k, _ in ROWS if k in r["models"]] + [k for k in r["models"] if k not in dict(ROWS)]
    for name in order:
        m = r["models"][name]
        gate = "" if m.get("gate") is None else f"{m['gate']:.3f}"
        rows.append(f"| {_label(name, m)} | {_fmt(m, 'HR@10')} | {_fmt(m, 'NDCG@10')} | {_fmt(m, 'MRR')} "
                    f"| {versus_cell(m)} | {m.get('seconds_per_epoch') or ''} | {m.get('trained_parameters', '')} "
                    f"| {gate} |")
    for key, label in (("sasrec", "SASRec, Laser paper"), ("laser", "Laser, Laser paper (frozen 6B LLM)")):
        p = r["paper"][key]
        rows.append(f"| {label} | {_fmt(p, 'HR@10')} | {_fmt(p, 'NDCG@10')} | {_fmt(p, 'MRR')} | | | | |")
    b, machine = r["bootstrap"], r["machine"]
    return "\n".join(rows) + (
        f"\n\nTest split ({r['protocol']}). The interval: paired bootstrap over test users ({b['resamples']} "
        f"resamples, seed {b['seed']}). Command: `{r['command']}`; {machine['cpu']}, {machine['torch_threads']} "
        f"threads.")


# The benchmark row run with the package's defaults (laser_batch/config.py: free prefix after the text, gated fusion,
# 8 blocks): benchmarks/configs/laser_scientific_text.toml on Scientific, the laser_text variant on MovieLens-100K.
DEFAULT_DESIGN = "laser_text"


def scientific_headline(results_dir: Path) -> list[str]:
    """README.md's row: the text blend against SASRec on Scientific (none before the benchmark has run)."""
    path = results_dir / RESULTS
    if not path.exists() or "sasrec_tfidf_blend" not in json.loads(path.read_text())["models"]:
        return []
    r = json.loads(path.read_text())
    blend, sasrec, paper = r["models"]["sasrec_tfidf_blend"], r["models"]["sasrec"], r["paper"]
    rows = [f"| SASRec + TF-IDF title blend (no LLM) on Amazon Scientific: test NDCG@10, difference to SASRec "
            f"[95% CI] | {_fmt(blend, 'NDCG@10')}, {versus_cell(blend)} | SASRec {_fmt(sasrec, 'NDCG@10')}; "
            f"Laser paper: SASRec {_fmt(paper['sasrec'], 'NDCG@10')}, Laser {_fmt(paper['laser'], 'NDCG@10')} |"]
    if DEFAULT_DESIGN in r["models"]:
        laser = r["models"][DEFAULT_DESIGN]
        rows.append(f"| Laser, the package's defaults (SmolLM2-135M, text only + gated fusion, "
                    f"g = {laser['gate']:.2f}) on Amazon Scientific: test NDCG@10, difference to SASRec [95% CI] | "
                    f"{_fmt(laser, 'NDCG@10')}, {versus_cell(laser)} | the paper's setup, same LLM: "
                    f"{_fmt(r['models']['laser_paper'], 'NDCG@10')} |")
    return rows
