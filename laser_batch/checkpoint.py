"""Run directories and checkpoints.

    RUN_DIR/run.json                where the data came from (absolute path and file checksums)
    RUN_DIR/sasrec/config.json      format version, model and training config, best epoch, metrics
    RUN_DIR/sasrec/model.safetensors
    RUN_DIR/sasrec/item_ids.parquet, user_ids.parquet   internal id -> original id
    RUN_DIR/sasrec/metrics.jsonl    one line per epoch

A stage is written into a hidden partial directory and renamed into place when complete, so an
interrupted run never leaves a directory that looks like a finished checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

from laser_batch import __version__
from laser_batch.config import SASRecConfig, from_dict
from laser_batch.contracts import INTERACTIONS_FILE, ITEMS_FILE
from laser_batch.errors import CheckpointError, InputError
from laser_batch.files import atomic_write, sha256_file
from laser_batch.sequences import ITEM_MAP_FILE, USER_MAP_FILE

FORMAT_VERSION = 1
RUN_FILE = "run.json"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
METRICS_FILE = "metrics.jsonl"
SASREC_DIR = "sasrec"
LASER_DIR = "laser"
ITEM_MATRIX_FILE = "item_matrix.safetensors"
CHECKPOINT_FILES = (CONFIG_FILE, WEIGHTS_FILE, ITEM_MAP_FILE, USER_MAP_FILE)


def write_run_info(run_dir: Path, data_dir: Path) -> None:
    """Record which data a run was trained on; later stages and evaluation read it back."""
    data_dir = Path(data_dir).resolve()
    info = {
        "data_dir": str(data_dir),
        "data_sha256": {name: sha256_file(data_dir / name) for name in (INTERACTIONS_FILE, ITEMS_FILE)},
        "created_by": f"laser-batch {__version__}",
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(run_dir / RUN_FILE, lambda tmp: tmp.write_text(json.dumps(info, indent=2) + "\n"))


def read_run_info(run_dir: Path) -> dict:
    path = Path(run_dir) / RUN_FILE
    if not Path(run_dir).is_dir():
        raise CheckpointError(f"{run_dir}: run directory not found")
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; is {run_dir} a run directory written by `laser-batch train`?")
    return json.loads(path.read_text())


class StageWriter:
    """Writes one stage of a run (e.g. RUN_DIR/sasrec) through a partial directory renamed on commit."""

    def __init__(self, run_dir: Path, stage: str, *, overwrite: bool, keep_partial: bool = False) -> None:
        self.final = Path(run_dir) / stage
        if self.final.exists() and not overwrite:
            raise InputError(f"{self.final}: already exists; pass --overwrite to replace it")
        self.partial = Path(run_dir) / f".{stage}.partial"
        if not keep_partial:  # a leftover from an interrupted run, unless we resume from it
            shutil.rmtree(self.partial, ignore_errors=True)
        self.partial.mkdir(parents=True, exist_ok=True)

    def append_metrics(self, record: dict) -> None:
        with open(self.partial / METRICS_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")

    def commit(self) -> Path:
        if self.final.exists():
            shutil.rmtree(self.final)
        os.replace(self.partial, self.final)
        return self.final


def save_sasrec(directory: Path, model, sequences, meta: dict) -> None:
    """Weights + config.json (with format version) + id maps; `meta` holds training facts to keep."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / WEIGHTS_FILE))
    sequences.save_maps(directory)
    config = {
        "format_version": FORMAT_VERSION,
        "kind": "sasrec",
        "num_items": model.num_items,
        "sasrec": vars(model.config).copy(),
        "created_by": f"laser-batch {__version__}",
        **meta,
    }
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")


def read_checkpoint_config(directory: Path, kind: str) -> dict:
    """Check that a checkpoint directory is complete and of our format version; return its config."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: checkpoint not found; train the {kind} stage first")
    missing = [name for name in CHECKPOINT_FILES if not (directory / name).is_file()]
    if missing:
        raise CheckpointError(f"{directory}: incomplete checkpoint, missing {', '.join(missing)}")
    try:
        config = json.loads((directory / CONFIG_FILE).read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{directory / CONFIG_FILE}: not valid JSON ({e})") from e
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{directory / CONFIG_FILE}: checkpoint format version {version!r}, this laser-batch reads "
            f"version {FORMAT_VERSION}; retrain with laser-batch {__version__}"
        )
    if config.get("kind") != kind:
        raise CheckpointError(f"{directory / CONFIG_FILE}: a {config.get('kind')!r} checkpoint, expected {kind!r}")
    return config


def load_sasrec(directory: Path):
    """Load a SASRec checkpoint in eval mode; returns (model, config dict)."""
    from safetensors.torch import load_file

    from laser_batch.sasrec import SASRec

    config = read_checkpoint_config(directory, "sasrec")
    model = SASRec(from_dict(SASRecConfig, config["sasrec"], "sasrec"), config["num_items"])
    model.load_state_dict(load_file(str(Path(directory) / WEIGHTS_FILE)))
    return model.eval(), config


def save_laser(directory: Path, model, item_matrix, sequences, config, meta: dict) -> None:
    """Only the trained weights, the item matrix (row j = item_ids.parquet row j), config.json and id maps."""
    from safetensors.torch import save_file

    save_file(model.trainable_state_dict(), str(directory / WEIGHTS_FILE))
    save_file({"item_matrix": item_matrix.float().contiguous()}, str(directory / ITEM_MATRIX_FILE))
    sequences.save_maps(directory)
    record = {
        "format_version": FORMAT_VERSION,
        "kind": "laser",
        "num_items": sequences.num_items,
        "llm": model.llm.describe(),
        **{section: dataclasses.asdict(getattr(config, section)) for section in ("laser", "mformer", "text")},
        "llm_dtype": config.llm.dtype,
        "created_by": f"laser-batch {__version__}",
        **meta,
    }
    (directory / CONFIG_FILE).write_text(json.dumps(record, indent=2) + "\n")


def load_laser(run_dir: Path, *, llm=None):
    """Rebuild a trained Laser from RUN_DIR/laser (and RUN_DIR/sasrec, and the LLM it names).

    Returns (model in eval mode, item matrix (N, D), config dict). The LLM found must have the
    fingerprint recorded at training time (which covers how many of its layers were kept).
    """
    from safetensors.torch import load_file

    from laser_batch.config import LaserConfig, LLMConfig, MFormerConfig
    from laser_batch.llm import load_llm
    from laser_batch.model import Laser

    directory = Path(run_dir) / LASER_DIR
    config = read_checkpoint_config(directory, "laser")
    if not (directory / ITEM_MATRIX_FILE).is_file():
        raise CheckpointError(f"{directory}: incomplete checkpoint, missing {ITEM_MATRIX_FILE}")
    sasrec, _ = load_sasrec(Path(run_dir) / SASREC_DIR)
    if llm is None:  # the layers it kept (`llm.num_layers`): all of them for an untruncated LLM
        llm = load_llm(LLMConfig(source=config["llm"]["source"], dtype=config["llm_dtype"],
                                 num_layers=config["llm"]["num_layers"]))
    if llm.fingerprint != config["llm"]["fingerprint"]:
        raise CheckpointError(
            f"{directory}: trained with LLM {config['llm']['source']} of fingerprint "
            f"{config['llm']['fingerprint'][:16]}, but the LLM found has {llm.fingerprint[:16]}"
        )
    model = Laser(from_dict(LaserConfig, config["laser"], "laser"), from_dict(MFormerConfig, config["mformer"],
                                                                             "mformer"), llm, sasrec)
    model.load_state_dict(load_file(str(directory / WEIGHTS_FILE)))
    item_matrix = load_file(str(directory / ITEM_MATRIX_FILE))["item_matrix"]
    return model.eval(), item_matrix, config
