"""How an export is checked against torch: the tolerances, the comparisons and the held-out users they run on.

Two checks, each a failure when it misses its tolerance:

- `validate_part`: one exported graph vs its torch part, through Optimum's `validate_model_outputs` and then our
  `parity` at the two `VALIDATION_SHAPES` (batch and sequence sizes other than the trace's, where baked-in shapes
  show up);
- `end_to_end`: user embeddings through all the exported graphs vs the torch model on held-out users, and their
  top-10 lists.

`compare` and `agreement` are the measures both checks and the quantised variants (exporters/quantize.py) record.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from optimum.exporters.onnx import OnnxConfig, validate_model_outputs

from laser_batch.artifacts import Embedder, session
from laser_batch.errors import ArtifactError
from laser_batch.metrics import top_k
from laser_batch.sequences import evenly_spread

VALIDATION_SHAPES = ({"batch_size": 3, "sequence_length": 5}, {"batch_size": 5, "sequence_length": 11})
# fp32 parity demanded of every graph (output vs torch): max |diff| and the worst row cosine.
TOLERANCE = {"max_abs_diff": 1e-3, "min_cosine": 0.9999}
TOP_K = 10
TOP_K_AGREEMENT = 0.99  # share of held-out users whose top-10 set must be the same as torch's at fp32
FP16_MIN_COSINE = 0.999  # fp16 graphs: worst user-embedding cosine to torch fp32 (their top-10 is recorded)


@dataclass(frozen=True)
class HeldOut:
    """Test-split users an export is checked on: histories (internal item ids, oldest first), their next items
    (internal ids) and the torch model's (B, D) user embeddings."""

    histories: list[np.ndarray]
    targets: np.ndarray
    reference: np.ndarray


def validate_part(name: str, part: torch.nn.Module, onnx_config: OnnxConfig, path: Path) -> list[dict]:
    """Check PATH against `part` with Optimum's validator, then at our two shapes; returns the `parity` records.

    Raises:
        ArtifactError: an output differs from torch beyond `TOLERANCE`, or has another shape.
    """
    try:
        validate_model_outputs(onnx_config, part, path, list(onnx_config.outputs), atol=TOLERANCE["max_abs_diff"],
                               input_shapes=dict(VALIDATION_SHAPES[0]), use_subprocess=False)
    except ValueError as e:
        raise ArtifactError(f"{name}.onnx: does not match torch ({str(e).splitlines()[0]})") from e
    return [parity(name, part, onnx_config, path, shape) for shape in VALIDATION_SHAPES]


def parity(name: str, part: torch.nn.Module, onnx_config: OnnxConfig, path: Path, shape: dict) -> dict:
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
            stats = compare(expected.reshape(len(expected), -1), actual.reshape(len(actual), -1))
            record[output] = stats
            ok = stats["max_abs_diff"] <= TOLERANCE["max_abs_diff"] and stats["min_cosine"] >= TOLERANCE["min_cosine"]
        if not ok:
            raise ArtifactError(f"{name}.onnx: output {output} differs from torch at batch {shape['batch_size']}, "
                                f"length {shape['sequence_length']}: {record[output]} (allowed: {TOLERANCE})")
    return record


def compare(expected: np.ndarray, actual: np.ndarray) -> dict:
    """Two (B, D) arrays row by row: max |diff| over all entries, mean and worst row cosine."""
    cosine = (expected * actual).sum(1) / np.maximum(
        np.linalg.norm(expected, axis=1) * np.linalg.norm(actual, axis=1), 1e-12)
    return {"max_abs_diff": float(np.abs(expected - actual).max()), "mean_cosine": float(cosine.mean()),
            "min_cosine": float(cosine.min())}


def agreement(a: np.ndarray, b: np.ndarray) -> dict:
    """How alike two (B, k) top-k lists are: same set, same order, mean overlap."""
    same_set = np.array([set(x) == set(y) for x, y in zip(a.tolist(), b.tolist(), strict=True)])
    overlap = np.array([len(set(x) & set(y)) / len(x) for x, y in zip(a.tolist(), b.tolist(), strict=True)])
    return {"same_set": float(same_set.mean()), "same_order": float((a == b).all(1).mean()),
            "mean_overlap": float(overlap.mean())}


def end_to_end(directory: Path, held_out: HeldOut, item_matrix: np.ndarray, *,
               required_agreement: float | None = TOP_K_AGREEMENT) -> dict:
    """User embeddings through the exported graphs vs torch, and their top-10 lists; fails below 99%.

    Raises:
        ArtifactError: fewer than `required_agreement` of the users keep torch's top-10 set (None: no bar).
    """
    histories, reference = held_out.histories, held_out.reference
    embedder = Embedder(directory, device="cpu", verify=False)  # its files were hashed just now
    got = np.concatenate([embedder.embed(histories[i:i + 16]) for i in range(0, len(histories), 16)])
    record = {"users": len(histories), **compare(reference, got),
              f"top{TOP_K}": agreement(top_k(reference @ item_matrix.T, TOP_K)[0],
                                       top_k(got @ item_matrix.T, TOP_K)[0])}
    if required_agreement is not None and record[f"top{TOP_K}"]["same_set"] < required_agreement:
        raise ArtifactError(f"{directory.name}: the exported graphs give another top-{TOP_K} than torch for "
                            f"{1 - record[f'top{TOP_K}']['same_set']:.1%} of {len(histories)} held-out users "
                            f"(allowed: {1 - TOP_K_AGREEMENT:.0%})")
    return record


def sample(histories: list[np.ndarray], targets: np.ndarray, count: int) -> tuple[list[np.ndarray], np.ndarray]:
    """`count` (history, target) pairs spread evenly over the users (deterministic)."""
    rows = evenly_spread(len(histories), count)
    return [histories[r] for r in rows], np.asarray(targets)[rows]
