"""The artefact directory's `manifest.json`: versions, opset, tolerances, graphs, settings, and every file's checksum.

The manifest is written last, after the files it lists; the scorer (laser_batch/artifacts.py) reads and checks it.
"""

from __future__ import annotations

import json
import platform
from dataclasses import asdict
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

from laser_batch import __version__
from laser_batch.artifacts import MANIFEST, MANIFEST_VERSION, file_record
from laser_batch.exporters.parts import OPSET
from laser_batch.exporters.validate import TOLERANCE, TOP_K, TOP_K_AGREEMENT

PACKAGES = ("torch", "transformers", "optimum", "optimum-onnx", "onnx", "onnxruntime-gpu", "onnxruntime", "tokenizers",
            "polars", "numpy")


def new_manifest(kind: str, graphs: dict, settings: dict) -> dict:
    """The manifest of a `kind` ("laser" or "sasrec") export, before its file list."""
    return {"manifest_version": MANIFEST_VERSION, "kind": kind, "created_by": f"laser-batch {__version__}",
            "versions": _versions(), "opset": OPSET, "exporter": "optimum.exporters.onnx.export (TorchScript)",
            "tolerance": {**TOLERANCE, f"top{TOP_K}_same_set": TOP_K_AGREEMENT}, "graphs": graphs,
            "settings": settings}


def write_manifest(directory: Path, manifest: dict) -> None:
    """List every file of the directory (size, sha256) and write manifest.json last."""
    manifest["files"] = {p.name: file_record(directory, p.name) for p in sorted(directory.iterdir())
                         if p.is_file() and p.name != MANIFEST}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, default=_json_default) + "\n")


def _versions() -> dict:
    out = {"laser-batch": __version__, "python": platform.python_version()}
    for package in PACKAGES:
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            continue
    return out


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
