"""The quality gate of an export's quantised variants, as recorded in its manifest, into results/quant_gate.json.

    python benchmarks/quant_gate.py --artifacts work/Scientific/artifacts --label all_users \
        --export-command "laser-batch export ... --quantize int8-smooth --quantize int8-smooth-mixed"

The gate itself runs in `laser-batch export --quantize` (exporters/gate.py); this copies its numbers (per variant:
NDCG@10 / HR@10 differences to fp32 with 95% intervals, non-inferiority, hit changes, top-10 overlap, speed; fp32's
and PyTorch bf16's numbers; the sensitivity passes' picks) next to the command that made the export, so the
README can cite them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sasrec_s3rec import machine

HERE = Path(__file__).resolve().parent


def summary(manifest: dict) -> dict:
    encoder = manifest["graphs"]["user_encoder"]
    keep = ("quantized_layers", "users_per_second", "fp32_users_per_second", "speedup_vs_fp32", "mean_cosine",
            "min_cosine", "top10_vs_fp32")
    return {
        "gate": encoder["gate"],
        "recommended_cpu_variant": encoder.get("recommended_cpu_variant"),
        "recommended_reason": encoder.get("recommended_reason"),
        "variants": {name: {**{k: v[k] for k in keep if k in v}, "gate": v.get("gate"), "skipped": v.get("skipped")}
                     for name, v in encoder["variants"].items()},
        "sensitivity": {name: {"kept": p["kept"], "rule": p["rule"], "seconds": p["seconds"],
                               "calibration_users": p["calibration_users"],
                               "worst_layers": dict(list(p["layers"].items())[:8]),
                               "summed_error": sum(p["layers"].values())}
                        for name, p in encoder.get("sensitivity", {}).items()},
        "export_seconds": manifest.get("export_seconds"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", type=Path, required=True)
    parser.add_argument("--label", required=True)
    parser.add_argument("--model", type=Path, default=Path("benchmarks/work/Scientific/run_laser_text"),
                        help="the trained run the artefacts were exported from (recorded)")
    parser.add_argument("--export-command", required=True)
    parser.add_argument("--note", default="")
    parser.add_argument("--results", type=Path, default=HERE / "results" / "quant_gate.json")
    args = parser.parse_args()
    manifest = json.loads((args.artifacts / "manifest.json").read_text())
    record = json.loads(args.results.read_text()) if args.results.exists() else {}
    record[args.label] = {"command": " ".join([Path(sys.executable).name, *sys.argv]),
                          "export_command": args.export_command, "machine": machine(),
                          "llm": manifest["settings"]["llm"].get("source"),
                          "model": str(args.model), "artifacts": str(args.artifacts),
                          **({"note": args.note} if args.note else {}), **summary(manifest)}
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
