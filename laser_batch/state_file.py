"""Nested training state in one safetensors file, without pickle.

A resume file must not be able to run code when it is read (a run directory may come from someone else), so the
state is split in two: every tensor goes into the safetensors body under its path in the tree (e.g.
`optimizer.state.0.exp_avg`), and everything else (numbers, strings, booleans, None, lists, tuples and dicts) goes
as JSON into the safetensors header's metadata, with the tensors replaced by `{"$tensor": name}`. Reading parses
JSON and raw tensor bytes only.

Tuples and dicts with integer keys (an optimizer's per-parameter state) come back as they went in.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from laser_batch.contracts import first_line
from laser_batch.errors import CheckpointError
from laser_batch.files import atomic_write

_METADATA_KEY = "laser_batch_state"
_TENSOR, _TUPLE, _INT_KEYS = "$tensor", "$tuple", "$int_keys"


def write_state(path: Path, state: dict[str, Any]) -> None:
    """Write `state` (a tree of tensors and JSON values) to `path` atomically."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    tree = json.dumps(_split(state, "", tensors))
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={_METADATA_KEY: tree}))


def read_state(path: Path) -> dict[str, Any]:
    """The tree `write_state` wrote; CheckpointError (one line, naming the file) for anything else."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            tree = json.loads((f.metadata() or {})[_METADATA_KEY])
            return _join(tree, {name: f.get_tensor(name) for name in f.keys()})
    except (SafetensorError, OSError, ValueError, KeyError) as e:  # ValueError: bad JSON; KeyError: missing part
        raise CheckpointError(f"{path}: not a laser-batch state file ({first_line(e)})") from e


def _split(value: Any, where: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        # A copy: safetensors refuses tensors that share memory (the best item matrix is also the frozen one).
        tensors[where] = value.detach().contiguous().clone()
        return {_TENSOR: where}
    if isinstance(value, tuple):
        return {_TUPLE: [_split(v, f"{where}.{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_split(v, f"{where}.{i}", tensors) for i, v in enumerate(value)]
    if isinstance(value, dict):
        if value and all(isinstance(k, int) and not isinstance(k, bool) for k in value):
            return {_INT_KEYS: {str(k): _split(v, f"{where}.{k}", tensors) for k, v in value.items()}}
        if not all(isinstance(k, str) and not k.startswith("$") for k in value):
            raise TypeError(f"state at {where or 'the root'}: keys must be all strings (not starting with $) "
                            f"or all integers, got {list(value)[:5]}")
        return {k: _split(v, f"{where}.{k}" if where else k, tensors) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"state at {where}: cannot store a {type(value).__name__} without pickle")


def _join(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_join(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if set(value) == {_TENSOR}:
        return tensors[value[_TENSOR]]
    if set(value) == {_TUPLE}:
        return tuple(_join(v, tensors) for v in value[_TUPLE])
    if set(value) == {_INT_KEYS}:
        return {int(k): _join(v, tensors) for k, v in value[_INT_KEYS].items()}
    return {k: _join(v, tensors) for k, v in value.items()}
