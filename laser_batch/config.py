"""Typed configuration: dataclasses validated on construction, loaded from TOML with unknown keys rejected.

A config file has one table per component:

    [sasrec]
    hidden_size = 64
    [train]
    epochs = 100

A file may start with `extends = "base.toml"` (a path relative to itself): it then holds only what it changes.
Its tables and keys override the base's key by key; a base may extend another; a cycle or a missing base is an
error naming the file.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from laser_batch.errors import ConfigError

SASREC_LOSSES = ("ce", "bce")


def _require(condition: bool, option: str, value: object, expected: str) -> None:
    if not condition:
        raise ConfigError(f"{option} = {value!r} is invalid: expected {expected}")


@dataclass
class SASRecConfig:
    """The ID model. Defaults follow the strong full-catalogue cross-entropy setting (hidden 64, 2 blocks)."""

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
    max_minutes: float = 0.0  # stop after the epoch that crosses this training time; 0 = no limit
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
        _require(self.max_minutes >= 0, "train.max_minutes", self.max_minutes, "a number >= 0 (0 = no limit)")
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


PAPER_INSTRUCTION = (
    "You are an intelligent recommendation assistant. Please summarize the user's characteristics into a single "
    "token based on the browsing history. In chronological order, the user has browsed the following items:"
)
LLM_DTYPES = ("float32", "bfloat16", "auto")  # auto: bfloat16 where the CPU has native bf16, else float32
PREFIX_KINDS = ("mformer", "free", "none")
CF_POSITIONS = ("prefix", "after_text")
POOLINGS = ("suffix", "mean", "eos")
FUSIONS = ("none", "gated")
GATE_FITS = ("valid", "train", "residual")
MFORMER_PRESETS = {
    # The paper's M-Former: 8 experts of 32 queries, width 768, 12 blocks, cross-attention every 2nd block.
    "paper": {"num_experts": 8, "num_queries": 32, "hidden_size": 768, "num_blocks": 12, "num_heads": 12,
              "cross_attention_freq": 2},
}


@dataclass
class LLMConfig:
    """The frozen LLM: "tiny" (embedded, built from a config), a hub id, a local directory or a .gguf file."""

    source: str = "tiny"
    dtype: str = "float32"
    # Keep at most the first N decoder blocks (and the final norm); 0 keeps all, as does an LLM with N or fewer.
    # The rest are freed after loading. Default 8: measured for SmolLM2-135M (8 of its 30 blocks, docs/laser.md).
    num_layers: int = 8

    def __post_init__(self) -> None:
        _require(bool(self.source), "llm.source", self.source, "a hub id, a directory, a .gguf file or 'tiny'")
        _require(self.dtype in LLM_DTYPES, "llm.dtype", self.dtype, f"one of {', '.join(LLM_DTYPES)}")
        _require(self.num_layers >= 0, "llm.num_layers", self.num_layers, "an integer >= 0 (0 = all layers)")


@dataclass
class TextConfig:
    """How histories become text. `item_line` fields: {index}, {title}, {fields} (" (brand: X, year: Y)")."""

    instruction: str = PAPER_INSTRUCTION
    item_line: str = ">>{index}. {title}{fields}"
    text_columns: list[str] | None = None  # None: every text column of items.parquet
    max_history_items: int = 3  # the paper's setup (examples/laser_paper.toml): 10
    max_text_tokens: int = 256

    def __post_init__(self) -> None:
        _require("{title}" in self.item_line, "text.item_line", self.item_line, "a template containing {title}")
        _require(self.max_history_items > 0, "text.max_history_items", self.max_history_items, "a positive integer")
        _require(self.max_text_tokens > 0, "text.max_text_tokens", self.max_text_tokens, "a positive integer")


@dataclass
class MFormerConfig:
    """MoE querying transformer. hidden_size 0 = sized to the LLM (its width, at most 256); see MFORMER_PRESETS."""

    preset: str = ""
    num_experts: int = 8
    num_queries: int = 32
    hidden_size: int = 0
    num_blocks: int = 2
    num_heads: int = 4
    cross_attention_freq: int = 2
    top_k: int = 1
    id_window: int = 10  # the last N history positions of the frozen SASRec feed the cross-attention
    # Multiplies the initial output projection: < 1 starts the prefix below the LLM's token-embedding scale (at 1,
    # SmolLM2's initial prefix rows are 2.7x its token rows and decide its output: benchmarks/README.md)
    output_init_scale: float = 1.0
    dropout: float = 0.1

    def __post_init__(self) -> None:
        if self.preset:
            _require(self.preset in MFORMER_PRESETS, "mformer.preset", self.preset,
                     f"one of {', '.join(MFORMER_PRESETS)} or empty")
            for key, value in MFORMER_PRESETS[self.preset].items():
                setattr(self, key, value)
            self.preset = ""  # applied: the stored config holds the explicit values
        for name in ("num_experts", "num_queries", "num_blocks", "num_heads", "cross_attention_freq", "id_window"):
            _require(getattr(self, name) > 0, f"mformer.{name}", getattr(self, name), "a positive integer")
        _require(1 <= self.top_k <= self.num_experts, "mformer.top_k", self.top_k,
                 f"an integer in [1, num_experts={self.num_experts}]")
        _require(self.hidden_size >= 0, "mformer.hidden_size", self.hidden_size, "0 (sized to the LLM) or positive")
        _require(self.hidden_size == 0 or self.hidden_size % self.num_heads == 0, "mformer.num_heads",
                 self.num_heads, f"a divisor of hidden_size ({self.hidden_size})")
        _require(0.0 <= self.dropout < 1.0, "mformer.dropout", self.dropout, "a number in [0, 1)")
        _require(self.output_init_scale > 0, "mformer.output_init_scale", self.output_init_scale, "a positive number")


@dataclass
class LaserConfig:
    """Bi-Tuning, the loss and the two training stages.

    The defaults are the combination measured best for a small LLM on a CPU (issue 22, docs/laser.md "Defaults"):
    the LLM reads text only (a free prefix after the text, then the suffix) and its cosine is added to SASRec's
    scores through the gated fusion. examples/laser_paper.toml sets the paper's setup instead.
    """

    # "mformer" (the paper): the M-Former's CF tokens from the frozen SASRec; "free": learned prefix vectors without
    # collaborative input (the collaborative signal then enters through the fusion); "none": no prefix
    prefix: str = "free"
    # Where the prefix goes: "prefix" (the paper) = [prefix] + text + [suffix]; "after_text" = text + [prefix] +
    # [suffix]. With a causal LLM the text then depends on nothing trained, so training encodes it once per step
    # without gradients and runs forward and backward over the prefix and suffix only (Laser.training_forward).
    cf_position: str = "after_text"
    num_suffix_tokens: int = 1
    pooling: str = "suffix"
    # Not in the paper: subtract the catalogue's mean embedding before the cosine. A small LLM's last hidden
    # states share a few huge dimensions (SmolLM2-135M: item cosines 0.92-0.99), which flattens cosine / tau.
    center: bool = True
    # With `center`: users are centred by the mean raw embedding of this many training users (a fixed, evenly spread
    # sample, set with the catalogue mean at each item re-encoding) instead of by the catalogue mean. 0: by the
    # catalogue mean. With one shared centre, whatever the training learns to add to every user is added to every
    # item at the next re-encoding and subtracted again by the new centre, so stage 1 chases its own shift.
    # Measured on ML-100K with the embedded tiny LLM, 4 epochs of stage 1, lr 1e-4: test HR@10 0.0435 with 256
    # users against 0.0997 with the shared centre, so it stays off by default; not yet measured with SmolLM2.
    center_users: int = 0
    # An item's M-Former input: "embedding" = its row of the frozen SASRec's item-embedding table (the vector that
    # SASRec's user states are trained to point at); "sequence" = SASRec's output for the one-item history.
    item_id_vector: str = "embedding"
    temperature: float = 0.2  # the paper: 0.05
    lb_weight: float = 0.01
    stage1_epochs: int = 2  # the paper: 15 and 5
    stage2_epochs: int = 1
    lr: float = 1.5e-4  # the paper: 1e-4
    weight_decay: float = 0.01
    warmup_ratio: float = 0.05
    batch_size: int = 8  # the paper: 4
    grad_accumulation: int = 1
    item_batch_size: int = 32
    samples_per_user: int = 1  # training targets per user and epoch: the last training item, then random earlier ones
    patience: int = 0  # 0: run every epoch of a stage; else stop a stage after this many epochs without improvement
    valid_users: int = 2000  # 0: validate on every user; else on at most this many (a fixed, evenly spread subset)
    # Not in the paper. "none": rank by Laser's cosine (the paper). "gated": score = SASRec's dot score
    # + g * cosine / tau with a trained scalar g that starts at 0, so training starts from SASRec's exact ranking.
    fusion: str = "gated"
    # The gate's own AdamW learning rate (no weight decay); 0: laser.lr. At laser.lr (1e-4) Adam moves g by about lr
    # per step, so one epoch of ~1,000 steps cannot take it past ~0.1, while g / tau has to reach the scale of SASRec's
    # unnormalised scores before the LLM part changes a ranking.
    gate_lr: float = 0.01
    # How the gated fusion's g is set. "valid": Laser trains on its own loss (the paper's, cosine / tau) and after
    # every epoch g is the value of a fixed grid (0 included) that maximises the selection metric of the fused scores
    # on the validation users - a one-number blend weight fitted on held-out data, like the TF-IDF blend's. "train":
    # g is trained with the rest on the fused loss over the training samples; measured on Scientific, that never beat
    # SASRec on validation (SASRec fits its own training targets far better than held-out ones, so the fused loss
    # there teaches Laser and g little that carries over). "residual": Laser trains on the fused logits with g = 1,
    # held-out SASRec + cosine / tau, so that it learns what SASRec misses instead of what SASRec already ranks;
    # the SASRec term comes from a second SASRec fitted on each training sequence without its last item, whose scores
    # for that item are out-of-sample as they are at validation and test (the run's own SASRec trained on it).
    # g is then fitted on validation after every epoch, as with "valid".
    gate_fit: str = "valid"
    # Not in the paper. With gate_fit "valid" or "residual": keep g = 0 (SASRec's exact ranking) unless the chosen g's
    # gain in train.select_metric over g = 0 on the validation users has a paired 95% bootstrap interval above 0, so
    # that a run whose LLM part adds only noise on held-out data ships SASRec instead of that noise.
    gate_guard: bool = True

    def __post_init__(self) -> None:
        _require(self.prefix in PREFIX_KINDS, "laser.prefix", self.prefix, f"one of {', '.join(PREFIX_KINDS)}")
        _require(self.cf_position in CF_POSITIONS, "laser.cf_position", self.cf_position,
                 f"one of {', '.join(CF_POSITIONS)}")
        _require(self.pooling in POOLINGS, "laser.pooling", self.pooling, f"one of {', '.join(POOLINGS)}")
        _require(self.item_id_vector in ("embedding", "sequence"), "laser.item_id_vector", self.item_id_vector,
                 "'embedding' or 'sequence'")
        _require(self.prefix != "none" or self.pooling == "suffix", "laser.pooling", self.pooling,
                 "'suffix' when laser.prefix = 'none' (otherwise nothing is trained)")
        _require(self.num_suffix_tokens > 0, "laser.num_suffix_tokens", self.num_suffix_tokens, "a positive integer")
        _require(self.temperature > 0, "laser.temperature", self.temperature, "a positive number")
        _require(self.lb_weight >= 0, "laser.lb_weight", self.lb_weight, "a number >= 0")
        _require(self.stage1_epochs >= 0, "laser.stage1_epochs", self.stage1_epochs, "an integer >= 0")
        _require(self.stage2_epochs >= 0, "laser.stage2_epochs", self.stage2_epochs, "an integer >= 0")
        _require(self.stage1_epochs + self.stage2_epochs > 0, "laser.stage1_epochs", self.stage1_epochs,
                 "at least one epoch in stage 1 or stage 2")
        _require(self.lr > 0, "laser.lr", self.lr, "a positive number")
        _require(self.weight_decay >= 0, "laser.weight_decay", self.weight_decay, "a number >= 0")
        _require(0 <= self.warmup_ratio < 1, "laser.warmup_ratio", self.warmup_ratio, "a number in [0, 1)")
        for name in ("batch_size", "grad_accumulation", "item_batch_size", "samples_per_user"):
            _require(getattr(self, name) > 0, f"laser.{name}", getattr(self, name), "a positive integer")
        _require(self.gate_lr >= 0, "laser.gate_lr", self.gate_lr, "a number >= 0 (0 = laser.lr)")
        _require(self.patience >= 0, "laser.patience", self.patience, "an integer >= 0")
        _require(self.center_users >= 0, "laser.center_users", self.center_users, "an integer >= 0")
        _require(self.center or not self.center_users, "laser.center_users", self.center_users,
                 "0 unless laser.center = true")
        _require(self.valid_users >= 0, "laser.valid_users", self.valid_users, "an integer >= 0 (0: all users)")
        _require(self.fusion in FUSIONS, "laser.fusion", self.fusion, f"one of {', '.join(FUSIONS)}")
        _require(self.gate_fit in GATE_FITS, "laser.gate_fit", self.gate_fit, f"one of {', '.join(GATE_FITS)}")


@dataclass
class Config:
    """The whole configuration of a run."""

    sasrec: SASRecConfig = field(default_factory=SASRecConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    text: TextConfig = field(default_factory=TextConfig)
    mformer: MFormerConfig = field(default_factory=MFormerConfig)
    laser: LaserConfig = field(default_factory=LaserConfig)

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
    for t in allowed:
        origin = typing.get_origin(t) or t
        if not isinstance(value, origin) or (isinstance(value, bool) and origin is not bool):
            continue
        if origin is list and not all(isinstance(v, typing.get_args(t)[0]) for v in value):
            continue
        return value
    names = " or ".join(str(t) if typing.get_origin(t) else getattr(t, "__name__", str(t)) for t in allowed)
    raise ConfigError(f"{option} = {value!r} is invalid: expected {names}")


def load_config(path: Path | None = None, **overrides: dict) -> Config:
    """Read a TOML config (all keys optional), then apply `overrides` such as train={"epochs": 3}."""
    data: dict = _read_toml(Path(path), ()) if path is not None else {}
    for section, values in overrides.items():
        data.setdefault(section, {}).update({k: v for k, v in values.items() if v is not None})
    return from_dict(Config, data, "")


def _read_toml(path: Path, extended_by: tuple[Path, ...]) -> dict:
    """The tables of `path` laid over those of the file it `extends`, key by key. `extended_by`: the chain so far."""
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from e
    if "extends" not in data:
        return data
    name = data.pop("extends")
    if not isinstance(name, str):
        raise ConfigError(f"{path}: extends = {name!r} is invalid: expected the path of a base config (a string)")
    base = path.parent / name
    chain = (*extended_by, path.resolve())
    if base.resolve() in chain:
        names = " -> ".join(str(p) for p in (*chain, base.resolve()))
        raise ConfigError(f"{path}: extends = {name!r} makes a cycle ({names})")
    if not base.is_file():
        raise ConfigError(f"{path}: extends = {name!r}, but {base} is not a file")
    return _overlay(_read_toml(base, chain), data)


def _overlay(base: dict, over: dict) -> dict:
    """`base` with every key of `over` replacing it; tables present in both are merged the same way."""
    merged = dict(base)
    for key, value in over.items():
        both_tables = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = _overlay(merged[key], value) if both_tables else value
    return merged
