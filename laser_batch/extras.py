"""Which optional dependency sets (pip extras) a command needs, checked before the command does any work. No torch.

The plain install carries what a scoring machine runs: `score`, `evaluate --recs`, `report`, `items add` and the
data commands (Polars, tokenizers, NumPy, ONNX Runtime, matplotlib). Training and export need the `train` extra
(torch, transformers, Optimum and the rest); `score --engine ray` needs `ray` (`laser_batch.ray_engine` checks it).
Without the extra a training command stops with one line naming what to install, instead of a traceback from
deep inside an import.
"""

from __future__ import annotations

from importlib.util import find_spec

from laser_batch.errors import LaserBatchError

# The top-level modules of the `train` extra, in the order they are reported when missing.
TRAIN_MODULES = ("torch", "transformers", "safetensors", "optimum", "onnxscript")


class MissingExtraError(LaserBatchError):
    """A command needs an optional dependency set (a pip extra) that is not installed."""


def missing(modules: tuple[str, ...]) -> list[str]:
    """The modules of `modules` that cannot be imported here (found without importing them)."""
    absent = []
    for name in modules:
        try:
            found = find_spec(name) is not None
        except (ImportError, ValueError):  # a broken or half-removed package counts as absent
            found = False
        if not found:
            absent.append(name)
    return absent


def require_train(command: str) -> None:
    """Refuse `command` (as typed, e.g. "train") when the `train` extra is not installed.

    Raises:
        MissingExtraError: one line naming the missing module and the install command.
    """
    absent = missing(TRAIN_MODULES)
    if absent:
        raise MissingExtraError(f"laser-batch {command} needs {', '.join(absent)}, which the plain install leaves out "
                                "(it carries only what scoring needs): pip install 'laser-batch[train]'")
