"""The run report: report.json against numbers worked out here, bad input, --fail-on, and the page in a browser."""

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from laser_batch.cli import app
from laser_batch.errors import InputError
from laser_batch.quality import QualityCheckError, parse_checks
from laser_batch.report import write_report

CHROMIUM = "/usr/bin/chromium"
REASONS = {"null user_id": 0, "duplicate user": 1, "empty history": 2, "no known items": 0, "no eligible items": 0}
# The catalogue: item id -> training interactions.
POPULARITY = {10: 50, 11: 20, 12: 10, 13: 5, 14: 1, 15: 0}
TONIGHT = {1: [10, 11, 12], 2: [10, 11, 13], 3: [10, 12], 4: [11, 10, 12]}  # user 3 is short of K = 3
BEFORE = {1: [10, 11, 14], 2: [13, 11, 10], 3: [15, 14, 12], 5: [10, 11, 12]}  # user 4 new, user 5 gone


def _artifacts(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    pl.DataFrame({"index": range(len(POPULARITY)), "item_id": list(POPULARITY),
                  "train_interactions": list(POPULARITY.values())}).write_parquet(root / "item_ids.parquet")
    return root


def _recs_dir(root: Path, recs: dict, layout: str, artifacts: Path, *, success: bool = True) -> Path:
    """A `score` output as the job writes it (two part files), scores falling with the rank."""
    root.mkdir(parents=True)
    users = sorted(recs)
    for part, chunk in enumerate((users[:2], users[2:])):
        rows = [(u, rank, item, 1.0 - 0.1 * rank) for u in chunk for rank, item in enumerate(recs[u], start=1)]
        frame = pl.DataFrame(rows, schema={"user_id": pl.Int64, "rank": pl.Int32, "item_id": pl.Int64,
                                           "score": pl.Float32}, orient="row")
        if layout == "list":
            frame = frame.group_by("user_id", maintain_order=True).agg(item_ids="item_id", scores="score")
        frame.write_parquet(root / f"part-{part:05d}.parquet")
    summary = {"users_in": len(recs) + 3, "users_scored": len(recs), "users_rejected": REASONS, "top_k": 3,
               "model": str(artifacts), "users_per_second": 123.4, "tokens_per_second": 5678.9, "seconds": 2.5,
               "provider": "CPUExecutionProvider", "padding_efficiency": 0.8}
    (root / "summary.json").write_text(json.dumps(summary))
    if success:
        (root / "_SUCCESS").write_text("")
    return root


def _gini_by_pairs(x: list[float]) -> float:
    """Gini as the mean absolute difference over all pairs / (2 * mean): another formula than the library's."""
    x = np.asarray(x, dtype=float)
    return float(np.abs(x[:, None] - x[None, :]).sum() / (2 * len(x) ** 2 * x.mean()))


@pytest.mark.parametrize("layout", ["long", "list"])
def test_report_json_matches_numbers_worked_out_here(tmp_path, layout):
    art = _artifacts(tmp_path / "art")
    tonight = _recs_dir(tmp_path / "tonight", TONIGHT, layout, art)
    before = _recs_dir(tmp_path / "before", BEFORE, layout, art)
    write_report(tonight, previous=before)
    report = json.loads((tonight / "report.json").read_text())

    rows = [(u, i) for u, items in TONIGHT.items() for i in items]
    recommended = {i for _, i in rows}
    per_item = [sum(i == item for _, i in rows) for item in POPULARITY]  # 10: 4, 11: 3, 12: 3, 13: 1, 14: 0, 15: 0
    assert per_item == [4, 3, 3, 1, 0, 0]
    assert report["layout"] == layout and report["committed"] is True
    assert report["users"] == {"in": 7, "scored": 4, "rejected": REASONS, "rejected_total": 3}
    assert report["recommendations"] == 11
    assert report["coverage"] == pytest.approx(4 / 6)
    assert report["gini"] == pytest.approx(_gini_by_pairs(per_item))
    catalogue_mean = sum(POPULARITY.values()) / 6
    recommended_mean = sum(POPULARITY[i] for _, i in rows) / len(rows)
    assert report["popularity"]["recommended_mean"] == pytest.approx(recommended_mean)
    assert report["popularity"]["catalogue_mean"] == pytest.approx(catalogue_mean)
    assert report["popularity"]["lift"] == pytest.approx(recommended_mean / catalogue_mean)
    scores = [1.0 - 0.1 * rank for items in TONIGHT.values() for rank in range(1, len(items) + 1)]
    assert report["score"]["mean"] == pytest.approx(np.mean(scores), abs=1e-6)
    assert report["score"]["max"] == pytest.approx(0.9) and report["score"]["min"] == pytest.approx(0.7)
    assert sum(report["score"]["histogram"]["counts"]) == 11
    assert report["short_of_k"] == {"users": 1, "share": 0.25, "items_per_user": {"2": 1, "3": 3}}
    assert report["throughput"]["users_per_second"] == 123.4

    previous = report["previous"]
    jaccard = []
    for user in set(TONIGHT) & set(BEFORE):
        a, b = set(TONIGHT[user]), set(BEFORE[user])
        jaccard.append(len(a & b) / len(a | b))
    assert sorted(jaccard) == pytest.approx([0.25, 0.5, 1.0])
    assert previous["users_compared"] == 3 and previous["users_new"] == 1 and previous["users_gone"] == 1
    assert previous["jaccard"]["mean"] == pytest.approx(np.mean(jaccard))
    assert previous["jaccard"]["p50"] == pytest.approx(np.median(jaccard))
    before_items = {i for items in BEFORE.values() for i in items}
    assert previous["items_new"] == len(recommended - before_items) == 0
    assert previous["items_dropped"] == len(before_items - recommended) == 2
    assert sorted(item for item, _ in previous["items_dropped_top"]) == [14, 15]
    assert previous["items_kept"] == 4
    assert report["metrics"]["jaccard_mean"] == pytest.approx(np.mean(jaccard))
    assert report["metrics"]["coverage"] == pytest.approx(4 / 6)

    page = (tonight / "report.html").read_text()
    assert page.count("<img class='plot'") == 7  # users, concentration, popularity, scores, per user, 2 compared
    assert "http://" not in page and "https://" not in page  # nothing fetched


def test_a_previous_output_unfinished_or_of_another_layout_is_refused(tmp_path):
    art = _artifacts(tmp_path / "art")
    tonight = _recs_dir(tmp_path / "tonight", TONIGHT, "long", art)
    with pytest.raises(InputError, match="written with --layout list"):
        write_report(tonight, previous=_recs_dir(tmp_path / "list", BEFORE, "list", art))
    with pytest.raises(InputError, match="not a finished laser-batch score output"):
        write_report(tonight, previous=_recs_dir(tmp_path / "open", BEFORE, "long", art, success=False))


def test_fail_on_parses_before_any_work_and_names_the_failed_check(tmp_path):
    assert [str(c) for c in parse_checks("coverage<0.05, gini>=0.9", previous=False)] == ["coverage<0.05",
                                                                                         "gini>=0.9"]
    for bad, message in (("coverage<", "cannot parse"), ("coverage=0.1", "cannot parse"),
                         ("cov<0.1", "unknown metric 'cov'"), ("jaccard_mean<0.2", "previous output")):
        with pytest.raises(InputError, match=message):
            parse_checks(bad, previous=False)
    art = _artifacts(tmp_path / "art")
    tonight = _recs_dir(tmp_path / "tonight", TONIGHT, "long", art)
    before = _recs_dir(tmp_path / "before", BEFORE, "long", art)
    with pytest.raises(QualityCheckError, match=r"jaccard_mean<0\.7 \(jaccard_mean 0\.5833\)") as e:
        write_report(tonight, previous=before, fail_on="coverage<0.5,jaccard_mean<0.7")
    assert "coverage" not in str(e.value)  # 0.667 is not below 0.5: only the check that held is named
    assert (tonight / "report.json").exists()  # written for inspection before the check fails
    write_report(tonight, previous=before, fail_on="coverage<0.5")  # nothing holds: no error


def test_cli_report_errors_are_one_line_with_exit_code_2_or_3(tmp_path):
    runner = CliRunner()
    art = _artifacts(tmp_path / "art")
    tonight = _recs_dir(tmp_path / "tonight", TONIGHT, "long", art)
    for args, code, message in (
            ([str(art)], 2, "neither the output of laser-batch score"),
            ([str(tmp_path / "missing")], 2, "no such directory"),
            ([str(tonight), "--fail-on", "coverage<<1"], 2, "cannot parse"),
            ([str(tonight), "--fail-on", "coverage<0.9"], 3, "--fail-on check failed: coverage<0.9")):
        result = runner.invoke(app, ["report", *args])
        assert result.exit_code == code, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert not (tmp_path / "missing").exists()
    moved = tmp_path / "moved"  # artefacts no longer where summary.json says: --model names them
    shutil.move(art, moved)
    result = runner.invoke(app, ["report", str(tonight)])
    assert result.exit_code == 2 and "pass --model ARTIFACTS" in result.output
    result = runner.invoke(app, ["report", str(tonight), "--model", str(moved), "--out", str(tmp_path / "r.html")])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "r.json").read_text())["coverage"] == pytest.approx(4 / 6)


def _run_dir(root: Path) -> Path:
    """A run directory as `train` leaves it: run.json and one metrics line per epoch for SASRec and Laser."""
    (root / "sasrec").mkdir(parents=True)
    (root / "laser").mkdir()
    (root / "run.json").write_text("{}")
    sasrec = [{"epoch": e, "loss": 5.0 - e, "seconds": 1.0, "split": "valid", "NDCG@10": 0.01 * e, "HR@10": 0.02 * e}
              for e in range(1, 5)]
    laser = [{"stage": 1, "epoch": 0, "split": "valid", "NDCG@10": 0.03, "HR@10": 0.05},
             *({"stage": s, "epoch": e, "loss": 3.0 / (s + e), "seconds": 2.0, "split": "valid",
                "NDCG@10": 0.03 + 0.001 * e, "HR@10": 0.05} for s, e in ((1, 1), (1, 2), (2, 1)))]
    (root / "sasrec" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sasrec))
    (root / "laser" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in laser))
    return root


def test_a_training_run_gets_its_curves(tmp_path):
    run = _run_dir(tmp_path / "run")
    result = CliRunner().invoke(app, ["report", str(run)])
    assert result.exit_code == 0, result.output
    report = json.loads((run / "report.json").read_text())
    assert report["kind"] == "run"
    assert report["models"]["sasrec"]["metrics"] == ["HR@10", "NDCG@10"]
    assert [r["epoch"] for r in report["models"]["laser"]["epochs"]] == [0, 1, 2, 1]
    assert report["models"]["sasrec"]["epochs"][3]["loss"] == 1.0
    assert (run / "report.html").read_text().count("<img class='plot'") == 2
    result = CliRunner().invoke(app, ["report", str(run), "--fail-on", "coverage<0.1"])
    assert result.exit_code == 2 and "a training run" in result.output
    (run / "laser" / "metrics.jsonl").write_text("{not json\n")
    result = CliRunner().invoke(app, ["report", str(run)])
    assert result.exit_code == 2 and "laser/metrics.jsonl: line 1 is not JSON" in result.output


def _plots_drawn(page: Path, tmp_path: Path) -> list[dict]:
    """Each plot's box on the page rendered by headless Chromium, and the pixels of a screenshot inside it."""
    from PIL import Image

    probe = tmp_path / "probe.html"  # the page plus a script that writes where its plots are into the DOM
    probe.write_text(page.read_text().replace("</body>", """<script>
document.body.setAttribute('data-plots', JSON.stringify([...document.querySelectorAll('img.plot')].map(e => {
  const r = e.getBoundingClientRect();
  return {x: r.x, y: r.y + window.scrollY, w: r.width, h: r.height, loaded: e.complete && e.naturalWidth > 0};
})));
document.body.setAttribute('data-height', document.documentElement.scrollHeight);
</script></body>"""))
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             "--force-device-scale-factor=1", "--window-size=1400,6000"]
    dom = subprocess.run([*flags, "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120,
                         check=True).stdout
    start = dom.index("data-plots=\"") + len("data-plots=\"")
    plots = json.loads(dom[start:dom.index("\"", start)].replace("&quot;", "\""))
    shot = tmp_path / "shot.png"
    subprocess.run([*flags, f"--screenshot={shot}", page.as_uri()], capture_output=True, timeout=120, check=True)
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    for plot in plots:
        x, y, w, h = (int(round(plot[k])) for k in ("x", "y", "w", "h"))
        inside = pixels[y + 2:y + h - 2, x + 2:x + w - 2]
        plot["std"] = float(inside.std()) if inside.size else 0.0
        plot["ink"] = float((inside < 200).mean()) if inside.size else 0.0  # share of dark pixels: axes, bars, text
    return plots


@pytest.mark.browser
@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="headless Chromium not installed")
def test_the_page_draws_every_plot_in_a_real_browser(tmp_path):
    art = _artifacts(tmp_path / "art")
    tonight = _recs_dir(tmp_path / "tonight", TONIGHT, "list", art)
    write_report(tonight, previous=_recs_dir(tmp_path / "before", BEFORE, "list", art))
    plots = _plots_drawn(tonight / "report.html", tmp_path)
    assert len(plots) == 7
    for plot in plots:
        assert plot["loaded"] and (plot["w"], plot["h"]) == (642, 362)  # 640 x 360 and a 1-pixel border
        assert plot["std"] > 20 and 0.01 < plot["ink"] < 0.6, plot  # drawn: neither blank nor a solid block
    blank = tmp_path / "blank.html"  # the same measure on a blank image of that size finds nothing drawn
    page = (tonight / "report.html").read_text()
    blank.write_text(page[:page.index("<img class='plot'")] + "<img class='plot' width='640' height='360' src='data:"
                     "image/gif;base64,R0lGODlhAQABAIAAAP///wAAACH5BAEAAAAALAAAAAABAAEAAAICRAEAOw=='></body></html>")
    (empty,) = _plots_drawn(blank, tmp_path)
    assert empty["std"] < 1 and empty["ink"] == 0
