"""Quantised CPU variants of `user_encoder.onnx` (the LLM: nearly all of the scoring job's work).

Schemes (each written as `user_encoder.<scheme>.onnx` and measured against the fp32 graph on held-out users):

- `int8-dynamic`: Optimum's `ORTQuantizer`, dynamic int8 (QInt8 weights per channel, activations quantised
  at run time, AVX-512 VNNI config) of every linear layer (MatMul by a weight; attention stays fp32);
- `int8-dynamic-mixed`: the same with the MLP down-projections (the layers with the widest activation range)
  kept in fp32;
- `nbits8` / `nbits4`: ONNX Runtime's block-wise weight-only quantisation (`MatMulNBits`, block 32,
  symmetric) with int8 compute (`accuracy_level` 4, AVX-512 VNNI);
- `nbits8-fp32`: the same 8-bit weights computed in fp32 (`accuracy_level` 1: blocks dequantised, no activation
  rounding), the most exact 8-bit scheme;
- `nbits4-mixed`: 4-bit weights, the MLP down-projections at 8 bits;
- `int8-smooth`: SmoothQuant (exporters/smooth.py) on a copy of the LLM, calibrated on held-out validation
  histories, exported in fp32 again, then `int8-dynamic`: the activations' outlier channels move into the weights
  before the per-tensor activation quantisation (Llama-family LLMs only);
- `int8-smooth-mixed`: the same with the MLP down-projections kept in fp32 (their inputs, act(gate) * up, hold the
  largest outliers: SmolLM2-135M has channels 3,575x the median in one layer, beyond what smoothing can even out).

Every variant of a centred encoder then gets its centre re-calibrated (`correct_centre`, bias correction as in
Nagel et al. 2019, "Data-Free Quantization"): quantisation shifts the pooled hidden state by an error whose mean
over inputs is a large part of it (SmolLM2-135M, fake-quantised block-wise int8 in torch: mean error norm 1.30 of
2.15, centred embedding norm 9.8), and centring then leaves that shift in the embedding. Subtracting
centre + mean(quantised - fp32 pooled state) over the calibration histories removes it.

Only MatMul layers are quantised: GPT-2's Conv1D layers export as Gemm and stay fp32 (`quantized_layers`
in the manifest says how many layers a variant really quantised).

`add_variants` is the export's one entry: it makes, corrects, measures and records every scheme asked for.
"""

from __future__ import annotations

import copy
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from optimum.onnxruntime import ORTQuantizer
from optimum.onnxruntime.configuration import AutoQuantizationConfig

from laser_batch.artifacts import ITEM_MATRIX, Embedder, session
from laser_batch.encode import LaserInputs, encode_users
from laser_batch.errors import InputError
from laser_batch.exporters.smooth import activation_ranges, smooth, supports_smoothing
from laser_batch.exporters.validate import TOP_K, HeldOut, agreement, compare
from laser_batch.metrics import top_k
from laser_batch.model import Laser

logger = logging.getLogger(__name__)

SCHEMES = ("int8-dynamic", "int8-dynamic-mixed", "nbits8", "nbits8-fp32", "nbits4", "nbits4-mixed", "int8-smooth",
           "int8-smooth-mixed")
TORCH_SCHEMES = ("int8-smooth", "int8-smooth-mixed")  # from the torch model, through `smooth_encoder`
CENTRE = "laser.center"  # the graph initializer that the pooled hidden state is centred by (Laser.encode)
SENSITIVE = ("down_proj", "mlp/c_proj", "mlp/fc2", "dense_4h_to_h")  # MLP output projections, by architecture
BLOCK_SIZE = 32
ACCURACY_LEVEL = 4  # MatMulNBits: int8 compute
FP32_ACCURACY_LEVEL = 1  # MatMulNBits: fp32 compute (the `-fp32` schemes)
QUALITY_BAR = 0.98  # a variant is recommended only if >= 98% of held-out users keep their fp32 top-10 set
CALIBRATION_USERS = 64  # validation histories whose activation ranges calibrate SmoothQuant (int8-smooth)


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
                 calibration: list[np.ndarray], held_out: HeldOut, threads: int) -> dict:
    """Write ARTIFACTS/user_encoder.<scheme>.onnx for each scheme, each measured against the fp32 graph.

    Args:
        directory: the artefact directory, its fp32 graphs and manifest written.
        laser: the exported Laser model (fp32); the SmoothQuant schemes rescale a copy of it.
        schemes: from `parse_schemes`.
        every_scheme: "int8" asked for every scheme: one this LLM cannot take is recorded as skipped, not refused.
        export_encoder: `export_encoder(laser, where)` writes where/user_encoder.onnx from a Laser model.
        torch_inputs: the torch model's item inputs (`laser_batch.encode.laser_inputs`), for calibration.
        calibration: validation histories that calibrate SmoothQuant and the centre correction.
        held_out: the test-split users every variant is measured on.
        threads: ONNX Runtime threads for the measurements (0: its default).

    Returns:
        {"variants": {scheme: record}, "recommended_cpu_variant": the fastest scheme that meets `QUALITY_BAR`,
        or None}, for the user encoder's manifest entry.

    Raises:
        InputError: a SmoothQuant scheme asked for by name, for an LLM outside the Llama family.
    """
    embedder = Embedder(directory, device="cpu", threads=threads, verify=False)  # hashed just now
    item_matrix = np.load(directory / ITEM_MATRIX)
    model_type = laser.llm.model.config.model_type
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
                smoothed = smooth_encoder(Path(scratch), laser, export_encoder,
                                          lambda model: encode_users(model, torch_inputs, calibration, batch_size=16))
            file = quantize(directory, scheme, smoothed=smoothed)
            correction = correct_centre(embedder, file, calibration)
            variants[scheme] = {"file": file, "quantize_seconds": round(time.perf_counter() - started, 2),
                                **({"centre_correction": correction} if correction else {}),
                                **measure(embedder, file, held_out.histories, held_out.targets, item_matrix)}
            logger.info("%s: %s", scheme, variants[scheme])
    passing = [s for s, v in variants.items() if v.get("top10_vs_fp32", {}).get("same_set", 0) >= QUALITY_BAR]
    return {"variants": variants,
            "recommended_cpu_variant": max(passing, key=lambda s: variants[s]["speedup_vs_fp32"], default=None)}


def variant_file(scheme: str) -> str:
    return f"user_encoder.{scheme}.onnx"


def quantize(directory: Path, scheme: str, source: str = "user_encoder.onnx", *, smoothed: Path | None = None) -> str:
    """Write ARTIFACTS/user_encoder.<scheme>.onnx from the fp32 graph; returns its file name.

    The `TORCH_SCHEMES` start from `smoothed`/user_encoder.onnx instead, the graph `smooth_encoder` writes.
    """
    directory = Path(directory)
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantisation scheme {scheme!r}; choose from {', '.join(SCHEMES)}")
    origin = directory
    if scheme in TORCH_SCHEMES:
        if smoothed is None:
            raise ValueError(f"{scheme} starts from the SmoothQuant graph: pass smoothed= (smooth_encoder)")
        origin, source = Path(smoothed), "user_encoder.onnx"
    target = directory / variant_file(scheme)
    external = (origin / f"{source}_data").exists()
    if scheme.startswith(("int8-dynamic", "int8-smooth")):
        _dynamic_int8(origin, source, target, mixed=scheme.endswith("mixed"), external=external)
    else:
        bits = 8 if scheme.startswith("nbits8") else 4
        level = FP32_ACCURACY_LEVEL if scheme.endswith("-fp32") else ACCURACY_LEVEL
        _nbits(origin / source, target, bits, mixed=scheme.endswith("mixed"), external=external, accuracy_level=level)
    return target.name


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


def sensitive_matmuls(model: onnx.ModelProto) -> list[str]:
    return [name for name in weight_matmuls(model) if any(s in name for s in SENSITIVE)]


def _dynamic_int8(directory: Path, source: str, target: Path, *, mixed: bool, external: bool) -> None:
    model = onnx.load(str(directory / source), load_external_data=False)
    exclude = set(sensitive_matmuls(model)) if mixed else set()
    config = AutoQuantizationConfig.avx512_vnni(
        is_static=False, per_channel=True, operators_to_quantize=["MatMul"],
        nodes_to_quantize=[n for n in weight_matmuls(model) if n not in exclude])
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        quantizer = ORTQuantizer.from_pretrained(directory, file_name=source)
        save_dir = quantizer.quantize(config, save_dir=tmp, file_suffix="q", use_external_data_format=external)
        _move_model(Path(save_dir) / f"{Path(source).stem}_q.onnx", target, external)


def _nbits(source: Path, target: Path, bits: int, *, mixed: bool, external: bool, accuracy_level: int) -> None:
    # The one import not at module top: importing this module runs logging.basicConfig(level=INFO) on the root
    # logger, which would print every export's log lines twice. ONNX Runtime imports it inside a function too.
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer  # noqa: PLC0415

    model = onnx.load(str(source))
    sensitive = sensitive_matmuls(model) if mixed else []
    quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=BLOCK_SIZE, is_symmetric=True,
                                     accuracy_level=accuracy_level, nodes_to_exclude=sensitive)
    quantizer.process()
    if sensitive:  # the excluded layers at 8 bits
        quantizer = MatMulNBitsQuantizer(quantizer.model.model, bits=8, block_size=BLOCK_SIZE, is_symmetric=True,
                                         accuracy_level=accuracy_level, nodes_to_include=sensitive)
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


def measure(embedder: Embedder, scheme_file: str, histories: list[np.ndarray], targets: np.ndarray,
            item_matrix: np.ndarray, *, batch_size: int = 16, repeats: int = 2) -> dict:
    """A variant of the user encoder vs the fp32 one on the same inputs: embeddings, top-10, Recall@10, speed."""
    variant = session(Path(embedder.directory) / scheme_file, ["CPUExecutionProvider"], threads=embedder.threads)
    batches = [embedder.feeds(histories[i:i + batch_size]) for i in range(0, len(histories), batch_size)]

    def run(sess) -> tuple[np.ndarray, np.ndarray, float]:
        """(embeddings, the user vectors the item matrix scores (fused ones with the gated fusion), seconds)."""
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            out = [sess.run(["embedding"], feeds)[0] for feeds in batches]
            best = min(best, time.perf_counter() - started)
        vectors = [embedder.user_vectors(feeds, embedding) for feeds, embedding in zip(batches, out, strict=True)]
        return np.concatenate(out), np.concatenate(vectors), best

    reference, reference_vectors, fp32_seconds = run(embedder.user_encoder)
    got, got_vectors, seconds = run(variant)
    top_ref, top_got = top_k(reference_vectors @ item_matrix.T, TOP_K)[0], top_k(got_vectors @ item_matrix.T, TOP_K)[0]
    hits = lambda top: float((top == (targets - 1)[:, None]).any(1).mean())  # noqa: E731
    nodes = onnx.load(str(Path(embedder.directory) / scheme_file), load_external_data=False).graph.node
    quantized = sum(n.op_type in ("MatMulNBits", "MatMulInteger", "DynamicQuantizeMatMul") for n in nodes)
    return {
        "quantized_layers": quantized,
        **compare(reference, got), "top10_vs_fp32": agreement(top_ref, top_got),
        "recall@10": hits(top_got), "recall@10_fp32": hits(top_ref), "recall@10_change": hits(top_got) - hits(top_ref),
        "users_per_second": round(len(histories) / seconds, 2),
        "fp32_users_per_second": round(len(histories) / fp32_seconds, 2),
        "speedup_vs_fp32": round(fp32_seconds / seconds, 3),
        "bytes": (Path(embedder.directory) / scheme_file).stat().st_size,
    }
