"""Rewrite the generated tables of README.md and benchmarks/README.md from benchmarks/results/*.json.

    python benchmarks/readme_table.py          # rewrites both files in place
    python benchmarks/readme_table.py --check  # exits 1 when a table in either file is out of date

Each table sits between `<!-- NAME-table:begin -->` and `<!-- NAME-table:end -->`; a file that lacks the markers of
one of its tables is an error, so a table cannot silently drop out of the check.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from scientific_table import DEFAULT_DESIGN, laser_scientific_table, scientific_headline, versus_cell
from scientific_table import RESULTS as SCIENTIFIC_RESULTS

ROOT = Path(__file__).resolve().parent.parent
LASER_ROWS = (("popularity", "popularity"), ("sasrec", "SASRec alone (frozen ID model)"), ("laser", "**Laser**"),
              ("laser_no_prefix", "Laser, no prefix"), ("laser_no_moe", "Laser, no MoE (K = 1)"),
              ("laser_combo", "Laser, fast combination (8 blocks, CF tokens after the text, gated fusion)"),
              ("laser_text", "Laser, the LLM reads text only (free prefix after the text, 8 blocks, gated fusion)"))
DATASETS = ("Beauty", "Sports_and_Outdoors", "LastFM", "Scientific")
PUBLISHED_LABELS = (("SASRec, published (BCE)", "sasrec"), ("SASRec, public CE reference", "sasrec_ce_reference"),
                    ("popularity, published", "popularity"), ("SASRec, Laser paper", "sasrec_laser_paper"),
                    ("Laser, Laser paper (frozen 6B LLM)", "laser_paper"))


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
        for label, key in PUBLISHED_LABELS:
            if key in published:
                m = published[key]
                rows.append(f"| {name} | {label} | {_fmt(m, 'HR@10')} | {_fmt(m, 'NDCG@10')} | {_fmt(m, 'HR@20')} "
                            f"| {_fmt(m, 'NDCG@20')} | {_fmt(m, 'MRR')} | | |")
    machine = next((json.loads(p.read_text())["machine"] for p in sorted(results_dir.glob("sasrec_*.json"))), None)
    note = f"\n\nMeasured on {machine['cpu']}, {machine['torch_threads']} threads." if machine else ""
    return "\n".join(rows) + note


def _laser_row(label: str, metrics: dict, run: dict) -> str:
    versus, gate = metrics.get("ndcg10_vs_sasrec"), metrics.get("gate")
    paired = f"{versus['diff']:+.4f} [{versus['ci95'][0]:+.4f}, {versus['ci95'][1]:+.4f}]" if versus else ""
    return (f"| {label} | {_fmt(metrics, 'HR@10')} | {_fmt(metrics, 'NDCG@10')} | {_fmt(metrics, 'MRR')} "
            f"| {run.get('seconds_per_epoch', '')} | {run.get('trainable_parameters', '')} | {paired} | "
            f"{'' if gate is None else f'{gate:.3f}'} |")


def laser_table(results_dir: Path) -> str:
    path = results_dir / "laser_ml100k.json"
    if not path.exists():
        return "(no results yet: run python benchmarks/laser_ml100k.py)"
    r = json.loads(path.read_text())
    rows = ["| model | HR@10 | NDCG@10 | MRR | s / epoch | trained parameters | NDCG@10 vs SASRec [95% CI] | g |",
            "|---|---|---|---|---|---|---|---|"]
    for key, label in LASER_ROWS:
        m = r["models"].get(key)
        run = r.get("runs", {}).get(key, {})
        if m is None and key not in ("laser_combo", "laser_text"):  # these run with the soft_lowlr config only
            rows.append(f"| {label} | not run | | | | | | |")
        if m is None:
            continue
        rows.append(_laser_row(label, m, run))
    notes = []
    for other in sorted(results_dir.glob("laser_ml100k_*.json")):  # the same benchmark with a variant config
        o = json.loads(other.read_text())
        name = other.stem.removeprefix("laser_ml100k_")
        for key, label in LASER_ROWS:
            m, run = o["models"].get(key), o.get("runs", {}).get(key, {})
            if m is not None and key not in ("popularity", "sasrec"):
                rows.append(_laser_row(f"{label}, config `{name}`", m, run))
        commands = dict.fromkeys(run.get("command", o["command"]) for key, run in o.get("runs", {}).items()
                                 if key in o["models"]) or {o["command"]: None}
        notes.append(f"config `{name}`: " + "; ".join(f"`{c}`" for c in commands) + f" on {o['machine']['cpu']}")
    llm = Path(r["config"]["llm"]["source"]).name
    return "\n".join(rows) + "".join(f"\n\n{n}." for n in notes) + (
        f"\n\nMovieLens-100K, test split, full ranking; LLM {llm} "
                              f"({r.get('runs', {}).get('laser', {}).get('llm_dtype', r['config']['llm']['dtype'])});"
                              f" measured on {r['machine']['cpu']}, {r['machine']['torch_threads']} threads.")


def _reference_rows(reference: dict, labels: tuple, empty: int) -> list[str]:
    """Table rows of reference models (HR@10, NDCG@10, MRR), followed by `empty` blank cells."""
    return [f"| {label} | {_fmt(reference[key], 'HR@10')} | {_fmt(reference[key], 'NDCG@10')} "
            f"| {_fmt(reference[key], 'MRR')} |" + " |" * empty for key, label in labels]


def laser_proxy_table(results_dir: Path) -> str:
    """Laser with the embedded tiny LLM on ML-100K (diagnostics/laser_tiny_proxy.py): loss and validation per epoch."""
    path = results_dir / "laser_tiny_proxy.json"
    if not path.exists():
        return "(no results yet: run python benchmarks/diagnostics/laser_tiny_proxy.py)"
    r = json.loads(path.read_text())
    rows = ["| variant | test HR@10 | NDCG@10 | MRR | loss by epoch | valid HR@10 by epoch | CPU |",
            "|---|---|---|---|---|---|---|"]
    rows += _reference_rows(r["reference"], (("popularity", "popularity"), ("sasrec", "SASRec alone")), 3)
    for name, v in r["variants"].items():
        trained = [e for e in v["epochs"] if "loss" in e]  # a fused run's epoch 0 (its untrained start) has no loss
        losses = " / ".join(f"{e['loss']:.2f}" for e in trained)
        valid = " / ".join(f"{e['HR@10']:.3f}" for e in trained)
        rows.append(f"| {name} | {_fmt(v['test'], 'HR@10')} | {_fmt(v['test'], 'NDCG@10')} | {_fmt(v['test'], 'MRR')} "
                    f"| {losses} | {valid} | {v.get('cpu', r['machine']['cpu'])} |")
    ln_n = "ln(1682) = 7.43"
    return "\n".join(rows) + (f"\n\nEmbedded tiny LLM (float32), 4 epochs of stage 1, otherwise the ML-100K benchmark "
                              f"configuration; uniform-guess loss {ln_n}; validation on 300 users; "
                              f"{r['machine']['torch_threads']} threads.")


def laser_bypass_table(results_dir: Path) -> str:
    """Laser's collaborative path with the LLM taken out (diagnostics/laser_bypass_llm.py): test metrics per variant."""
    path = results_dir / "laser_bypass_llm.json"
    if not path.exists():
        return "(no results yet: run python benchmarks/diagnostics/laser_bypass_llm.py)"
    r = json.loads(path.read_text())
    rows = ["| variant | test HR@10 | NDCG@10 | MRR | changes | seconds |", "|---|---|---|---|---|---|"]
    rows += _reference_rows(r["reference"], (("popularity", "popularity"), ("sasrec", "SASRec alone"),
                                             ("sasrec_cosine", "SASRec alone, scored by cosine")), 2)
    for name, v in r["variants"].items():
        changes = ", ".join(f"{k} {json.dumps(c)}" for k, c in v["changes"].items()) or "none"
        rows.append(f"| {name} | {_fmt(v['test'], 'HR@10')} | {_fmt(v['test'], 'NDCG@10')} | {_fmt(v['test'], 'MRR')} "
                    f"| {changes} | {v['seconds']} |")
    return "\n".join(rows) + (f"\n\nEmbedding = mean of the M-Former prefix (no LLM), 4 epochs of stage 1 unless "
                              f"changed, otherwise the ML-100K benchmark configuration with id_window 10; "
                              f"measured on {r['machine']['cpu']}, {r['machine']['torch_threads']} threads.")


def _repo_path(path: str) -> str:
    """A recorded absolute path as the repository-relative one ("benchmarks/work/...")."""
    return path[path.index("benchmarks/"):] if "benchmarks/" in path else path


def _of_run(section: dict) -> str:
    key = "run" if "run" in section else "model"
    return f" of `{_repo_path(section[key])}`" if key in section else ""


def export_table(results_dir: Path) -> str:
    path = results_dir / "export_smollm2.json"
    if not path.exists():
        return "(no results yet: run python benchmarks/export_smollm2.py)"
    rows = ["| run | user encoder | MB | top-10 same set as torch/fp32 | mean top-10 overlap "
            "| emb. cosine mean / worst | Recall@10 change | speed vs ORT fp32 |", "|---|---|---|---|---|---|---|---|"]
    notes = []
    # the main run's export, then the exports of variant-config runs (benchmarks/configs/laser_ml100k_*.toml)
    for other in [path, *sorted(results_dir.glob("export_smollm2_*.json"))]:
        r = json.loads(other.read_text())
        name = other.stem.removeprefix("export_smollm2").removeprefix("_") or "main"
        e2e = r["fp32"]["end_to_end"]
        rows.append(f"| {name} | fp32 (vs torch) | {r['files']['user_encoder.onnx'] / 1e6:.0f} "
                    f"| {e2e['top10']['same_set']:.1%} | {e2e['top10']['mean_overlap']:.1%} "
                    f"| {e2e['mean_cosine']:.5f} / {e2e['min_cosine']:.5f} | | 1.00x |")
        for scheme, v in r["int8"].items():
            if "skipped" in v:
                rows.append(f"| {name} | {scheme} | skipped: {v['skipped']} | | | | | |")
                continue
            rows.append(f"| {name} | {scheme} | {v['bytes'] / 1e6:.0f} | {v['top10_vs_fp32']['same_set']:.1%} "
                        f"| {v['top10_vs_fp32']['mean_overlap']:.1%} | {v['mean_cosine']:.4f} / {v['min_cosine']:.4f} "
                        f"| {v.get('recall@10_change', v.get('gate', {}).get('hr10_diff', float('nan'))):+.4f} "
                        f"| {v['speedup_vs_fp32']:.2f}x |")  # exports with the quality gate: its HR@10 change
        notes.append(f"{name}: `{_repo_path(r['run'])}`, {e2e['users']} held-out users; "
                     f"export took {r['export_seconds']:.0f} s; "
                     f"recommended CPU variant: {r['recommended_cpu_variant']}; measured on {r['machine']['cpu']}, "
                     f"{r['machine']['torch_threads']} threads")
    return "\n".join(rows) + "\n\nSmolLM2-135M Laser runs of the ML-100K benchmark. " + "; ".join(notes) + "."


def score_ray_table(results_dir: Path) -> str:
    """Local engine vs Ray engine (benchmarks/score_ray.py)."""
    r = json.loads((results_dir / "score_ray.json").read_text()) if (results_dir / "score_ray.json").exists() else {}
    if not r:
        return "(no results yet: run python benchmarks/score_ray.py)"
    rows = ["| engine | layout | users/s | job seconds | same ranked list / top-K set as local | max score diff |",
            "|---|---|---|---|---|---|"]
    for run in r["runs"]:
        if run["engine"] == "local":
            layout = f"1 process x {run['threads']} ORT threads" + (" (again, after Ray)" if run.get("again") else "")
            same = diff = ""
        else:
            layout = f"{run['workers']} actor(s) x {run['threads_per_worker']} ORT thread(s)"
            same = f"{run['same_ranked_list_share']:.2%} / {run['same_top_k_set_share']:.2%}"
            diff = f"{run['max_abs_score_diff']:.1e}"
        rows.append(f"| {run['engine']} | {layout} | {run['users_per_s']:.1f} | {run['seconds']:.1f} | {same} "
                    f"| {diff} |")
    c = r["configuration"]
    return "\n".join(rows) + (f"\n\n{c['users']} synthetic users in {c['input_files']} Parquet files, tiny Laser "
                              f"model, chunks of {c['chunk_size']} users, top {c['top_k']}; Ray: a local cluster "
                              f"of {c['ray_cpus']} logical CPUs, its start-up ({r['ray_init_seconds']:.0f} s) not "
                              f"counted; measured on {r['machine']['cpu']}, {r['machine']['cores']} cores; "
                              f"{r['contention']}.")


def quant_gate_table(results_dir: Path) -> str:
    """The export's quality gate of the quantised variants on held-out pairs (benchmarks/quant_gate.py)."""
    path = results_dir / "quant_gate.json"
    if not path.exists():
        return "(no results yet: run python benchmarks/quant_gate.py)"
    r = json.loads(path.read_text())
    rows = ["| export | scorer | pairs | NDCG@10 | non-inferior | diff to ORT fp32 [95% CI] (bar) | hit changes "
            "| top-10 overlap | top-10 same set | fp32 layers kept | speed vs fp32 (export) |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for label, e in r.items():
        gate = e["gate"]
        rows.append(f"| {label} | ORT fp32 | {gate['pairs']:,} | {gate['fp32']['ndcg10']:.4f} | (reference) | | | | "
                    f"| | 1.00x |")
        named = [("PyTorch bf16 weights", gate.get("torch_bf16"), None)]
        named += [(name, v["gate"], v) for name, v in e["variants"].items() if v.get("gate")]
        for name, g, v in named:
            if g is None:
                continue
            kept = ""
            if v is not None and name.endswith("-mixed"):
                kept = str(len(e["sensitivity"].get(name.removesuffix("-mixed"), {}).get("kept", [])))
            shown = f"**{name}** (recommended)" if name == e["recommended_cpu_variant"] else name
            speed = f"{v['speedup_vs_fp32']:.2f}x" if v is not None else ""
            rows.append(f"| {label} | {shown} | {g['pairs']:,} | {g['ndcg10']:.4f} {_gate_cells(g)}"
                        f"| {g['top10_same_set']:.1%} | {kept} | {speed} |")
        notes.append(f"{label}: `{_repo_path(e['model'])}`, {gate['users']:,} users' validation and test targets; "
                     f"recommended CPU variant: {e['recommended_cpu_variant'] or 'none (fp32)'}; measured on "
                     f"{e['machine']['cpu']}" + (f". {e['note']}" if e.get("note") else ""))
    return "\n".join(rows) + "\n\n" + "\n\n".join(notes)


def _gate_cells(v: dict) -> str:
    """The quality gate's cells of a scorer row: non-inferior, NDCG@10 difference [CI] (bar), hit changes, overlap."""
    low, high = v["ndcg10_diff_ci95"]
    return (f"| {'yes' if v['non_inferior'] else 'no'} | {v['ndcg10_diff']:+.4f} [{low:+.4f}, {high:+.4f}] "
            f"({v['non_inferiority_bar']:+.4f}) | {v['hit_changes']} | {v['top10_overlap']:.1%} ")


def score_table(results_dir: Path) -> str:
    """Our ONNX Runtime scorer vs PyTorch scorers, and the scaling runs (benchmarks/score_throughput.py)."""
    path = results_dir / "score_throughput.json"
    if not path.exists():
        return "(no results yet: run python benchmarks/score_throughput.py)"
    r = json.loads(path.read_text())
    machines = r.get("machines", {})
    rows = ["| model | scorer | users/s | x ORT fp32 | non-inferior | NDCG@10 diff to fp32 [95% CI] (bar) "
            "| hit changes | top-10 overlap | top-10 same set as torch fp32 |", "|---|---|---|---|---|---|---|---|---|"]
    notes = []
    sections = ["smollm2", *sorted(k for k in r if k.startswith("smollm2_")), "tiny"]  # smollm2_*: --section
    for model in sections:
        m = r.get(model)
        if not m:
            continue
        label = {"smollm2": "SmolLM2-135M Laser", "tiny": "tiny Laser"}.get(model, f"SmolLM2-135M Laser ({model})")
        fp32 = next(v["users_per_s"] for v in m["ort"] if v["variant"] == "fp32")
        compiled = m.get("torch_compile_bf16_users_per_s")
        bf16_gate = _gate_cells(m["torch_bf16_gate"]) if "torch_bf16_gate" in m else "| | | | "
        rows += [f"| {label} | torch eager fp32 | {m['torch_fp32_users_per_s']:.2f} "
                 f"| {m['torch_fp32_users_per_s'] / fp32:.2f} | | | | | (reference) |",
                 f"| {label} | torch eager bf16 weights | {m['torch_bf16_users_per_s']:.2f} "
                 f"| {m['torch_bf16_users_per_s'] / fp32:.2f} {bf16_gate}| {m['torch_bf16_top10_agreement']:.1%} |",
                 f"| {label} | torch.compile bf16 | {compiled:.2f} | {compiled / fp32:.2f} | | | | | |"
                 if compiled is not None else
                 f"| {label} | torch.compile bf16 | failed: {m.get('torch_compile_error', '')} | | | | | | |"]
        recommended = m.get("recommended_cpu_variant")
        for v in m["ort"]:
            name = f"**{v['variant']}** (recommended)" if v["variant"] == recommended else v["variant"]
            if v["variant"] == "fp32":
                gate = "| (reference) | | | "
            else:
                gate = _gate_cells(v) if "non_inferior" in v else "| | | | "
            rows.append(f"| {label} | ORT {name} | {v['users_per_s']:.2f} | {v['users_per_s'] / fp32:.2f} {gate}"
                        f"| {v['top10_agreement']:.1%} |")
        pairs = m.get("gate", {}).get("pairs")
        flags = m.get("cpu_flags", {})
        shown = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in flags.items() if k != "model_name")
        notes.append(f"{model}: {m['users']} held-out users{_of_run(m)} in length-sorted batches of "
                     f"{m['batch_size']}, padding efficiency {m['padding_efficiency']:.3f}, measured on "
                     f"{machines.get(model, r['machine'])['cpu']}" + (f" ({shown})" if shown else "")
                     + (f"; quality gate from the export on {pairs:,} held-out pairs" if pairs else "")
                     + (f"; recommended CPU variant: {recommended or 'none (fp32)'}" if "ort" in m else "")
                     + (f". {m['note'].rstrip('.')}" if m.get("note") else ""))
    scaling = r.get("scaling", [])
    if scaling:
        rows += ["", "| synthetic users | tiny model's artefacts | max batch tokens | users/s | peak RSS (MB) |",
                 "|---|---|---|---|---|"]
        rows += [f"| {s['users']:,} | {'SASRec only' if s.get('model') == 'sasrec' else 'Laser'} "
                 f"| {s['max_batch_tokens']:,} | {s['users_per_s']:.1f} | {s['peak_rss_mb']:.0f} |" for s in scaling]
        cpus = sorted({s.get("cpu", machines.get("scaling", r["machine"])["cpu"]) for s in scaling})
        notes.append(f"scaling: `laser-batch score` in a fresh process per row, measured on {' / '.join(cpus)}")
    return "\n".join(rows) + "\n\n" + "; ".join(notes) + "."


def sensitivity_table(results_dir: Path) -> str:
    """How exact a user embedding must be to keep its top-10 (benchmarks/diagnostics/topk_sensitivity.py)."""
    path = results_dir / "topk_sensitivity.json"
    if not path.exists():
        return "(no results yet: run python benchmarks/diagnostics/topk_sensitivity.py)"
    r = json.loads(path.read_text())
    shown = (0.99, 0.999, 0.9999, 0.99999)
    rows = ["| model | " + " | ".join(f"cosine {c}" for c in shown)
            + " | cosine needed for 98% same set / overlap | 10th-11th score gap (median, in score std) |",
            "|---|" + "---|" * len(shown) + "---|---|"]
    for model, label in (("laser", "Laser"), ("sasrec", "SASRec alone")):
        m = r[model]
        cells = {row["cosine"]: f"{row['same_set']:.1%} / {row['mean_overlap']:.1%}" for row in m["rows"]}
        needed = m["cosine_needed_for_0.98"]
        rows.append(f"| {label} | " + " | ".join(cells.get(c, "-") for c in shown)
                    + f" | {needed['same_set'] or '> 0.999999'} / {needed['mean_overlap'] or '> 0.999999'} "
                    f"| {m['gap_10_11_in_score_std']['median']:.3f} |")
    measured = ["| Laser's LLM computed in | embedding cosine to fp32, mean / worst | top-10 same set | mean overlap |",
                "|---|---|---|---|"]
    for key, label in (("bf16_vs_fp32", "bf16 (the eager-bf16 scorer)"),
                       ("weight_int8_vs_fp32", "fp32 with 8-bit block-wise weights (nbits8 at fp32 compute)")):
        if key in r["laser"]:
            m = r["laser"][key]
            measured.append(f"| {label} | {m['mean_cosine']:.5f} / {m['min_cosine']:.5f} "
                            f"| {m['top10']['same_set']:.1%} | {m['top10']['mean_overlap']:.1%} |")
    return "\n".join(rows) + (
        f"\n\nCells: top-10 same set / mean top-10 overlap with the exact embedding's lists, after each user "
        f"embedding is moved to the given cosine from itself in a random direction ({r['seeds']} seeds); "
        f"{r['users']} held-out users of `{_repo_path(r['run'])}`.\n\n" + "\n".join(measured)
        + f"\n\nMeasured on {r['machine']['cpu']}, {r['machine']['torch_threads']} threads.")


def _hr_ndcg(metrics: dict) -> str:
    return f"{_fmt(metrics, 'HR@10')} / {_fmt(metrics, 'NDCG@10')}"


def _has_amx(flags: dict) -> bool:
    """Whether score_throughput.py's recorded CPU flags include an AMX one (PyTorch bf16 then runs on AMX tiles)."""
    return any(v for k, v in flags.items() if k.startswith("amx"))


def _amx_cell(m: dict | None) -> str:
    """The headline's AMX caveat: where PyTorch bf16 runs on AMX tiles, the recommended variant against it."""
    if not m or not _has_amx(m.get("cpu_flags", {})):
        return ""
    chosen = m.get("recommended_cpu_variant") or "fp32"
    return (f"; on {m['cpu_flags']['model_name']} with AMX: ORT {chosen} {m['recommended_vs']['ort_fp32']:.2f}x ORT "
            f"fp32 but {m['recommended_vs']['torch_bf16']:.2f}x PyTorch eager bf16 "
            f"({m['torch_bf16_users_per_s']:.2f} users/s)")


def headline_table(results_dir: Path) -> str:
    """README.md's one table: the headline number of each benchmark against its reference."""
    rows = ["| benchmark | laser-batch | reference |", "|---|---|---|"]
    for path in (results_dir / f"sasrec_{name}.json" for name in DATASETS):
        r = json.loads(path.read_text())
        key = "sasrec" if "sasrec" in r["published"] else "sasrec_laser_paper"
        reference = "published SASRec" if key == "sasrec" else "the Laser paper's SASRec"
        rows.append(f"| SASRec on {r['dataset']}: test HR@10 / NDCG@10 | {_hr_ndcg(r['models']['sasrec'])} "
                    f"| {reference} {_hr_ndcg(r['published'][key])} |")
    rows += scientific_headline(results_dir)
    ml100k = json.loads((results_dir / "laser_ml100k_soft_lowlr.json").read_text())["models"]
    guarded = f"{DEFAULT_DESIGN}_guard"  # the default design with laser.gate_guard, where it has run
    design = guarded if guarded in ml100k else DEFAULT_DESIGN
    if design in ml100k:
        laser = ml100k[design]
        rows.append(f"| Laser, the package's defaults (SmolLM2-135M, g = {laser['gate']:.3f}) on MovieLens-100K: test "
                    f"HR@10 / NDCG@10, NDCG@10 difference to SASRec [95% CI] | {_hr_ndcg(laser)}, "
                    f"{versus_cell(laser)} | SASRec alone "
                    f"{_hr_ndcg(ml100k['sasrec'])}; popularity {_hr_ndcg(ml100k['popularity'])} |")
    score = json.loads((results_dir / "score_throughput.json").read_text())
    largest = {s.get("model", "laser"): s for s in sorted(score["scaling"], key=lambda s: s["users"])}
    laser, sasrec = largest["laser"], largest["sasrec"]
    rows.append(f"| `laser-batch score`, tiny Laser artefacts, {laser['users']:,} synthetic users, CPU | "
                f"{laser['users_per_s']:.0f} users/s, peak RSS {laser['peak_rss_mb']:.0f} MB | SASRec-only "
                f"artefacts, {sasrec['users']:,} users: {sasrec['users_per_s']:,.0f} users/s, "
                f"{sasrec['peak_rss_mb']:.0f} MB |")
    smollm2 = score["smollm2"]
    fp32 = next(v for v in smollm2["ort"] if v["variant"] == "fp32")
    chosen = smollm2.get("recommended_cpu_variant") or "fp32"
    auto = next(v for v in smollm2["ort"] if v["variant"] == chosen)
    flags = smollm2.get("cpu_flags", {})
    amx = "AMX" if _has_amx(flags) else "no AMX"
    gate = (f", non-inferior on {auto['pairs']:,} held-out pairs (NDCG@10 {auto['ndcg10_diff']:+.4f} "
            f"[{auto['ndcg10_diff_ci95'][0]:+.4f}, {auto['ndcg10_diff_ci95'][1]:+.4f}])" if "pairs" in auto else "")
    rows.append(f"| SmolLM2-135M Laser user encoder{_of_run(smollm2)}, `score --variant auto` on the CPU: ORT "
                f"{chosen}{gate} | {auto['users_per_s']:.2f} users/s, {auto['users_per_s'] / fp32['users_per_s']:.2f}x "
                f"ORT fp32 ({fp32['users_per_s']:.2f}) | PyTorch eager bf16 {smollm2['torch_bf16_users_per_s']:.2f} "
                f"users/s ({flags.get('model_name', 'CPU')}, {amx}){_amx_cell(score.get('smollm2_amx'))} |")
    used = [*(results_dir / f"sasrec_{name}.json" for name in DATASETS), *results_dir.glob("laser_ml100k*.json"),
            results_dir / "score_throughput.json", *results_dir.glob(SCIENTIFIC_RESULTS)]
    cpus = sorted({json.loads(p.read_text())["machine"]["cpu"] for p in used})
    return "\n".join(rows) + (f"\n\nHR@10 / NDCG@10: leave-one-out test split, full ranking, history excluded. "
                              f"Measured on 2-core machines ({' / '.join(cpus)}); every row, with its command and "
                              f"machine, in benchmarks/README.md.")


def cuda_table(results_dir: Path) -> str:
    """benchmarks/cuda_check.py on a lent GPU: the score job and the user encoder per provider, precision, binding."""
    r = json.loads((results_dir / "cuda_check.json").read_text())
    jobs, emb, machine = r["score_jobs"], r["embeddings"], r["machine"]
    rows = ["| `laser-batch score` (tiny example artefacts) | users/s | provider | same top-10 set as CPU fp32 | "
            "mean top-10 overlap | max score diff |", "|---|---|---|---|---|---|"]
    for name, j in jobs.items():
        rows.append(f"| {name} | {j['run2_users_per_second']:,.0f} | {j['provider']} | {j['same_top10_set']:.3f} | "
                    f"{j['mean_top10_overlap']:.4f} | {j['max_score_diff']:.2g} |")
    rows += ["", "| user embeddings | users/s | cosine to ORT CPU fp32: mean / min |", "|---|---|---|"]
    for name, e in emb.items():
        if isinstance(e, dict) and "users_per_second" in e:
            cosine = e.get("cosine_vs_ort_cpu_fp32")
            shown = f"{cosine['mean']:.6f} / {cosine['min']:.6f}" if cosine else "(reference)"
            rows.append(f"| {name} | {e['users_per_second']:,.0f} | {shown} |")
    return "\n".join(rows) + (f"\n\n{r['job_users']:,} users for the jobs (each timed on its second run), "
                              f"{emb['users']:,} for the embeddings; {machine['nvidia_smi'].split(' (')[0]}, "
                              f"onnxruntime-gpu {machine['onnxruntime']}, torch {machine['torch']}. "
                              f"Command: `{r['command']}`.")


def incremental_table(results_dir: Path) -> str:
    """An incremental night (`score --previous`) against a full run of the same night (benchmarks/incremental.py)."""
    path = results_dir / "incremental.json"
    if not path.exists():
        return "(no results yet: run python benchmarks/incremental.py)"
    rows = ["| model | night 2 run | users scored | reused | encoded | wall time | job time | same users, ranks, "
            "items as full | largest score difference |", "|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for name, r in json.loads(path.read_text())["runs"].items():
        c, same = r["configuration"], r["incremental_vs_full"]
        for key, label in (("night2_full", "full run"), ("night2_incremental", "`--previous` night 1")):
            n = r[key]
            check = ("yes" if same["same_users_ranks_items"] else "NO", f"{same['max_abs_score_difference']:.1e}")
            rows.append(f"| {name} | {label} | {n['users_scored']:,} | {n['reused']:,} | {n['encoded']:,} | "
                        f"{n['wall_seconds']:.1f} s | {n['job_seconds']:.1f} s | "
                        + (" | ".join(check) if key == "night2_incremental" else " | ") + " |")
        notes.append(f"{name}: {c['users']:,} synthetic users, {c['changed_users']:,} ({c['changed_share']:.0%}) "
                     f"with new activity, speed-up {r['speedup_wall']}x in wall time (process start included); "
                     f"{r['model']}; measured on {r['machine']['cpu']}, {c['threads']} threads; `{r['command']}`.")
    return "\n".join(rows) + "\n\n" + "\n\n".join(notes)


def epoch_cost_table(results_dir: Path) -> str:
    """Seconds per stage-1 epoch on Scientific, the paper's setup against the fast one (benchmarks/epoch_cost.py)."""
    path = results_dir / "epoch_cost.json"
    if not path.exists():
        return "(no results yet: run python benchmarks/epoch_cost.py)"
    r = json.loads(path.read_text())
    rows = ["| setup | LLM blocks | CF tokens | fusion | item re-encoding | training steps | validation users | "
            "s / epoch |", "|---|---|---|---|---|---|---|---|"]
    for name in ("paper", "fast"):
        llm, part = r["llm"][name], r["per_part"][name]
        rows.append(f"| {name} (`{Path(r['configs'][name]).name}`) | {llm['num_layers']} | {llm['cf_position']} | "
                    f"{llm['fusion']} | {part['items']:,.0f} s | {part['steps']:,.0f} s | {part['users']:,.0f} s | "
                    f"{part['total']:,.0f} |")
    sl = r["slices"]["paper"]
    return "\n".join(rows) + (
        f"\n\nSpeed-up: **{r['speedup']}x** per epoch, both measured in one process, interleaved; each part timed on "
        f"a slice ({sl['items']} of {sl['of_items']:,} items, {sl['steps']} of {sl['of_steps']:,} steps, "
        f"{sl['users']} of {sl['of_users']:,} validation users) and scaled; {r['machine']['cpu']}, "
        f"{r['machine']['torch_threads']} threads. Command: `{r['command']}`.")


def cold_items_table(results_dir: Path) -> str:
    """New items added with `items add` after training without them (benchmarks/cold_items.py)."""
    path = results_dir / "cold_items.json"
    if not path.exists():
        return "(no results yet: run python benchmarks/cold_items.py)"
    rows = ["| data set | users | ranking | HR@10 | NDCG@10 | NDCG@10 difference [95% CI] |",
            "|---|---|---|---|---|---|"]
    notes = []

    def diff(d: dict | None, against: str) -> str:
        return f"{d['diff']:+.4f} [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}] vs {against}" if d else ""

    for name, r in json.loads(path.read_text()).items():
        cold, warm, facts = r["cold"], r["warm"], r["facts"]
        users = f"{facts['cold_users']:,} cold"
        fallbacks = [f for f in ("mean", "zeros", "neighbours") if f"laser_{f}" in cold]
        for key, label, against, vs in (
                ("popularity", "popularity (training counts), full catalogue", None, None),
                *((f"laser_{f}", f"Laser, fallback `{f}`, full catalogue", "popularity", "vs_popularity")
                  for f in fallbacks),
                ("random_order_of_new_items", "random order of the new items (oracle: target known new)", None, None),
                *((f"laser_{f}_among_new_items", f"Laser, `{f}`, among the new items", "random order",
                   "vs_random_order") for f in fallbacks)):
            m = cold[key]
            rows.append(f"| {name} | {users} | {label} | {_fmt(m, 'HR@10')} | {_fmt(m, 'NDCG@10')} | "
                        f"{diff(m.get(vs), against) if vs else ''} |")
        wu = f"{warm['users']:,} warm"
        rows.append(f"| {name} | {wu} | Laser before `items add` | {_fmt(warm['before'], 'HR@10')} | "
                    f"{_fmt(warm['before'], 'NDCG@10')} | |")
        for fallback in fallbacks:
            a = warm[f"after_{fallback}"]
            rows.append(f"| {name} | {wu} | Laser after `items add`, `{fallback}` ({a['new_items_share_of_top10']:.1%} "
                        f"of top 10 new) | {_fmt(a, 'HR@10')} | {_fmt(a, 'NDCG@10')} | "
                        f"{diff(a['vs_before'], 'before')} |")
        t = r["training"]
        notes.append(f"{name}: {facts['held_out_items']:,} of {facts['items']:,} items held out with their "
                     f"{facts['held_out_interactions']:,} of {facts['interactions']:,} interactions; Laser "
                     f"`{Path(t['config_file']).name}` + 8 blocks, CF tokens after the text, gated fusion (g = "
                     f"{t['gate']:.3f}); fallback by cold NDCG@10: `{r['fallback_by_cold_NDCG@10']}`; "
                     f"{r['machine']['cpu']}, {r['machine']['torch_threads']} threads; `{r['command']}`.")
    return "\n".join(rows) + "\n\n" + "\n\n".join(notes)


# Which tables each file holds, in order.
TABLES = {
    "README.md": (("headline", headline_table),),
    "benchmarks/README.md": (
        ("sasrec", sasrec_table), ("laser-scientific", laser_scientific_table),
        ("laser", laser_table), ("laser-proxy", laser_proxy_table),
        ("laser-bypass", laser_bypass_table), ("export", export_table), ("quant-gate", quant_gate_table),
        ("topk-sensitivity", sensitivity_table),
        ("score", score_table), ("score-ray", score_ray_table), ("incremental", incremental_table),
        ("cold-items", cold_items_table),
        ("epoch-cost", epoch_cost_table),
        ("cuda", cuda_table),
    ),
}


def render(text: str, table: str, name: str, where: str) -> str:
    """`text` with the lines between NAME's markers replaced by `table`."""
    begin, end = f"<!-- {name}-table:begin -->", f"<!-- {name}-table:end -->"
    if text.count(begin) != 1 or text.count(end) != 1:
        raise SystemExit(f"{where}: expected one {begin} and one {end}")
    head, _, rest = text.partition(begin)
    _, _, tail = rest.partition(end)
    return f"{head}{begin}\n{table}\n{end}{tail}"


def regenerate(root: Path) -> dict[Path, tuple[str, str]]:
    """For each file with generated tables: (its text now, its text with every table regenerated)."""
    results = root / "benchmarks" / "results"
    out = {}
    for name, tables in TABLES.items():
        path = root / name
        text = updated = path.read_text()
        for table, make in tables:
            updated = render(updated, make(results), table, name)
        out[path] = (text, updated)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--root", type=Path, default=ROOT, help="the repository (default: this one)")
    args = parser.parse_args()
    files = regenerate(args.root)
    stale = [str(path) for path, (text, updated) in files.items() if text != updated]
    if args.check:
        if stale:
            print(f"stale generated tables in {', '.join(stale)}: run python benchmarks/readme_table.py")
        sys.exit(1 if stale else 0)
    for path, (text, updated) in files.items():
        if text != updated:
            path.write_text(updated)


if __name__ == "__main__":
    main()
