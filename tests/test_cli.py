import json
import subprocess
import sys

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from laser_batch import __version__
from laser_batch.cli import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0 and result.output.strip() == f"laser-batch {__version__}"


@pytest.mark.parametrize("args", [["--help"], ["score", "--help"]])
def test_help_does_not_import_torch(args):
    code = ("import sys; from laser_batch.cli import app; "
            f"app({args!r}, standalone_mode=False); assert 'torch' not in sys.modules, 'torch imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "Usage" in done.stdout


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, example_dir, fast_config):
    run = tmp_path_factory.mktemp("run")
    result = invoke("train", "--stage", "sasrec", "--data", example_dir, "--out", run, "--config", fast_config)
    assert result.exit_code == 0, result.output
    return run


def test_train_writes_a_complete_checkpoint(trained_run):
    ckpt = trained_run / "sasrec"
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "config.json", "item_ids.parquet", "metrics.jsonl", "model.safetensors", "user_ids.parquet"]
    config = json.loads((ckpt / "config.json").read_text())
    lines = [json.loads(line) for line in (ckpt / "metrics.jsonl").read_text().splitlines()]
    assert config["format_version"] == 1 and config["kind"] == "sasrec"
    assert [r["epoch"] for r in lines] == list(range(1, config["epochs_run"] + 1))
    best = max(lines, key=lambda r: r["NDCG@10"])
    assert config["best_epoch"] == best["epoch"] and config["valid_metrics"]["NDCG@10"] == best["NDCG@10"]
    assert pl.read_parquet(ckpt / "item_ids.parquet").height == 400
    assert not (trained_run / ".sasrec.partial").exists()


def test_sasrec_clearly_beats_popularity_on_the_example(trained_run, tmp_path):
    results = {}
    for model in ("sasrec", "popularity"):
        out = tmp_path / f"{model}.json"
        result = invoke("evaluate", trained_run, "--model", model, "--k", 10, "--k", 5, "--json", out)
        assert result.exit_code == 0, result.output
        assert "NDCG@10" in result.output
        results[model] = json.loads(out.read_text())
    sasrec, pop = results["sasrec"], results["popularity"]
    assert sasrec["split"] == "test" and sasrec["users"] == 1000 and sasrec["exclude_history"] is True
    assert set(sasrec["metrics"]) == {"HR@5", "NDCG@5", "HR@10", "NDCG@10", "MRR"}
    assert sasrec["metrics"]["HR@10"] > 3 * pop["metrics"]["HR@10"]
    assert sasrec["metrics"]["NDCG@10"] > 3 * pop["metrics"]["NDCG@10"]


def _popularity_metrics(data_dir, exclude_history: bool) -> dict[str, float]:
    """HR@10 and MRR of popularity on the test split, computed here item by item from the interactions."""
    interactions = pl.read_parquet(data_dir / "interactions.parquet").with_row_index("row")
    users = interactions.sort(["user_id", "timestamp", "row"]).group_by("user_id", maintain_order=True).agg("item_id")
    sequences = [seq for seq in users["item_id"].to_list() if len(seq) >= 3]  # users with a test item
    items = sorted({item for seq in sequences for item in seq})
    column = {item: j for j, item in enumerate(items)}
    sequences = [[column[i] for i in seq] for seq in sequences]
    counts = np.zeros(len(items))
    for seq in sequences:
        np.add.at(counts, seq[:-1], 1)  # popularity over what the test split lets us see: every history
    ranks = []
    for seq in sequences:
        scores = counts.copy()
        if exclude_history:
            scores[seq[:-1]] = -np.inf
        ranks.append(int((scores >= scores[seq[-1]]).sum()))  # ties rank the target below
    ranks = np.array(ranks)
    return {"HR@10": float((ranks <= 10).mean()), "MRR": float((1.0 / ranks).mean())}


def test_include_history_changes_the_protocol(trained_run, example_dir, tmp_path):
    results = {}
    for flag, echoed in (([], "history excluded"), (["--include-history"], "history included")):
        out = tmp_path / f"r{len(flag)}.json"
        result = invoke("evaluate", trained_run, "--model", "popularity", *flag, "--json", out)
        assert result.exit_code == 0 and echoed in result.output, result.output
        results[bool(flag)] = json.loads(out.read_text())
    excluded, included = results[False], results[True]
    assert excluded["exclude_history"] is True and included["exclude_history"] is False
    for record, exclude in ((excluded, True), (included, False)):
        expected = _popularity_metrics(example_dir, exclude)
        assert {k: record["metrics"][k] for k in expected} == pytest.approx(expected, abs=1e-12), exclude
    # Example users return to popular items they have seen: such a target (ranked last when the history is
    # excluded) is found only with the history included, which is where popularity gains.
    assert included["metrics"]["MRR"] > excluded["metrics"]["MRR"]


def test_existing_stage_is_refused_without_overwrite(trained_run, example_dir):
    result = invoke("train", "--data", example_dir, "--out", trained_run, "--epochs", 1)
    assert result.exit_code == 2
    assert "already exists; pass --overwrite" in result.output


def test_data_example_and_convert(tmp_path):
    result = invoke("data", "example", "--out", tmp_path / "ex", "--users", 50)
    assert result.exit_code == 0 and "50 users" in result.output
    source = tmp_path / "seq.txt"
    source.write_text("1 10 11 12\n2 11 12 13 14\n")
    result = invoke("data", "convert", "--format", "s3rec", source, "--out", tmp_path / "conv")
    assert result.exit_code == 0, result.output
    assert "2 users, 5 items, 7 interactions" in result.output
