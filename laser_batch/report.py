"""`laser-batch report DIR` and `score --report`: a page and a JSON file on a night's output or a training run.

    DIR is a `score` output -> users, rejects, coverage@K, Gini, popularity, scores, short of K, throughput
                               (`recs_report`), with `previous` also the change since that output;
    DIR is a training run   -> loss and validation metrics per epoch, SASRec and Laser (`run_report`).

Writes `report.html` (`report_page`, self-contained) and `report.json` next to it. What DIR is, `previous` and
`--fail-on` are checked before any work; anything else is one InputError line.
"""

from __future__ import annotations

import json
from pathlib import Path

from laser_batch import quality
from laser_batch.errors import InputError
from laser_batch.files import atomic_write
from laser_batch.recs_report import is_recs_dir, recs_report
from laser_batch.run_report import is_run_dir, run_report

HTML, JSON = "report.html", "report.json"


def kind_of(path: Path) -> str:
    """"recommendations" or "run".

    Raises:
        InputError: DIR is neither a `score` output nor a run directory written by `train`.
    """
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"{path}: no such directory (report takes a score output or a training run directory)")
    if is_recs_dir(path):
        return "recommendations"
    if is_run_dir(path):
        return "run"
    raise InputError(f"{path}: neither the output of laser-batch score (summary.json, part-*.parquet) nor a training "
                     "run (run.json, sasrec/metrics.jsonl)")


def write_report(path: Path, *, out: Path | None = None, previous: Path | None = None, artifacts: Path | None = None,
                 fail_on: str | None = None) -> dict:
    """Write the report of DIR to `out` (default DIR/report.html) and report.json beside it; return the numbers.

    Raises:
        InputError: see `kind_of`; `previous` or `fail_on` given for a training run; a bad `--fail-on`.
        quality.QualityCheckError: a `--fail-on` check held (both files are written first).
    """
    from laser_batch import report_page  # matplotlib: only when a page is drawn

    path = Path(path)
    kind = kind_of(path)
    if kind == "run" and (previous is not None or fail_on):
        raise InputError(f"{path}: a training run; --previous and --fail-on apply to score outputs")
    checks = quality.parse_checks(fail_on, previous=previous is not None) if fail_on else []
    out = Path(out) if out is not None else path / HTML
    if kind == "run":
        numbers = run_report(path)
        page = report_page.run_page(numbers)
    else:
        numbers, series = recs_report(path, previous=previous, artifacts=artifacts)
        page = report_page.recs_page(numbers, series)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out.with_suffix(".json"), lambda f: f.write_text(json.dumps(numbers, indent=2) + "\n"))
    atomic_write(out, lambda f: f.write_text(page))
    if checks:
        quality.enforce(checks, numbers["metrics"], str(path))
    return numbers
