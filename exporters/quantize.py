"""Quantised CPU variants of `user_encoder.onnx` (the LLM: nearly all of the scoring job's work).

Schemes (each written as `user_encoder.<scheme>.onnx`, judged against the fp32 graph by the quality gate of
exporters/gate.py on held-out (history, target) pairs):

- `int8-dynamic`: Optimum's `ORTQuantizer`, dynamic int8 (QInt8 weights per channel, activations quantised
  at run time, AVX-512 VNNI config) of every linear layer (MatMul by a weight; attention stays fp32);
- `nbits8` / `nbits4`: ONNX Runtime's block-wise weight-only quantisation (`MatMulNBits`, block 32,
  symmetric) with int8 compute (`accuracy_level` 4, AVX-512 VNNI);
- `nbits8-fp32`: the same 8-bit weights computed in fp32 (`accuracy_level` 1: blocks dequantised, no activation
  rounding), the most exact 8-bit scheme;
- `int8-smooth`: SmoothQuant (exporters/smooth.py) on a copy of the LLM, calibrated on held-out validation
  histories, exported in fp32 again, then `int8-dynamic`: the activations' outlier channels move into the weights
  before the per-tensor activation quantisation (Llama-family LLMs only);
- `<scheme>-mixed` (int8-dynamic, nbits8, int8-smooth: the layers kept in fp32; nbits4: kept at 8 bits): the
  layers that hurt most are chosen by a measured **sensitivity pass** (`sensitivity`): each weight MatMul alone is
  quantised with the scheme, validation histories run through that graph, and the layer's error is 1 - the mean
  cosine of their user embeddings to fp32's; the fewest worst layers that make up half of the summed error are kept
  (at most a quarter of the layers). The pass is recorded in the manifest (`graphs.user_encoder.sensitivity`).

Every variant of a centred encoder then gets its centre re-calibrated (`correct_centre`, bias correction as in
Nagel et al. 2019, "Data-Free Quantization"): quantisation shifts the pooled hidden state by an error whose mean
over inputs is a large part of it (SmolLM2-135M, fake-quantised block-wise int8 in torch: mean error norm 1.30 of
2.15, centred embedding norm 9.8), and centring then leaves that shift in the embedding. Subtracting
centre + mean(quantised - fp32 pooled state) over the calibration histories removes it.

Only MatMul layers are quantised: GPT-2's Conv1D layers export as Gemm and stay fp32 (`quantized_layers`
in the manifest says how many layers a variant really quantised).

`add_variants` is the export's one entry: it makes, corrects, judges and records every scheme asked for, and names
the fastest non-inferior one `recommended_cpu_variant` (what `score --variant auto` runs on a CPU).
"""

from __future__ import annotations

import copy
import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from optimum.onnxruntime import ORTQuantizer
from optimum.onnxruntime.configuration import AutoQuantizationConfig

from laser_batch.artifacts import ITEM_MATRIX, Embedder, session
from laser_batch.encode import LaserInputs, encode_users
from laser_batch.errors import InputError
from laser_batch.exporters import gate
from laser_batch.exporters.smooth import activation_ranges, smooth, supports_smoothing
from laser_batch.exporters.validate import agreement, compare
from laser_batch.metrics import metric_per_user
from laser_batch.model import Laser
from laser_batch.sequences import length_batches

logger = logging.getLogger(__name__)

SCHEMES = ("int8-dynamic", "int8-dynamic-mixed", "nbits8", "nbits8-mixed", "nbits8-fp32", "nbits4", "nbits4-mixed",
           "int8-smooth", "int8-smooth-mixed")
MIXED = {"int8-dynamic-mixed": "int8-dynamic", "nbits8-mixed": "nbits8", "nbits4-mixed": "nbits4",
         "int8-smooth-mixed": "int8-smooth"}  # each `-mixed` scheme and the scheme whose sensitivity pass it uses
TORCH_SCHEMES = ("int8-smooth", "int8-smooth-mixed")  # from the torch model, through `smooth_encoder`
CENTRE = "laser.center"  # the graph initializer that the pooled hidden state is centred by (Laser.encode)
BLOCK_SIZE = 32
ACCURACY_LEVEL = 4  # MatMulNBits: int8 compute
FP32_ACCURACY_LEVEL = 1  # MatMulNBits: fp32 compute (the `-fp32` schemes)
CALIBRATION_USERS = 64  # validation histories whose activation ranges calibrate SmoothQuant (int8-smooth)
SENSITIVITY_USERS = 32  # of those, the ones each layer of a sensitivity pass is measured on
KEEP_SHARE, KEEP_MAX = 0.5, 0.25
KEEP_RULE = (f"keep the fewest most sensitive layers that make up {KEEP_SHARE:.0%} of the summed single-layer error, "
             f"at most {KEEP_MAX:.0%} of the layers")


def parse_schemes(quantize: list[str] | None) -> tuple[list[str], bool]:
    """The schemes `--quantize` asks for, in order, and whether it asked for every one ("int8").

    Raises:
        InputError: an unknown scheme.
    """
    every_scheme = bool(quantize and "int8" in quantize)
    schemes = list(SCHEMES) if every_scheme else list(dict.fromkeys(quantize or []))
    unknown = [s for s in schemes if s not in SCHEMES]
    if unknown:
        raise InputError(f"--quantize {unknown[0]!r}: choose int8 (every scheme) or one of {', '.join(SCHEMES)}")
    return schemes, every_scheme


def add_variants(directory: Path, laser: Laser, schemes: list[str], *, every_scheme: bool,
                 export_encoder: Callable[[Laser, Path], object], torch_inputs: LaserInputs,
                 calibration: list[np.ndarray], pairs: gate.Pairs, threads: int,
                 torch_bf16: np.ndarray | None = None) -> dict:
    """Write ARTIFACTS/user_encoder.<scheme>.onnx for each scheme, each judged against the fp32 graph by the gate.

    Args:
        directory: the artefact directory, its fp32 graphs and manifest written.
        laser: the exported Laser model (fp32); the SmoothQuant schemes rescale a copy of it.
        schemes: from `parse_schemes`.
        every_scheme: "int8" asked for every scheme: one this LLM cannot take is recorded as skipped, not refused.
        export_encoder: `export_encoder(laser, where)` writes where/user_encoder.onnx from a Laser model.
        torch_inputs: the torch model's item inputs (`laser_batch.encode.laser_inputs`), for calibration.
        calibration: validation histories that calibrate SmoothQuant, the centre correction and the sensitivity
            passes (`SENSITIVITY_USERS` of them).
        pairs: the quality gate's held-out pairs (exporters/gate.py); every variant's speed is measured on them too.
        threads: ONNX Runtime threads for the measurements (0: its default).
        torch_bf16: the torch model's user vectors for `pairs` with bf16 LLM weights, judged as the reference for
            ordinary numeric noise; None: not judged.

    Returns:
        The user encoder's manifest entries: "variants" {scheme: record}, "gate" (the pairs, fp32's numbers, torch
        bf16's), "sensitivity" (the per-layer passes), "recommended_cpu_variant" (`gate.recommend`: the fastest
        non-inferior variant faster than fp32, or None) and "recommended_reason".

    Raises:
        InputError: a SmoothQuant scheme asked for by name, for an LLM outside the Llama family.
    """
    embedder = Embedder(directory, device="cpu", threads=threads, verify=False)  # hashed just now
    item_matrix = np.load(directory / ITEM_MATRIX)
    model_type = laser.llm.model.config.model_type
    batches = _pair_batches(embedder, pairs)
    fp32 = _embed(embedder.user_encoder, embedder, batches, len(pairs))
    reference = gate.rank(fp32.vectors, pairs, item_matrix)
    record_gate = {"users": len(pairs) // 2, "pairs": len(pairs), "metric_k": gate.K,
                   "non_inferiority": f"lower end of the 95% interval of (variant - fp32) NDCG@{gate.K} >= "
                                      f"-{gate.NON_INFERIORITY:.0%} of fp32's NDCG@{gate.K}",
                   "fp32": {f"hr{gate.K}": float((reference.ranks <= gate.K).mean()),
                            f"ndcg{gate.K}": float(metric_per_user(reference.ranks, f"NDCG@{gate.K}").mean()),
                            "users_per_second": round(len(pairs) / fp32.seconds, 2)}}
    if torch_bf16 is not None:
        record_gate["torch_bf16"] = gate.judge(reference, gate.rank(torch_bf16, pairs, item_matrix))
    sensitive_feeds = [embedder.feeds(calibration[i:i + 16]) for i in range(0, SENSITIVITY_USERS, 16)]
    passes: dict[str, dict] = {}
    variants: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(dir=directory) as scratch:  # gone before the manifest lists the files
        smoothed = None  # the SmoothQuant fp32 graph, made once for every TORCH_SCHEMES variant
        for scheme in schemes:
            started = time.perf_counter()
            if scheme in TORCH_SCHEMES and not supports_smoothing(laser.llm.model):
                if not every_scheme:
                    raise InputError(f"--quantize {scheme}: needs a Llama-family LLM (q/k/v/o, gate/up/down "
                                     f"projections, RMSNorm); {model_type} is not")
                variants[scheme] = {"skipped": f"not a Llama-family LLM ({model_type})"}
                continue
            if scheme in TORCH_SCHEMES and smoothed is None:
                smoothed = smooth_encoder(Path(scratch) / "smoothed", laser, export_encoder,
                                          lambda model: encode_users(model, torch_inputs, calibration, batch_size=16))
            keep: list[str] = []
            if scheme in MIXED:
                family = MIXED[scheme]
                if family not in passes:
                    passes[family] = sensitivity(directory, family, sensitive_feeds, embedder,
                                                 Path(scratch) / "pass", smoothed=smoothed)
                keep = passes[family]["kept"]
            file = quantize(directory, scheme, smoothed=smoothed, keep=keep)
            correction = correct_centre(embedder, file, calibration)
            variants[scheme] = {"file": file, "quantize_seconds": round(time.perf_counter() - started, 2),
                                **({"centre_correction": correction} if correction else {}),
                                **measure(embedder, file, item_matrix, pairs, batches, fp32, reference)}
            logger.info("%s: %s", scheme, variants[scheme])
    name, reason = gate.recommend(variants)
    return {"variants": variants, "gate": record_gate, "sensitivity": passes, "recommended_cpu_variant": name,
            "recommended_reason": reason}


def variant_file(scheme: str) -> str:
    return f"user_encoder.{scheme}.onnx"


def quantize(directory: Path, scheme: str, source: str = "user_encoder.onnx", *, smoothed: Path | None = None,
             keep: Sequence[str] = ()) -> str:
    """Write ARTIFACTS/user_encoder.<scheme>.onnx from the fp32 graph; returns its file name.

    The `TORCH_SCHEMES` start from `smoothed`/user_encoder.onnx instead, the graph `smooth_encoder` writes. `keep`:
    the MatMul nodes a `-mixed` scheme keeps at higher precision (fp32; 8 bits in nbits4-mixed), from its
    sensitivity pass.
    """
    directory = Path(directory)
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantisation scheme {scheme!r}; choose from {', '.join(SCHEMES)}")
    origin, source = _origin(directory, scheme, source, smoothed)
    target = directory / variant_file(scheme)
    _write(origin, source, target, scheme, keep=keep)
    return target.name


def _origin(directory: Path, scheme: str, source: str, smoothed: Path | None) -> tuple[Path, str]:
    if scheme in TORCH_SCHEMES:
        if smoothed is None:
            raise ValueError(f"{scheme} starts from the SmoothQuant graph: pass smoothed= (smooth_encoder)")
        return Path(smoothed), "user_encoder.onnx"
    return directory, source


def _write(origin: Path, source: str, target: Path, scheme: str, *, keep: Sequence[str] = (),
           only: Sequence[str] | None = None) -> None:
    """Quantise origin/source into `target` with `scheme`'s quantiser: every weight MatMul but `keep`, or `only`."""
    external = (origin / f"{source}_data").exists()
    if scheme.startswith(("int8-dynamic", "int8-smooth")):
        _dynamic_int8(origin, source, target, keep=keep, only=only, external=external)
    else:
        bits = 8 if scheme.startswith("nbits8") else 4
        level = FP32_ACCURACY_LEVEL if scheme.endswith("-fp32") else ACCURACY_LEVEL
        _nbits(origin / source, target, bits, keep=keep, only=only, external=external, accuracy_level=level)


def sensitivity(directory: Path, scheme: str, feeds: list, embedder: Embedder, scratch: Path, *,
                smoothed: Path | None = None) -> dict:
    """The per-layer sensitivity pass of `scheme`: quantise one weight MatMul at a time, measured.

    Each layer alone is quantised with `scheme`'s quantiser; the calibration `feeds` (validation histories) run
    through that graph, and the layer's error is 1 - the mean cosine of their user embeddings to the fp32 graph's.
    The layers kept at higher precision by the scheme's `-mixed` variant are `choose_kept`'s pick.
    """
    started = time.perf_counter()
    origin, source = _origin(directory, scheme, "user_encoder.onnx", smoothed)
    reference = np.concatenate([embedder.user_encoder.run(["embedding"], f)[0] for f in feeds])
    layers = weight_matmuls(onnx.load(str(origin / source), load_external_data=False))
    scratch.mkdir(parents=True, exist_ok=True)
    errors = {}
    for name in layers:
        target = scratch / "one_layer.onnx"
        _write(origin, source, target, scheme, only=[name])
        quantised = _quantized_nodes(onnx.load(str(target), load_external_data=False))
        if quantised != 1:
            raise RuntimeError(f"{scheme} sensitivity pass: quantising {name} alone gave {quantised} quantised layers")
        one = session(target, ["CPUExecutionProvider"], threads=embedder.threads)
        got = np.concatenate([one.run(["embedding"], f)[0] for f in feeds])
        errors[name] = max(0.0, 1.0 - compare(reference, got)["mean_cosine"])
        del one
        for file in scratch.glob("one_layer.onnx*"):
            file.unlink()
    kept = choose_kept(errors)
    ranked = sorted(errors.items(), key=lambda item: -item[1])
    logger.info("%s sensitivity: keeps %s; worst %s", scheme, kept, ranked[:5])
    return {"scheme": scheme, "metric": "1 - mean cosine of the user embedding to fp32's, this layer alone quantised",
            "calibration_users": sum(len(f["input_ids"]) for f in feeds), "rule": KEEP_RULE,
            "layers": dict(ranked), "kept": kept, "seconds": round(time.perf_counter() - started, 1)}


def choose_kept(errors: dict[str, float]) -> list[str]:
    """The fewest most sensitive layers whose errors make up `KEEP_SHARE` of all layers' summed error, at most
    `KEEP_MAX` of the layers (`KEEP_RULE`)."""
    ranked = sorted(errors, key=lambda name: -errors[name])
    total = sum(errors.values())
    kept: list[str] = []
    covered = 0.0
    for name in ranked[:max(1, int(len(ranked) * KEEP_MAX))]:
        if total <= 0 or covered >= KEEP_SHARE * total:
            break
        kept.append(name)
        covered += errors[name]
    return kept


def smooth_encoder(scratch: Path, laser: Laser, export_encoder: Callable[[Laser, Path], object],
                   calibrate: Callable[[Laser], object]) -> Path:
    """Write scratch/user_encoder.onnx, the fp32 graph of a SmoothQuant-rescaled copy of the LLM; returns `scratch`.

    `export_encoder(laser, directory)` writes directory/user_encoder.onnx from a Laser model; `calibrate(laser)`
    runs that model's user path on the calibration histories. `laser` itself is not changed. Every
    `TORCH_SCHEMES` variant quantises this one graph.
    """
    smoothed = copy.deepcopy(laser)
    ranges = activation_ranges(smoothed.llm.model, lambda: calibrate(smoothed))
    smooth(smoothed.llm.model, ranges)
    export_encoder(smoothed, Path(scratch))
    return Path(scratch)


def weight_matmuls(model: onnx.ModelProto) -> list[str]:
    """MatMuls by a constant weight (the linear layers), not activation x activation (attention scores)."""
    weights = {i.name for i in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in weights]


def _quantized_nodes(model: onnx.ModelProto) -> int:
    """How many linear layers a graph runs quantised."""
    return sum(n.op_type in ("MatMulNBits", "MatMulInteger", "DynamicQuantizeMatMul") for n in model.graph.node)


def _dynamic_int8(directory: Path, source: str, target: Path, *, keep: Sequence[str] = (),
                  only: Sequence[str] | None = None, external: bool) -> None:
    model = onnx.load(str(directory / source), load_external_data=False)
    nodes = list(only) if only is not None else [n for n in weight_matmuls(model) if n not in set(keep)]
    config = AutoQuantizationConfig.avx512_vnni(
        is_static=False, per_channel=True, operators_to_quantize=["MatMul"], nodes_to_quantize=nodes)
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        quantizer = ORTQuantizer.from_pretrained(directory, file_name=source)
        save_dir = quantizer.quantize(config, save_dir=tmp, file_suffix="q", use_external_data_format=external)
        _move_model(Path(save_dir) / f"{Path(source).stem}_q.onnx", target, external)


def _nbits(source: Path, target: Path, bits: int, *, keep: Sequence[str] = (), only: Sequence[str] | None = None,
           external: bool, accuracy_level: int) -> None:
    # The one import not at module top: importing this module runs logging.basicConfig(level=INFO) on the root
    # logger, which would print every export's log lines twice. ONNX Runtime imports it inside a function too.
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer  # noqa: PLC0415

    model = onnx.load(str(source))
    settings = dict(block_size=BLOCK_SIZE, is_symmetric=True, accuracy_level=accuracy_level)
    layers = weight_matmuls(model)
    # Selected by exclusion only: this quantiser ignores `nodes_to_include` without an algorithm config and
    # quantises every layer (a one-layer sensitivity pass measured the whole graph 56 times).
    if only is not None:
        exclude = [n for n in layers if n not in set(only)]
    else:
        exclude = list(keep)
    quantizer = MatMulNBitsQuantizer(model, bits=bits, nodes_to_exclude=exclude, **settings)
    quantizer.process()
    if keep and bits < 8:  # 4-bit schemes keep their sensitive layers at 8 bits; 8-bit ones keep them in fp32
        rest = weight_matmuls(quantizer.model.model)  # the fp32 MatMuls left: `keep`
        quantizer = MatMulNBitsQuantizer(quantizer.model.model, bits=8,
                                         nodes_to_exclude=[n for n in rest if n not in set(keep)], **settings)
        quantizer.process()
    quantizer.model.save_model_to_file(str(target), use_external_data_format=external)


def _move_model(written: Path, target: Path, external: bool) -> None:
    if external:  # re-save so the external data file is named after the target
        onnx.save(onnx.load(str(written)), str(target), save_as_external_data=True,
                  all_tensors_to_one_file=True, location=f"{target.name}_data")
    else:
        shutil.move(str(written), target)


def correct_centre(embedder: Embedder, scheme_file: str, calibration: list[np.ndarray], *,
                   batch_size: int = 16) -> dict | None:
    """Re-calibrate the centre of ARTIFACTS/`scheme_file` so that its pooled states are centred like fp32's.

    new centre = fp32 centre + mean over `calibration` of (variant pooled state - fp32 pooled state); written into
    the variant's `laser.center`. Kept only where it brings the calibration embeddings closer to fp32's (mean
    cosine). Returns what was done, or None for a graph without centring.
    """
    directory = Path(embedder.directory)
    path = directory / scheme_file
    external = (directory / f"{scheme_file}_data").exists()
    variant = onnx.load(str(path))
    pooled = _centred_input(variant)
    if pooled is None:
        return None
    reference = onnx.load(str(directory / "user_encoder.onnx"))
    centre = _initializer(reference, CENTRE)
    batches = [embedder.feeds(calibration[i:i + batch_size]) for i in range(0, len(calibration), batch_size)]
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        scratch = Path(tmp)
        raw_fp32 = _pooled_states(reference, _centred_input(reference), batches, scratch / "fp32.onnx",
                                  embedder.threads)
        raw_variant = _pooled_states(variant, pooled, batches, scratch / "variant.onnx", embedder.threads)
    shift = (raw_variant - raw_fp32).mean(0)
    before = compare(raw_fp32 - centre, raw_variant - _initializer(variant, CENTRE))["mean_cosine"]
    after = compare(raw_fp32 - centre, raw_variant - (centre + shift))["mean_cosine"]
    record = {"calibration_users": len(calibration), "shift_norm": float(np.linalg.norm(shift)),
              "centre_norm": float(np.linalg.norm(centre)), "calibration_cosine_before": before,
              "calibration_cosine_after": after, "applied": after > before}
    if record["applied"]:
        _set_initializer(variant, CENTRE, (centre + shift).astype(np.float32))
        onnx.save(variant, str(path), save_as_external_data=external, all_tensors_to_one_file=True,
                  location=f"{scheme_file}_data")
    return record


def _centred_input(model: onnx.ModelProto) -> str | None:
    """The name of the tensor the graph centres (the pooled hidden state), or None without centring."""
    return next((n.input[0] for n in model.graph.node if n.op_type == "Sub" and n.input[1] == CENTRE), None)


def _initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    return numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == name)).astype(np.float32)


def _set_initializer(model: onnx.ModelProto, name: str, value: np.ndarray) -> None:
    tensor = next(i for i in model.graph.initializer if i.name == name)
    tensor.CopyFrom(numpy_helper.from_array(value, name))


def _pooled_states(model: onnx.ModelProto, pooled: str, batches: list[dict], scratch: Path, threads: int) -> np.ndarray:
    """Run a copy of `model` that also outputs `pooled` (written to `scratch`, external data for big LLMs).

    A copy, because saving with external data moves the weights out of the proto it saves.
    """
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    copy.graph.output.append(onnx.helper.make_tensor_value_info(pooled, onnx.TensorProto.FLOAT, None))
    onnx.save(copy, str(scratch), save_as_external_data=True, all_tensors_to_one_file=True,
              location=f"{scratch.name}_data")
    sess = session(scratch, ["CPUExecutionProvider"], threads=threads)
    return np.concatenate([sess.run([pooled], feeds)[0] for feeds in batches]).astype(np.float64)


@dataclass(frozen=True)
class Embedded:
    """One graph's run over the gate's pairs: user embeddings, the user vectors the item matrix scores (fused
    ones with the gated fusion), in pair order, and the seconds the graph runs took."""

    embeddings: np.ndarray
    vectors: np.ndarray
    seconds: float


def _pair_batches(embedder: Embedder, pairs: gate.Pairs, batch_size: int = 32) -> list[tuple[np.ndarray, dict]]:
    """(rows, feeds) of the pairs grouped by text length (as the scorer groups users), built once for every graph."""
    lengths = embedder.text.lengths(pairs.histories)
    return [(rows, embedder.feeds([pairs.histories[r] for r in rows]))
            for rows in length_batches(lengths, batch_size)]


def _embed(graph, embedder: Embedder, batches: list[tuple[np.ndarray, dict]], count: int) -> Embedded:
    embeddings, vectors, seconds = None, None, 0.0
    for rows, feeds in batches:
        started = time.perf_counter()
        out = graph.run(["embedding"], feeds)[0]
        seconds += time.perf_counter() - started
        vector = embedder.user_vectors(feeds, out)
        if embeddings is None:
            embeddings = np.empty((count, out.shape[1]), dtype=np.float32)
            vectors = np.empty((count, vector.shape[1]), dtype=np.float32)
        embeddings[rows], vectors[rows] = out, vector
    return Embedded(embeddings, vectors, seconds)


def measure(embedder: Embedder, scheme_file: str, item_matrix: np.ndarray, pairs: gate.Pairs,
            batches: list[tuple[np.ndarray, dict]], fp32: Embedded, reference: gate.Ranking) -> dict:
    """A variant of the user encoder against the fp32 graph on the gate's pairs: the gate's numbers, its speed
    (graph runs only, on the same batches), and the diagnostics (embedding cosines, exact top-10 agreement)."""
    variant = session(Path(embedder.directory) / scheme_file, ["CPUExecutionProvider"], threads=embedder.threads)
    got = _embed(variant, embedder, batches, len(pairs))
    ranking = gate.rank(got.vectors, pairs, item_matrix)
    return {
        "quantized_layers": _quantized_nodes(onnx.load(str(Path(embedder.directory) / scheme_file),
                                                       load_external_data=False)),
        "gate": gate.judge(reference, ranking),
        **compare(fp32.embeddings, got.embeddings), "top10_vs_fp32": agreement(reference.top, ranking.top),
        "users_per_second": round(len(pairs) / got.seconds, 2),
        "fp32_users_per_second": round(len(pairs) / fp32.seconds, 2),
        "speedup_vs_fp32": round(fp32.seconds / got.seconds, 3),
        "bytes": (Path(embedder.directory) / scheme_file).stat().st_size,
    }
