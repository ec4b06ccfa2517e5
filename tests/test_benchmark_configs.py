"""Every benchmark config loads, and each still gives the settings its results were measured with."""

import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest

from laser_batch.config import load_config

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
CONFIGS = sorted((BENCHMARKS / "configs").glob("*.toml"))


def _s3rec_overrides() -> dict:
    """The per-dataset changes benchmarks/sasrec_s3rec.py applies on top of its config."""
    spec = importlib.util.spec_from_file_location("sasrec_s3rec", BENCHMARKS / "sasrec_s3rec.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.OVERRIDES


def _measured_with(config: Path) -> list[tuple[Path, dict]]:
    """(results file or a results row's recorded config, the overrides the benchmark added) for each result
    measured with `config`."""
    results = BENCHMARKS / "results"
    if config.stem == "sasrec_s3rec":  # one results file per dataset
        overrides = _s3rec_overrides()
        return [(p, overrides.get(json.loads(p.read_text())["dataset"], {}))
                for p in sorted(results.glob("sasrec_*.json"))]
    rows = _rows_measured_with(config)
    if rows:
        return rows
    path = results / f"{config.stem}.json"
    if not path.exists() or any("config_file" in row for row in json.loads(path.read_text()).get("models", {}).values()
                                if isinstance(row, dict)):
        return []  # a multi-model file's top-level config is its baselines', not this config's
    # the LLM's location is the machine's, not the config's: laser_ml100k.py passes it in
    return [(path, {"llm": {"source": json.loads(path.read_text())["config"]["llm"]["source"]}})]


def _rows_measured_with(config: Path) -> list[tuple[Path, dict]]:
    """(the row's recorded config, its LLM source) for each row of a multi-model results file
    ({"models": {NAME: {"config_file", "config", ...}}}) measured with `config`."""
    found = []
    for path in sorted((BENCHMARKS / "results").glob("laser_*.json")):
        for row in json.loads(path.read_text()).get("models", {}).values():
            if isinstance(row, dict) and Path(row.get("config_file", "")).name == config.name:
                found.append((row["config"], {"llm": {"source": row["config"]["llm"]["source"]}}))
    return found


def test_there_are_configs():
    assert len(CONFIGS) >= 2 and any(c.stem == "laser_ml100k" for c in CONFIGS)


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_config_loads_and_gives_the_settings_of_its_results(config):
    load_config(config)  # raises ConfigError on unknown keys, bad values, a broken `extends`
    measured = _measured_with(config)
    assert measured, f"{config.name} has no results in benchmarks/results: configs without results go"
    for results, overrides in measured:
        recorded = results if isinstance(results, dict) else json.loads(results.read_text())["config"]
        now = dataclasses.asdict(load_config(config, **overrides))
        # every setting the results recorded (options added since then are not in them)
        changed = {f"{section}.{key}": (value, now[section].get(key, "(gone)"))
                   for section, values in recorded.items() for key, value in values.items()
                   if now[section].get(key, "(gone)") != value}
        assert not changed, f"{config.name} no longer gives the settings of {results.name}: {changed}"
