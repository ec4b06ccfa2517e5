"""Typed configuration: dataclasses validated on construction, loaded from TOML with unknown keys rejected.

A config file has one table per component:

    [sasrec]
    hidden_size = 64
    [train]
    epochs = 100
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import tomllib

from laser_batch.errors import ConfigError

SASREC_LOSSES = ("ce", "bce")


def _require(condition: bool, option: str, value: object, expected: str) -> None:
    if not condition:
        raise ConfigError(f"{option} = {value!r} is invalid: expected {expected}")


@dataclass
class SASRecConfig:
    """The ID model. Defaults follow the strong full-catalogue cross-entropy setting (hidden 50, 2 blocks)."""

    hidden_size: int = 64
    num_blocks: int = 2
    num_heads: int = 1
    max_len: int = 50
    dropout: float = 0.5
    loss: str = "ce"  # "ce": softmax over the whole catalogue; "bce": the original one-negative loss

    def __post_init__(self) -> None:
        _require(self.hidden_size > 0, "sasrec.hidden_size", self.hidden_size, "a positive integer")
        _require(self.num_blocks > 0, "sasrec.num_blocks", self.num_blocks, "a positive integer")
        _require(
            self.num_heads > 0 and self.hidden_size % self.num_heads == 0,
            "sasrec.num_heads", self.num_heads, f"a positive divisor of hidden_size ({self.hidden_size})",
        )
        _require(self.max_len > 0, "sasrec.max_len", self.max_len, "a positive integer")
        _require(0.0 <= self.dropout < 1.0, "sasrec.dropout", self.dropout, "a number in [0, 1)")
        _require(self.loss in SASREC_LOSSES, "sasrec.loss", self.loss, f"one of {', '.join(SASREC_LOSSES)}")


@dataclass
class TrainConfig:
    """Optimisation and model selection (always on the validation split, never on test)."""

    epochs: int = 200
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    patience: int = 10  # stop after this many epochs without a better validation score
    select_metric: str = "NDCG@10"
    eval_batch_size: int = 1024
    seed: int = 42
    threads: int = 0  # torch intra-op threads; 0 keeps torch's default

    def __post_init__(self) -> None:
        _require(self.epochs > 0, "train.epochs", self.epochs, "a positive integer")
        _require(self.batch_size > 0, "train.batch_size", self.batch_size, "a positive integer")
        _require(self.lr > 0, "train.lr", self.lr, "a positive number")
        _require(self.weight_decay >= 0, "train.weight_decay", self.weight_decay, "a number >= 0")
        _require(self.patience > 0, "train.patience", self.patience, "a positive integer")
        name, _, k = self.select_metric.partition("@")
        _require(
            (name in ("HR", "NDCG") and k.isdigit() and int(k) > 0) or self.select_metric == "MRR",
            "train.select_metric", self.select_metric, "HR@K, NDCG@K or MRR",
        )
        _require(self.eval_batch_size > 0, "train.eval_batch_size", self.eval_batch_size, "a positive integer")
        _require(self.threads >= 0, "train.threads", self.threads, "an integer >= 0")

    @property
    def select_ks(self) -> list[int]:
        """The cut-off of `select_metric`, if it has one (e.g. [10] for NDCG@10)."""
        _, _, k = self.select_metric.partition("@")
        return [int(k)] if k else []


@dataclass
class Config:
    """The whole configuration of a run."""

    sasrec: SASRecConfig = field(default_factory=SASRecConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def from_dict(cls: type, data: dict, where: str) -> object:
    """Build dataclass `cls` from `data`, naming unknown keys and mistyped values as `where.key`."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a table, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join(_name(where, k) for k in unknown)} "
                          f"(known: {', '.join(sorted(known))})")
    values = {}
    for key, value in data.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            values[key] = from_dict(hint, value, _name(where, key))
        else:
            values[key] = _check_type(value, hint, _name(where, key))
    return cls(**values)


def _name(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _check_type(value: object, hint: object, option: str) -> object:
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if float in allowed and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if any(isinstance(value, t) and not (isinstance(value, bool) and t is not bool) for t in allowed):
        return value
    names = " or ".join(getattr(t, "__name__", str(t)) for t in allowed)
    raise ConfigError(f"{option} = {value!r} is invalid: expected {names}")


def load_config(path: Path | None = None, **overrides: dict) -> Config:
    """Read a TOML config (all keys optional), then apply `overrides` such as train={"epochs": 3}."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML ({e})") from e
    for section, values in overrides.items():
        data.setdefault(section, {}).update({k: v for k, v in values.items() if v is not None})
    return from_dict(Config, data, "")
