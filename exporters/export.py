"""`laser-batch export`: a trained run -> ONNX graphs (through Optimum), item matrix, tokenizer and manifest.

Every part is exported with `optimum.exporters.onnx.export` and our `OnnxConfig`s (exporters/parts.py),
checked with Optimum's `validate_model_outputs`, then validated by us against torch at two batch/sequence
shapes other than the trace's, and end to end (user embeddings through the ONNX graphs vs the torch model,
and their top-10 lists) on held-out users. A failed check is an error. Everything is written into a
temporary directory next to ARTIFACTS and renamed into place only when it all passed.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import onnx
import polars as pl
import torch
from onnxruntime.transformers.float16 import convert_float_to_float16

from laser_batch.artifacts import ITEM_ID_VECTORS, ITEM_IDS, ITEM_MATRIX, ITEMS_TEXT, TOKENIZER, TRAIN_COUNTS
from laser_batch.checkpoint import LASER_DIR, SASREC_DIR, load_laser, load_sasrec, read_run_info
from laser_batch.config import TextConfig
from laser_batch.contracts import load_data_dir
from laser_batch.encode import encode_users, laser_inputs
from laser_batch.errors import ArtifactError, CheckpointError, InputError
from laser_batch.exporters.gate import GATE_USERS, Pairs, gate_pairs
from laser_batch.exporters.manifest import new_manifest, write_manifest
from laser_batch.exporters.parts import (
    MFormerOnnxConfig,
    MFormerPart,
    PartConfig,
    SASRecOnnxConfig,
    SASRecPart,
    UserEncoderOnnxConfig,
    UserEncoderPart,
    export_part,
)
from laser_batch.exporters.quantize import CALIBRATION_USERS, add_variants, parse_schemes
from laser_batch.exporters.validate import FP16_MIN_COSINE, HeldOut, end_to_end, sample
from laser_batch.files import replace_directory
from laser_batch.sequences import Sequences, build_sequences, evenly_spread, pad_left

logger = logging.getLogger(__name__)


def export_run(
    run_dir: Path,
    out: Path,
    *,
    model: str | None = None,
    dtype: str = "fp32",
    overwrite: bool = False,
    validate_users: int = 256,
    quantize: list[str] | None = None,
    threads: int = 0,
    gate_users: int = GATE_USERS,
    llm=None,
) -> dict:
    """Export RUN_DIR's Laser (or SASRec) stage to ARTIFACTS `out`; returns the manifest written.

    Args:
        run_dir: a run directory written by `laser-batch train`.
        out: the artefact directory to create.
        model: "laser" or "sasrec"; by default Laser when the run has that stage, else SASRec.
        dtype: "fp32", or "fp16": graphs (inputs and outputs stay float32) and item matrix in float16, for GPUs;
            validated after the fp32 graphs passed, against a looser tolerance (FP16_MIN_COSINE).
        overwrite: replace an existing `out`.
        validate_users: held-out (test-split) users for the end-to-end check.
        quantize: quantised user-encoder variants to add (exporters/quantize.py; "int8" = every scheme), each
            measured against fp32 on the held-out users.
        threads: ONNX Runtime threads for the checks and timings (0: its default).
        gate_users: users whose validation and test pairs the quality gate of the quantised variants judges
            (exporters/gate.py); 0: every user.
        llm: an already loaded LLM (tests); by default the one the run names (its fingerprint is checked).

    Raises:
        CheckpointError: a missing or incomplete run, or an LLM whose fingerprint differs from training's.
        InputError: `out` exists and `overwrite` is off.
        ArtifactError: a graph fails validation.
    """
    run_dir, out = Path(run_dir), Path(out)
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir}: run directory not found")
    if model is None:
        model = "laser" if (run_dir / LASER_DIR).is_dir() else "sasrec"
    if model not in ("laser", "sasrec"):
        raise InputError(f"--model {model!r}: choose laser or sasrec")
    schemes, every_scheme = parse_schemes(quantize)
    if schemes and model != "laser":
        raise InputError("--quantize applies to Laser's user encoder; a SASRec export has nothing to quantise")
    if dtype not in ("fp32", "fp16"):
        raise InputError(f"--dtype {dtype!r}: choose fp32 or fp16")
    if dtype == "fp16" and schemes:
        raise InputError("--quantize makes CPU variants of the fp32 graph; export them with --dtype fp32")
    if out.exists() and not overwrite:
        raise InputError(f"{out}: already exists; pass --overwrite to replace it")
    started = time.perf_counter()
    partial = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        if model == "laser":
            manifest, held_out = _export_laser(run_dir, partial, validate_users, llm, schemes, threads,
                                               every_scheme=every_scheme, gate_users=gate_users)
        else:
            manifest, held_out = _export_sasrec(run_dir, partial, validate_users)
        if dtype == "fp16":
            _to_fp16(partial, manifest, held_out)
        manifest["export_seconds"] = round(time.perf_counter() - started, 2)
        write_manifest(partial, manifest)
        replace_directory(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    logger.info("exported %s to %s in %.1f s", model, out, manifest["export_seconds"])
    return manifest


def _export_sasrec(run_dir: Path, directory: Path, validate_users: int) -> tuple[dict, HeldOut | None]:
    sasrec, ckpt = load_sasrec(run_dir / SASREC_DIR)
    part = SASRecPart(sasrec, PartConfig(part="sasrec", num_items=sasrec.num_items, id_size=sasrec.config.hidden_size))
    graphs = {"sasrec": export_part("sasrec", part, SASRecOnnxConfig, directory)}
    np.save(directory / ITEM_MATRIX, sasrec.item_vectors().detach().float().numpy())
    _, sequences = _run_data(run_dir, required=False)
    _write_item_ids(run_dir / SASREC_DIR / ITEM_IDS, directory / ITEM_IDS, sequences)
    manifest = new_manifest("sasrec", graphs, {"sasrec_max_len": sasrec.config.max_len, "score": "dot",
                                               "num_items": sasrec.num_items, "checkpoint": ckpt.get("best_epoch"),
                                               "loss": sasrec.config.loss})
    write_manifest(directory, manifest)
    if sequences is None:
        logger.warning("%s: the run's data directory is gone; no end-to-end check on held-out users", run_dir)
        return manifest, None
    histories, targets = sample(*sequences.split("test"), validate_users)
    with torch.no_grad():
        width = min(sasrec.config.max_len, max(len(h) for h in histories))
        reference = sasrec(torch.from_numpy(pad_left(histories, width)))[:, -1].numpy()
    held_out = HeldOut(histories, targets, reference)
    manifest["end_to_end"] = end_to_end(directory, held_out, np.load(directory / ITEM_MATRIX))
    return manifest, held_out


def _export_laser(
    run_dir: Path, directory: Path, validate_users: int, llm, schemes: list[str], threads: int, *,
    every_scheme: bool = False, gate_users: int = GATE_USERS,
) -> tuple[dict, HeldOut]:
    laser, item_matrix, ckpt = load_laser(run_dir, llm=llm)  # refuses an LLM with another fingerprint
    trained_dtype = str(laser.llm.model.dtype).removeprefix("torch.")
    laser.llm.model.float()  # fp32 graphs: bf16-trained weights are exact in fp32
    sasrec, tokenizer = laser.sasrec, laser.llm.tokenizer
    width, queries = laser.llm.hidden_size, laser.mformer_config.num_queries
    graphs = {"sasrec": export_part("sasrec", SASRecPart(sasrec, PartConfig(
        part="sasrec", num_items=sasrec.num_items, id_size=sasrec.config.hidden_size)), SASRecOnnxConfig, directory)}
    if laser.config.prefix == "mformer":
        graphs["mformer"] = export_part("mformer", MFormerPart(laser.mformer, PartConfig(
            part="mformer", id_size=sasrec.config.hidden_size, llm_size=width, num_queries=queries)),
            MFormerOnnxConfig, directory)
    vocab = laser.llm.model.get_input_embeddings().num_embeddings
    encoder = UserEncoderPart(laser, PartConfig(part="user_encoder", llm_size=width, num_queries=queries,
                                                vocab_size=vocab, pad_id=tokenizer.pad_token_id))
    inputs = None if encoder.takes_prefix else ["input_ids", "attention_mask"]
    graphs["user_encoder"] = export_part("user_encoder", encoder, UserEncoderOnnxConfig, directory, inputs=inputs)

    if laser.fused:  # one product with the Embedder's [SASRec state ; g / tau * embedding] gives the fused score
        item_matrix = laser.fused_items(item_matrix)
    np.save(directory / ITEM_MATRIX, item_matrix.float().numpy())
    if laser.config.prefix == "mformer":  # what `laser-batch items add` needs for a new item's fallback ID vector
        np.save(directory / ITEM_ID_VECTORS, _item_id_vectors(laser))
    tokenizer.backend_tokenizer.save(str(directory / TOKENIZER))
    items, sequences = _run_data(run_dir, required=True)
    _write_item_ids(run_dir / LASER_DIR / ITEM_IDS, directory / ITEM_IDS, sequences)
    text = dict(ckpt["text"])
    columns = text["text_columns"]
    if columns is None:
        columns = [c for c in items.columns if c not in ("item_id", "title")]
    ordered = pl.DataFrame({"item_id": sequences.item_ids}).join(items, on="item_id", how="left",
                                                                  maintain_order="left")
    ordered.select("item_id", "title", *columns).write_parquet(directory / ITEMS_TEXT)
    text["text_columns"] = list(columns)
    settings = {
        "sasrec_max_len": sasrec.config.max_len, "id_window": laser.id_window,
        "score": "dot" if laser.fused else "cosine", **_fusion_settings(laser),
        "temperature": laser.config.temperature, "item_id_vector": laser.config.item_id_vector,
        "num_items": sasrec.num_items, "text": text, "pad_id": tokenizer.pad_token_id,
        "prefix": laser.config.prefix, "pooling": laser.config.pooling, "center": laser.config.center,
        "center_users": laser.config.center_users,
        "llm": ckpt["llm"], "trained_llm_dtype": trained_dtype, "graph_dtype": "float32",
        "best": [ckpt.get("best_stage"), ckpt.get("best_epoch")],
    }
    manifest = new_manifest("laser", graphs, settings)
    write_manifest(directory, manifest)

    histories, targets = sample(*sequences.split("test"), validate_users)
    torch_inputs = laser_inputs(laser.llm, items, sequences, TextConfig(**text), sasrec.config.max_len)
    reference = encode_users(laser, torch_inputs, histories, batch_size=16)
    if laser.fused:  # the user vectors the fused item matrix scores
        reference = laser.fused_users(reference, torch_inputs.id_history(histories))
    held_out = HeldOut(histories, targets, reference.numpy())
    manifest["end_to_end"] = end_to_end(directory, held_out, np.load(directory / ITEM_MATRIX))
    if schemes:
        # Calibration: validation histories of users other than the gate's (whose validation pairs it judges).
        pairs = gate_pairs(sequences, gate_users)
        judged = set(evenly_spread(sequences.num_users, gate_users or sequences.num_users).tolist())
        others = [r for r in evenly_spread(sequences.num_users, sequences.num_users) if r not in judged]
        valid_histories = sequences.split("valid")[0]
        calibration = [valid_histories[others[i]] for i in evenly_spread(len(others), CALIBRATION_USERS)] \
            if others else sample(*sequences.split("valid"), CALIBRATION_USERS)[0]
        graphs["user_encoder"].update(add_variants(
            directory, laser, schemes, every_scheme=every_scheme, torch_inputs=torch_inputs, calibration=calibration,
            pairs=pairs, torch_bf16=_torch_bf16(laser, torch_inputs, pairs), threads=threads,
            export_encoder=lambda model, where: export_part("user_encoder", UserEncoderPart(model, encoder.config),
                                                            UserEncoderOnnxConfig, where, inputs=inputs)))
    return manifest, held_out


def _torch_bf16(laser, torch_inputs, pairs: Pairs) -> np.ndarray:
    """The torch model's user vectors for the gate's pairs with the LLM's weights in bf16 (a copy; `laser` stays
    fp32): the gate judges it as the reference for ordinary numeric noise."""
    model = copy.deepcopy(laser)
    model.llm.model.to(torch.bfloat16)
    users = encode_users(model, torch_inputs, pairs.histories, batch_size=16)
    if model.fused:
        users = model.fused_users(users, torch_inputs.id_history(pairs.histories))
    return users.float().numpy()


def _write_item_ids(source: Path, target: Path, sequences: Sequences | None) -> None:
    """The run's item map (index, item_id) plus each item's interaction count in the training split (everything
    before each user's validation target): `score --backfill popular` ranks by it. Without the data (a SASRec run
    whose data directory is gone) or when the data's items are no longer the run's, the map is copied as it is."""
    ids = pl.read_parquet(source).sort("index")
    if sequences is None or not ids["item_id"].equals(sequences.item_ids):
        logger.warning("%s: no training interaction counts (the run's data is gone or changed); score --backfill "
                       "popular will refuse these artefacts", target.parent)
        shutil.copyfile(source, target)
        return
    train = [s for s in sequences.train_sequences() if len(s)]
    counts = np.bincount(np.concatenate(train), minlength=sequences.num_items + 1)[1:] if train else \
        np.zeros(sequences.num_items, dtype=np.int64)
    ids.with_columns(pl.Series(TRAIN_COUNTS, counts[ids["index"].to_numpy() - 1], dtype=pl.Int64)).write_parquet(target)


@torch.no_grad()
def _item_id_vectors(laser) -> np.ndarray:
    """(N, d_id) each item's M-Former input as an item (`laser.item_id_vector`): its SASRec embedding row, or SASRec's
    output for the one-item history. Row j = internal item j + 1."""
    sasrec = laser.sasrec
    ids = torch.arange(1, sasrec.num_items + 1)
    if laser.config.item_id_vector == "embedding":
        return sasrec.item_embedding(ids).float().numpy()
    return torch.cat([sasrec(chunk[:, None])[:, -1] for chunk in ids.split(4096)]).float().numpy()


def _fusion_settings(laser) -> dict:
    """The manifest's record of the fusion: "fusion", and with the gated one its gate g and temperature tau."""
    if not laser.fused:
        return {"fusion": laser.config.fusion}
    return {"fusion": laser.config.fusion, "gate": laser.gate_value, "temperature": laser.config.temperature}


def _to_fp16(directory: Path, manifest: dict, held_out: HeldOut | None) -> None:
    """Convert the validated fp32 graphs and the item matrix to float16, then check them end to end."""
    for graph in manifest["graphs"].values():
        path = directory / graph["file"]
        converted = convert_float_to_float16(onnx.load(str(path)), keep_io_types=True)
        external = Path(f"{path}_data")
        if external.exists():  # an LLM over 2 GB: keep its weights in the external data file
            external.unlink()
            onnx.save(converted, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                      location=external.name)
        else:
            onnx.save(converted, str(path))
        graph["dtype"] = "float16"
    np.save(directory / ITEM_MATRIX, np.load(directory / ITEM_MATRIX).astype(np.float16))
    manifest["settings"]["graph_dtype"] = "float16"
    write_manifest(directory, manifest)
    if held_out is None:
        return
    record = end_to_end(directory, held_out, np.load(directory / ITEM_MATRIX).astype(np.float32),
                        required_agreement=None)
    manifest["end_to_end_fp16"] = record
    if record["min_cosine"] < FP16_MIN_COSINE:
        raise ArtifactError(f"fp16 graphs: user embeddings differ from torch (worst cosine {record['min_cosine']:.4f},"
                            f" allowed >= {FP16_MIN_COSINE})")


def _run_data(run_dir: Path, *, required: bool) -> tuple[pl.DataFrame | None, Sequences | None]:
    """(items, sequences) of the data the run was trained on, or (None, None) when it is gone and not required."""
    data_dir = Path(read_run_info(run_dir)["data_dir"])
    if not data_dir.is_dir():
        if required:
            raise CheckpointError(f"{run_dir}: its data directory {data_dir} is needed (item texts) but not found")
        return None, None
    dataset = load_data_dir(data_dir)
    return dataset.items, build_sequences(dataset.interactions)
