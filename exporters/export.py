"""`laser-batch export`: a trained run -> ONNX graphs (through Optimum), item matrix, tokenizer and manifest.

Every part is exported with `optimum.exporters.onnx.export` and our `OnnxConfig`s (exporters/parts.py),
checked with Optimum's `validate_model_outputs`, then validated by us against torch at two batch/sequence
shapes other than the trace's, and end to end (user embeddings through the ONNX graphs vs the torch model,
and their top-10 lists) on held-out users. A failed check is an error. Everything is written into a
temporary directory next to ARTIFACTS and renamed into place only when it all passed.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import onnx
import torch

from laser_batch import __version__
from laser_batch.artifacts import (
    ITEM_IDS,
    ITEM_MATRIX,
    ITEMS_TEXT,
    MANIFEST,
    MANIFEST_VERSION,
    TOKENIZER,
    Embedder,
    file_record,
    session,
)
from laser_batch.checkpoint import LASER_DIR, SASREC_DIR, load_laser, load_sasrec, read_run_info
from laser_batch.errors import ArtifactError, CheckpointError, InputError

logger = logging.getLogger(__name__)

VALIDATION_SHAPES = ({"batch_size": 3, "sequence_length": 5}, {"batch_size": 5, "sequence_length": 11})
# fp32 parity demanded of every graph (output vs torch): max |diff| and the worst row cosine.
TOLERANCE = {"max_abs_diff": 1e-3, "min_cosine": 0.9999}
TOP_K = 10
TOP_K_AGREEMENT = 0.99  # share of held-out users whose top-10 set must be the same as torch's at fp32
CALIBRATION_USERS = 64  # validation histories whose activation ranges calibrate SmoothQuant (int8-smooth)
FP16_MIN_COSINE = 0.999  # fp16 graphs: worst user-embedding cosine to torch fp32 (their top-10 is recorded)


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
    from laser_batch.exporters.quantize import SCHEMES

    schemes = list(SCHEMES) if quantize and "int8" in quantize else list(dict.fromkeys(quantize or []))
    unknown = [s for s in schemes if s not in SCHEMES]
    if unknown:
        raise InputError(f"--quantize {unknown[0]!r}: choose int8 (every scheme) or one of {', '.join(SCHEMES)}")
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
            manifest = _export_laser(run_dir, partial, validate_users, llm, schemes, threads,
                                     every_scheme=bool(quantize and "int8" in quantize))
        else:
            manifest = _export_sasrec(run_dir, partial, validate_users)
        manifest, held_out = manifest
        if dtype == "fp16":
            _to_fp16(partial, manifest, held_out)
        manifest["export_seconds"] = round(time.perf_counter() - started, 2)
        _write_manifest(partial, manifest)
        _replace(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    logger.info("exported %s to %s in %.1f s", model, out, manifest["export_seconds"])
    return manifest


def _replace(partial: Path, out: Path) -> None:
    """Move the finished export into place; an old `out` is removed only after the new one is complete."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
    partial.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _export_sasrec(run_dir: Path, directory: Path, validate_users: int) -> tuple[dict, tuple | None]:
    from laser_batch.exporters.parts import PartConfig, SASRecOnnxConfig, SASRecPart

    sasrec, ckpt = load_sasrec(run_dir / SASREC_DIR)
    part = SASRecPart(sasrec, PartConfig(part="sasrec", num_items=sasrec.num_items, id_size=sasrec.config.hidden_size))
    graphs = {"sasrec": _export_part("sasrec", part, SASRecOnnxConfig, directory)}
    np.save(directory / ITEM_MATRIX, sasrec.item_vectors().detach().float().numpy())
    shutil.copyfile(run_dir / SASREC_DIR / ITEM_IDS, directory / ITEM_IDS)
    manifest = _manifest("sasrec", graphs, {"sasrec_max_len": sasrec.config.max_len, "score": "dot",
                                            "num_items": sasrec.num_items, "checkpoint": ckpt.get("best_epoch")})
    _write_manifest(directory, manifest)
    histories = _held_out_histories(run_dir, validate_users)
    if histories is None:
        return manifest, None
    from laser_batch.sequences import pad_left

    with torch.no_grad():
        width = min(sasrec.config.max_len, max(len(h) for h in histories))
        reference = sasrec(torch.from_numpy(pad_left(histories, width)))[:, -1].numpy()
    manifest["end_to_end"] = _end_to_end(directory, histories, reference, np.load(directory / ITEM_MATRIX))
    return manifest, (histories, reference)


def _export_laser(
    run_dir: Path, directory: Path, validate_users: int, llm, schemes: list[str], threads: int, *,
    every_scheme: bool = False,
) -> tuple[dict, tuple]:
    from laser_batch.exporters.parts import (
        MFormerOnnxConfig,
        MFormerPart,
        PartConfig,
        SASRecOnnxConfig,
        SASRecPart,
        UserEncoderOnnxConfig,
        UserEncoderPart,
    )

    laser, item_matrix, ckpt = load_laser(run_dir, llm=llm)  # refuses an LLM with another fingerprint
    trained_dtype = str(laser.llm.model.dtype).removeprefix("torch.")
    laser.llm.model.float()  # fp32 graphs: bf16-trained weights are exact in fp32
    sasrec, tokenizer = laser.sasrec, laser.llm.tokenizer
    width, queries = laser.llm.hidden_size, laser.mformer_config.num_queries
    graphs = {"sasrec": _export_part("sasrec", SASRecPart(sasrec, PartConfig(
        part="sasrec", num_items=sasrec.num_items, id_size=sasrec.config.hidden_size)), SASRecOnnxConfig, directory)}
    if laser.config.prefix == "mformer":
        graphs["mformer"] = _export_part("mformer", MFormerPart(laser.mformer, PartConfig(
            part="mformer", id_size=sasrec.config.hidden_size, llm_size=width, num_queries=queries)),
            MFormerOnnxConfig, directory)
    vocab = laser.llm.model.get_input_embeddings().num_embeddings
    encoder = UserEncoderPart(laser, PartConfig(part="user_encoder", llm_size=width, num_queries=queries,
                                                vocab_size=vocab, pad_id=tokenizer.pad_token_id))
    inputs = None if encoder.takes_prefix else ["input_ids", "attention_mask"]
    graphs["user_encoder"] = _export_part("user_encoder", encoder, UserEncoderOnnxConfig, directory, inputs=inputs)

    np.save(directory / ITEM_MATRIX, item_matrix.float().numpy())
    shutil.copyfile(run_dir / LASER_DIR / ITEM_IDS, directory / ITEM_IDS)
    tokenizer.backend_tokenizer.save(str(directory / TOKENIZER))
    items, sequences = _run_data(run_dir, required=True)
    text = dict(ckpt["text"])
    columns = text["text_columns"]
    if columns is None:
        columns = [c for c in items.columns if c not in ("item_id", "title")]
    import polars as pl

    ordered = pl.DataFrame({"item_id": sequences.item_ids}).join(items, on="item_id", how="left",
                                                                  maintain_order="left")
    ordered.select("item_id", "title", *columns).write_parquet(directory / ITEMS_TEXT)
    text["text_columns"] = list(columns)
    settings = {
        "sasrec_max_len": sasrec.config.max_len, "id_window": laser.id_window, "score": "cosine",
        "num_items": sasrec.num_items, "text": text, "pad_id": tokenizer.pad_token_id,
        "prefix": laser.config.prefix, "pooling": laser.config.pooling, "center": laser.config.center,
        "center_users": laser.config.center_users,
        "llm": ckpt["llm"], "trained_llm_dtype": trained_dtype, "graph_dtype": "float32",
        "best": [ckpt.get("best_stage"), ckpt.get("best_epoch")],
    }
    manifest = _manifest("laser", graphs, settings)
    _write_manifest(directory, manifest)

    histories, targets = _sample(*sequences.split("test"), validate_users)
    from laser_batch.encode import encode_users, laser_inputs

    torch_inputs = laser_inputs(laser.llm, items, sequences, _text_config(text), sasrec.config.max_len)
    reference = encode_users(laser, torch_inputs, histories, batch_size=16).numpy()
    item_matrix = np.load(directory / ITEM_MATRIX)
    manifest["end_to_end"] = _end_to_end(directory, histories, reference, item_matrix)
    if schemes:
        from laser_batch.exporters.quantize import (
            QUALITY_BAR,
            TORCH_SCHEMES,
            correct_centre,
            measure,
            quantize,
            smooth_encoder,
        )
        from laser_batch.exporters.smooth import supports_smoothing

        embedder = Embedder(directory, device="cpu", threads=threads, verify=False)  # hashed just now
        variants = graphs["user_encoder"]["variants"] = {}
        calibration = _sample(*sequences.split("valid"), CALIBRATION_USERS)[0]  # not the measured test histories
        with tempfile.TemporaryDirectory(dir=directory) as scratch:  # gone before the manifest lists the files
            smoothed = None  # the SmoothQuant fp32 graph, made once for every TORCH_SCHEMES variant
            for scheme in schemes:
                started = time.perf_counter()
                if scheme in TORCH_SCHEMES and not supports_smoothing(laser.llm.model):
                    if not every_scheme:
                        raise InputError(f"--quantize {scheme}: needs a Llama-family LLM (q/k/v/o, gate/up/down "
                                         f"projections, RMSNorm); {laser.llm.model.config.model_type} is not")
                    variants[scheme] = {"skipped": f"not a Llama-family LLM ({laser.llm.model.config.model_type})"}
                    continue
                if scheme in TORCH_SCHEMES and smoothed is None:
                    smoothed = smooth_encoder(
                        Path(scratch), laser,
                        lambda model, where: _export_part("user_encoder", UserEncoderPart(model, encoder.config),
                                                          UserEncoderOnnxConfig, where, inputs=inputs),
                        lambda model: encode_users(model, torch_inputs, calibration, batch_size=16))
                file = quantize(directory, scheme, smoothed=smoothed)
                correction = correct_centre(embedder, file, calibration)
                variants[scheme] = {"file": file, "quantize_seconds": round(time.perf_counter() - started, 2),
                                    **({"centre_correction": correction} if correction else {}),
                                    **measure(embedder, file, histories, targets, item_matrix)}
                logger.info("%s: %s", scheme, variants[scheme])
        passing = [s for s, v in variants.items() if v.get("top10_vs_fp32", {}).get("same_set", 0) >= QUALITY_BAR]
        graphs["user_encoder"]["recommended_cpu_variant"] = max(
            passing, key=lambda s: variants[s]["speedup_vs_fp32"], default=None)
    return manifest, (histories, reference)


def _to_fp16(directory: Path, manifest: dict, held_out: tuple | None) -> None:
    """Convert the validated fp32 graphs and the item matrix to float16, then check them end to end."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

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
    _write_manifest(directory, manifest)
    if held_out is None:
        return
    histories, reference = held_out
    record = _end_to_end(directory, histories, reference, np.load(directory / ITEM_MATRIX).astype(np.float32),
                         required_agreement=None)
    manifest["end_to_end_fp16"] = record
    if record["min_cosine"] < FP16_MIN_COSINE:
        raise ArtifactError(f"fp16 graphs: user embeddings differ from torch (worst cosine {record['min_cosine']:.4f},"
                            f" allowed >= {FP16_MIN_COSINE})")


def _text_config(text: dict):
    from laser_batch.config import TextConfig

    return TextConfig(**text)


def _export_part(name: str, part: torch.nn.Module, config_class, directory: Path, *, inputs=None) -> dict:
    """Export one part with Optimum, check it with Optimum's validator, then at our two shapes."""
    from optimum.exporters.onnx import export, validate_model_outputs

    from laser_batch.exporters.parts import OPSET, TRACE_SHAPES

    onnx_config = config_class(part.config, inputs=inputs)
    path = directory / f"{name}.onnx"
    started = time.perf_counter()
    export(part, onnx_config, path, opset=OPSET, input_shapes=dict(TRACE_SHAPES))
    seconds = time.perf_counter() - started
    try:
        validate_model_outputs(onnx_config, part, path, list(onnx_config.outputs), atol=TOLERANCE["max_abs_diff"],
                               input_shapes=dict(VALIDATION_SHAPES[0]), use_subprocess=False)
    except ValueError as e:
        raise ArtifactError(f"{name}.onnx: does not match torch ({str(e).splitlines()[0]})") from e
    parity = [_parity(name, part, onnx_config, path, shape) for shape in VALIDATION_SHAPES]
    logger.info("%s.onnx: exported in %.1f s; %s", name, seconds, parity)
    return {"file": path.name, "inputs": onnx_config.inputs, "outputs": onnx_config.outputs,
            "trace_shapes": dict(TRACE_SHAPES), "export_seconds": round(seconds, 2), "parity": parity}


def _parity(name: str, part: torch.nn.Module, onnx_config, path: Path, shape: dict) -> dict:
    """Max |diff| and worst row cosine of every float output, exact match share of integer outputs."""
    feeds = onnx_config.generate_dummy_inputs(framework="pt", **shape)
    with torch.no_grad():
        reference = part(**feeds)
    got = session(path, ["CPUExecutionProvider"]).run(list(reference), {k: v.numpy() for k, v in feeds.items()})
    record: dict = {"shape": dict(shape)}
    for (output, expected), actual in zip(reference.items(), got, strict=True):
        expected = expected.numpy()
        if expected.shape != actual.shape:
            raise ArtifactError(f"{name}.onnx: output {output} has shape {actual.shape} at {shape}, "
                                f"torch gives {expected.shape} (a shape baked in at export)")
        if np.issubdtype(expected.dtype, np.integer):
            record[output] = {"equal": float((expected == actual).mean())}
            ok = record[output]["equal"] == 1.0
        else:
            stats = _compare(expected.reshape(len(expected), -1), actual.reshape(len(actual), -1))
            record[output] = stats
            ok = stats["max_abs_diff"] <= TOLERANCE["max_abs_diff"] and stats["min_cosine"] >= TOLERANCE["min_cosine"]
        if not ok:
            raise ArtifactError(f"{name}.onnx: output {output} differs from torch at batch {shape['batch_size']}, "
                                f"length {shape['sequence_length']}: {record[output]} (allowed: {TOLERANCE})")
    return record


def _compare(expected: np.ndarray, actual: np.ndarray) -> dict:
    cosine = (expected * actual).sum(1) / np.maximum(
        np.linalg.norm(expected, axis=1) * np.linalg.norm(actual, axis=1), 1e-12)
    return {"max_abs_diff": float(np.abs(expected - actual).max()), "mean_cosine": float(cosine.mean()),
            "min_cosine": float(cosine.min())}


def top_k(users: np.ndarray, item_matrix: np.ndarray, k: int = TOP_K) -> np.ndarray:
    """(B, k) row indices of the k best items by score, best first."""
    scores = users @ item_matrix.T
    best = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, best, axis=1), axis=1, kind="stable")
    return np.take_along_axis(best, order, axis=1)


def agreement(a: np.ndarray, b: np.ndarray) -> dict:
    """How alike two (B, k) top-k lists are: same set, same order, mean overlap."""
    same_set = np.array([set(x) == set(y) for x, y in zip(a.tolist(), b.tolist(), strict=True)])
    overlap = np.array([len(set(x) & set(y)) / len(x) for x, y in zip(a.tolist(), b.tolist(), strict=True)])
    return {"same_set": float(same_set.mean()), "same_order": float((a == b).all(1).mean()),
            "mean_overlap": float(overlap.mean())}


def _end_to_end(directory: Path, histories: list[np.ndarray], reference: np.ndarray, item_matrix: np.ndarray,
                *, required_agreement: float | None = TOP_K_AGREEMENT) -> dict:
    """User embeddings through the exported graphs vs torch, and their top-10 lists; fails below 99%."""
    embedder = Embedder(directory, device="cpu", verify=False)  # its files were hashed just now
    got = np.concatenate([embedder.embed(histories[i:i + 16]) for i in range(0, len(histories), 16)])
    record = {"users": len(histories), **_compare(reference, got),
              f"top{TOP_K}": agreement(top_k(reference, item_matrix), top_k(got, item_matrix))}
    if required_agreement is not None and record[f"top{TOP_K}"]["same_set"] < required_agreement:
        raise ArtifactError(f"{directory.name}: the exported graphs give another top-{TOP_K} than torch for "
                            f"{1 - record[f'top{TOP_K}']['same_set']:.1%} of {len(histories)} held-out users "
                            f"(allowed: {1 - TOP_K_AGREEMENT:.0%})")
    return record


def _run_data(run_dir: Path, *, required: bool):
    """(items, sequences) of the data the run was trained on, or (None, None) when it is gone and not required."""
    from laser_batch.contracts import load_data_dir
    from laser_batch.sequences import build_sequences

    data_dir = Path(read_run_info(run_dir)["data_dir"])
    if not data_dir.is_dir():
        if required:
            raise CheckpointError(f"{run_dir}: its data directory {data_dir} is needed (item texts) but not found")
        return None, None
    dataset = load_data_dir(data_dir)
    return dataset.items, build_sequences(dataset.interactions)


def _held_out_histories(run_dir: Path, count: int) -> list[np.ndarray] | None:
    _, sequences = _run_data(run_dir, required=False)
    if sequences is None:
        logger.warning("%s: the run's data directory is gone; no end-to-end check on held-out users", run_dir)
        return None
    return _sample(*sequences.split("test"), count)[0]


def _sample(histories: list[np.ndarray], targets: np.ndarray, count: int) -> tuple[list[np.ndarray], np.ndarray]:
    """`count` (history, target) pairs spread evenly over the users (deterministic)."""
    from laser_batch.sequences import evenly_spread

    rows = evenly_spread(len(histories), count)
    return [histories[r] for r in rows], np.asarray(targets)[rows]


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"laser-batch": __version__, "python": platform.python_version()}
    for package in ("torch", "transformers", "optimum", "optimum-onnx", "onnx", "onnxruntime-gpu", "onnxruntime",
                    "tokenizers", "polars", "numpy"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            continue
    return out


def _manifest(kind: str, graphs: dict, settings: dict) -> dict:
    from laser_batch.exporters.parts import OPSET

    return {"manifest_version": MANIFEST_VERSION, "kind": kind, "created_by": f"laser-batch {__version__}",
            "versions": _versions(), "opset": OPSET, "exporter": "optimum.exporters.onnx.export (TorchScript)",
            "tolerance": {**TOLERANCE, f"top{TOP_K}_same_set": TOP_K_AGREEMENT}, "graphs": graphs,
            "settings": settings}


def _write_manifest(directory: Path, manifest: dict) -> None:
    """List every file of the directory (size, sha256) and write manifest.json last."""
    manifest["files"] = {p.name: file_record(directory, p.name) for p in sorted(directory.iterdir())
                         if p.is_file() and p.name != MANIFEST}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, default=_json_default) + "\n")


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
