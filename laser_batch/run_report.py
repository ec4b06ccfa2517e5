"""What a training run did, epoch by epoch: the body of `report.json` for a run directory. No torch.

`train` appends one line per epoch to RUN_DIR/sasrec/metrics.jsonl (epoch, loss, seconds, the validation metrics)
and RUN_DIR/laser/metrics.jsonl (the same with its stage, 1 or 2; stage 1 epoch 0 is the untrained model's
validation, without a loss; a fused model adds its gate). The report keeps those records per model and names the
validation metrics found in them, which the page draws as curves.
"""

from __future__ import annotations

import json
from pathlib import Path

from laser_batch.checkpoint import LASER_DIR, METRICS_FILE, RUN_FILE, SASREC_DIR
from laser_batch.errors import CheckpointError

MODELS = (SASREC_DIR, LASER_DIR)
NOT_METRICS = {"epoch", "stage", "loss", "seconds", "split", "gate"}


def is_run_dir(path: Path) -> bool:
    """A run directory written by `train`: run.json and at least one finished stage's metrics."""
    return (path / RUN_FILE).is_file() and any((path / m / METRICS_FILE).is_file() for m in MODELS)


def run_report(run_dir: Path) -> dict:
    """{"kind": "run", "run_dir", "models": {model: {"epochs": [records], "metrics": [validation metric names]}}}.

    Raises:
        CheckpointError: not a run directory, or a metrics line that is not JSON (the file and line are named).
    """
    run_dir = Path(run_dir)
    if not is_run_dir(run_dir):
        raise CheckpointError(f"{run_dir}: not a run directory written by laser-batch train (no {RUN_FILE} and "
                              f"{SASREC_DIR}/{METRICS_FILE})")
    models = {}
    for model in MODELS:
        path = run_dir / model / METRICS_FILE
        if not path.is_file():
            continue
        records = []
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise CheckpointError(f"{path}: line {number} is not JSON ({e.msg})") from None
        names = sorted({k for r in records for k, v in r.items()
                        if k not in NOT_METRICS and isinstance(v, int | float)})
        models[model] = {"epochs": records, "metrics": names}
    return {"kind": "run", "run_dir": str(run_dir), "models": models}


def epoch_labels(records: list[dict]) -> list[str]:
    """The x labels of a model's epochs: "3" for SASRec, "s1e3" (stage 1, epoch 3) for Laser."""
    return [f"s{r['stage']}e{r['epoch']}" if "stage" in r else str(r["epoch"]) for r in records]
