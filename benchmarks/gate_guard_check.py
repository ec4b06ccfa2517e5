"""Would `laser.gate_guard` have kept a trained fused run's gate? Refits g on the run's own validation users.

    cd benchmarks && python gate_guard_check.py --run work/Scientific/run_laser_text
        --results results/laser_scientific.json --model laser_text

The run's kept checkpoint (weights and item matrix) is loaded; its validation users are the ones training selected
with (`laser.valid_users`: the same evenly spread subset); g is chosen on the same grid exactly as training does
(`laser_state.gate_grid_ranks` and `choose_gate`), once without and once with the guard. Stored in the results file
under the row: `"gate_guard": {"gate_fitted", "gate_with_guard", "valid_gain", "valid_gain_ci95", "users"}`. If the
guard keeps the fitted g at the kept epoch, a run with the guard keeps that epoch too (the guard only lowers other
epochs' validation scores, never this one's), so the row's test numbers are what the guard would have shipped.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from laser_batch.checkpoint import LASER_DIR, load_laser, read_run_info
from laser_batch.config import TextConfig, TrainConfig, from_dict
from laser_batch.contracts import load_data_dir
from laser_batch.encode import laser_inputs
from laser_batch.laser_state import GATE_GRID, choose_gate, gate_grid_ranks
from laser_batch.metrics import metric_per_user, paired_bootstrap
from laser_batch.sequences import build_sequences
from laser_batch.train_laser import validation_users

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="a trained run with laser.fusion = 'gated'")
    parser.add_argument("--results", type=Path, required=True, help="the results file holding the run's row")
    parser.add_argument("--model", required=True, help="the row's name under 'models'")
    parser.add_argument("--select", default="NDCG@10", help="the run's train.select_metric (not in laser/config.json)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    record = json.loads(args.results.read_text())
    if args.model not in record["models"]:
        raise SystemExit(f"error: {args.results}: no row {args.model!r} under 'models'")
    laser, items, config = load_laser(args.run)
    if config["laser"]["fusion"] != "gated":
        raise SystemExit(f"error: {args.run}: laser.fusion = {config['laser']['fusion']!r}, not 'gated'")
    dataset = load_data_dir(Path(read_run_info(args.run)["data_dir"]))
    sequences = build_sequences(dataset.interactions)
    sequences.check_maps(args.run / LASER_DIR)
    histories, targets = validation_users(sequences, config["laser"]["valid_users"])  # the users training used
    inputs = laser_inputs(laser.llm, dataset.items, sequences, from_dict(TextConfig, config["text"], "text"),
                          laser.sasrec.config.max_len)
    logging.info("refitting g on %d validation users", len(targets))
    ranks = gate_grid_ranks(laser, inputs, items, histories, targets, batch_size=256,
                            encode_batch_size=config["laser"]["item_batch_size"])
    select, ks = args.select, TrainConfig(select_metric=args.select).select_ks
    fitted, _ = choose_gate(ranks, ks, select, guard=False)
    if abs(GATE_GRID[fitted] - (config.get("gate") or 0.0)) > 1e-6:
        raise SystemExit(f"error: the refitted g {GATE_GRID[fitted]} differs from the run's {config.get('gate')}: "
                         "not the users or the metric the run selected with")
    guarded, _ = choose_gate(ranks, ks, select, guard=True)
    gain, interval = paired_bootstrap(metric_per_user(ranks[0], select), metric_per_user(ranks[fitted], select))
    check = {"gate_fitted": GATE_GRID[fitted], "gate_with_guard": GATE_GRID[guarded], "select_metric": select,
             "valid_gain": round(gain, 5), "valid_gain_ci95": [round(v, 5) for v in interval],
             "users": len(targets), "saved_gate": config.get("gate"),
             "command": f"python gate_guard_check.py --run {args.run} --results {args.results} "
                        f"--model {args.model}"}
    logging.info("%s", check)
    record["models"][args.model]["gate_guard"] = check
    tmp = args.results.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(args.results)


if __name__ == "__main__":
    main()
