"""`--fail-on "coverage<0.05,jaccard_mean<0.2"`: checks on a night's report that make the job fail. No torch.

Each check is `METRIC OP NUMBER` (OP one of <, <=, >, >=), comma-separated; a check *fails* when its condition
holds, e.g. `coverage<0.05` fails a night whose coverage is below 5%. The metrics are the scalars of the report's
`metrics` (`laser_batch.recs_report`). The expression is parsed before any work; a job whose checks fail keeps its
output but gets no `_SUCCESS`, and the CLI exits with `QualityCheckError.exit_code` and one line naming the check.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass

from laser_batch.errors import InputError, LaserBatchError

METRICS = {
    "users_scored": "users scored",
    "rejected_share": "rejected users / input users",
    "coverage": "distinct recommended items / catalogue items",
    "gini": "Gini index of how often each catalogue item is recommended",
    "popularity_lift": "mean popularity of recommended items / the catalogue's",
    "short_of_k_share": "users with fewer than K items / users scored",
    "score_mean": "mean score of the recommendations",
    "jaccard_mean": "mean per-user Jaccard@K with the previous output",
    "jaccard_median": "median per-user Jaccard@K with the previous output",
    "items_new": "items recommended now but not in the previous output",
    "items_dropped": "items recommended in the previous output but not now",
}
NEED_PREVIOUS = ("jaccard_mean", "jaccard_median", "items_new", "items_dropped")
OPERATORS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}
_CHECK = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*(<=|>=|<|>)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*")


class QualityCheckError(LaserBatchError):
    """A `--fail-on` check held: the output is kept, unfinished (no `_SUCCESS`)."""

    exit_code = 3


@dataclass(frozen=True)
class Check:
    metric: str
    op: str
    value: float

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.value:g}"

    def holds(self, metrics: dict) -> bool:
        return OPERATORS[self.op](metrics[self.metric], self.value)


def parse_checks(expression: str, *, previous: bool) -> list[Check]:
    """The checks of a `--fail-on` expression.

    Args:
        previous: whether a previous output will be compared with (the Jaccard and item metrics need one).

    Raises:
        InputError: a check that does not parse, an unknown metric, or a metric that needs a previous output.
    """
    checks = []
    for part in expression.split(","):
        match = _CHECK.fullmatch(part)
        if not match:
            raise InputError(f"--fail-on {expression!r}: cannot parse {part.strip()!r} (expected METRIC<NUMBER, "
                             "with <, <=, > or >=, comma-separated)")
        metric, op, value = match.groups()
        if metric not in METRICS:
            raise InputError(f"--fail-on {expression!r}: unknown metric {metric!r} (known: {', '.join(METRICS)})")
        if metric in NEED_PREVIOUS and not previous:
            raise InputError(f"--fail-on {expression!r}: {metric} compares with a previous output; give one "
                             "(report --previous DIR, or score --previous DIR)")
        checks.append(Check(metric, op, float(value)))
    return checks


def failed(checks: list[Check], metrics: dict) -> list[str]:
    """The checks that hold, each as `check (metric value)`; a metric the report could not compute is an error.

    Raises:
        InputError: a checked metric is missing from this report (e.g. popularity from artefacts without counts).
    """
    missing = [c.metric for c in checks if metrics.get(c.metric) is None]
    if missing:
        raise InputError(f"--fail-on: {missing[0]} could not be computed for this output")
    return [f"{c} ({c.metric} {metrics[c.metric]:.4g})" for c in checks if c.holds(metrics)]


def enforce(checks: list[Check], metrics: dict, where: str) -> None:
    """Raise QualityCheckError naming every check that held on the report of `where`."""
    held = failed(checks, metrics)
    if held:
        raise QualityCheckError(f"{where}: --fail-on check failed: {'; '.join(held)}")
