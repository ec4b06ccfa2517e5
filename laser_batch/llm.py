"""The frozen LLM of Laser: a Hugging Face decoder driven with `inputs_embeds`, never trained, never saved by us.

Sources (`LLMConfig.source`):

- "tiny": the embedded tiny LLM (Llama architecture, random weights from a fixed seed, the project's own
  byte-level BPE tokenizer in `laser_batch/assets/tiny_tokenizer.json`); needs no network;
- a path ending in ".gguf": a GGUF file (needs the `gguf` and `accelerate` packages), dequantised;
- an existing directory: `save_pretrained` output (config, weights, tokenizer);
- anything else: a Hugging Face hub id (`HF_HUB_OFFLINE=1` makes it use the local cache only).

Only the base decoder is kept (no LM head): Laser reads the last-layer hidden states. `LLMConfig.num_layers = N`
keeps only the first N decoder blocks and the final norm: the blocks after N are deleted after loading (their memory
is freed) and the model's config says N layers, so the fingerprint, the run record and the exported graph all see
the truncated model. The run records `describe()`: where the LLM came from, how many layers it keeps of how many,
and a fingerprint of its config and weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer
from torch import nn
from transformers import AutoModel, AutoTokenizer, PreTrainedTokenizerFast
from transformers.utils import is_offline_mode

from laser_batch.config import LLMConfig
from laser_batch.contracts import first_line
from laser_batch.errors import ConfigError, InputError

logger = logging.getLogger(__name__)

TINY_SOURCE = "tiny"
TINY_ARCHITECTURES = ("llama", "qwen2", "gpt2")
TINY_TOKENIZER = "assets/tiny_tokenizer.json"
TINY_PAD, TINY_EOS = "<|pad|>", "<|eos|>"
TINY_MAX_POSITIONS = 1024
# Left-padded query rows are fully masked; SDPA on torch 2.13 keeps them finite (no NaN leaks into later layers).
# "eager" gave identical results; the padding-invariance tests cover llama, qwen2 and gpt2.
ATTN_IMPLEMENTATION = "sdpa"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX); elsewhere torch emulates it, several times
    slower than fp32 (measured on an AVX2-only AMD EPYC: a SmolLM2-135M forward over 32 x 96 tokens took 12 s in
    float32 and over 60 s in bfloat16)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_dtype(name: str) -> torch.dtype:
    """`llm.dtype` as a torch dtype: "auto" is bfloat16 where the CPU has native bf16, float32 elsewhere."""
    if name == "auto":
        dtype = torch.bfloat16 if native_bf16() else torch.float32
        logger.info("llm.dtype auto: %s (native bf16 on this CPU: %s)", str(dtype).removeprefix("torch."),
                    dtype == torch.bfloat16)
        return dtype
    if name == "bfloat16" and not native_bf16():
        logger.warning("llm.dtype bfloat16: this CPU has no native bf16 (AVX512-BF16 / AMX), torch emulates it "
                       "several times slower than float32; llm.dtype = 'auto' picks float32 here")
    return DTYPES[name]
# Config keys that change with how a model was saved or loaded, not with what it computes.
_VOLATILE_CONFIG_KEYS = ("_name_or_path", "transformers_version", "architectures", "dtype", "torch_dtype",
                         "_attn_implementation_autoset", "_commit_hash")


@dataclass
class FrozenLLM:
    """A frozen decoder (eval mode, no gradients to its weights) and its tokenizer (always with a pad token).

    Deliberately not an `nn.Module`: held by a trainable model, it stays out of its `state_dict`, optimizer and
    `.train()` calls. Gradients still flow through it to `inputs_embeds` (the prefix and suffix).
    """

    model: transformers.PreTrainedModel  # the base decoder, no LM head
    tokenizer: transformers.PreTrainedTokenizerBase
    source: str
    fingerprint: str  # sha256 of the config and every weight tensor (of the kept layers only)
    hidden_size: int
    source_layers: int  # the decoder blocks of the LLM as loaded; `model` may keep fewer (`llm.num_layers`)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The LLM's own token embeddings: (B, T) ids -> (B, T, D)."""
        return self.model.get_input_embeddings()(input_ids)

    def forward(
        self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        """Last-layer hidden states (after the final norm): (B, T, D).

        Args:
            inputs_embeds: (B, T, D) input vectors, left-padded.
            attention_mask: (B, T) 1 for real positions, 0 for padding.
            position_ids: (B, T) positions of the real tokens, counted from the first non-pad one
                (e.g. `(mask.cumsum(-1) - 1).clamp(min=0)`), so that left padding changes nothing.
        """
        out = self.model(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        )
        return out.last_hidden_state  # (B, T, D)

    __call__ = forward

    def describe(self) -> dict:
        """What the run records about its LLM."""
        config = self.model.config
        return {
            "source": self.source,
            "fingerprint": self.fingerprint,
            "architecture": config.model_type,
            "hidden_size": self.hidden_size,
            "num_layers": int(config.num_hidden_layers),  # the blocks kept, what the run computed with
            "source_layers": self.source_layers,
            "dtype": str(next(self.model.parameters()).dtype).removeprefix("torch."),
            "vocab_size": self.model.get_input_embeddings().num_embeddings,
        }


def load_llm(config: LLMConfig) -> FrozenLLM:
    """Load the frozen LLM named by `config.source` in `config.dtype`, keeping its first `config.num_layers` blocks.

    A source that cannot be loaded is an `InputError`; more layers asked for than the LLM has is a `ConfigError`.
    """
    source = config.source
    if source == TINY_SOURCE:
        return build_tiny_llm(dtype=config.dtype, keep_layers=config.num_layers)
    dtype = resolve_dtype(config.dtype)
    path = Path(source).expanduser()
    hub = False
    if source.lower().endswith(".gguf"):
        if not path.is_file():
            raise InputError(f"LLM source {source}: GGUF file not found")
        where, kwargs = str(path.parent), {"gguf_file": path.name}
    elif path.is_dir():
        where, kwargs = str(path), {}
    elif _looks_like_path(source):
        raise InputError(f"LLM source {source}: directory not found")
    else:
        where, kwargs, hub = source, {}, True
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
        model = AutoModel.from_pretrained(where, dtype=dtype, attn_implementation=ATTN_IMPLEMENTATION, **kwargs)
    except Exception as e:  # transformers raises OSError, ValueError, KeyError, ... depending on what is wrong
        reason = _shorten(first_line(e))
        if hub and _offline():
            raise InputError(f"LLM source {source}: not a local directory, and the Hugging Face hub is offline "
                             f"(HF_HUB_OFFLINE=1) with no cached copy ({reason})") from e
        kind = "hub model" if hub else "model"
        raise InputError(f"LLM source {source}: could not load the {kind} ({reason})") from e
    return _freeze(model, tokenizer, source=source, dtype=dtype, num_layers=config.num_layers)


def build_tiny_llm(
    architecture: str = "llama",
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    seed: int = 0,
    tokenizer: transformers.PreTrainedTokenizerBase | None = None,
    dtype: str = "float32",
    keep_layers: int = 0,
) -> FrozenLLM:
    """A small random decoder built from a transformers config: deterministic for a seed, global RNG untouched.

    `architecture` is "llama" (the embedded demo's), "qwen2" or "gpt2"; the vocabulary is the tokenizer's
    (default: the embedded tiny tokenizer). `keep_layers` truncates it as `llm.num_layers` does (0: keep all).
    """
    if architecture not in TINY_ARCHITECTURES:
        raise InputError(f"tiny LLM architecture {architecture!r}: expected one of {', '.join(TINY_ARCHITECTURES)}")
    if tokenizer is None:
        tokenizer = tiny_tokenizer()
    common = {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
              "eos_token_id": tokenizer.eos_token_id, "bos_token_id": tokenizer.bos_token_id}
    if architecture == "gpt2":
        config = transformers.GPT2Config(n_embd=hidden_size, n_layer=num_layers, n_head=num_heads,
                                         n_positions=TINY_MAX_POSITIONS, **common)
    else:
        config_class = transformers.LlamaConfig if architecture == "llama" else transformers.Qwen2Config
        config = config_class(hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                              num_hidden_layers=num_layers, num_attention_heads=num_heads,
                              num_key_value_heads=max(1, num_heads // 2), max_position_embeddings=TINY_MAX_POSITIONS,
                              tie_word_embeddings=False, **common)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModel.from_config(config, attn_implementation=ATTN_IMPLEMENTATION)
    defaults = architecture == "llama" and (hidden_size, num_layers, num_heads, seed) == (64, 2, 4, 0)
    source = TINY_SOURCE if defaults else (f"tiny(architecture={architecture}, hidden_size={hidden_size}, "
                                           f"num_layers={num_layers}, num_heads={num_heads}, seed={seed})")
    return _freeze(model, tokenizer, source=source, dtype=resolve_dtype(dtype), num_layers=keep_layers)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """The embedded byte-level BPE tokenizer (built by examples/build_tiny_tokenizer.py); no BOS is added."""
    text = resources.files("laser_batch").joinpath(TINY_TOKENIZER).read_text(encoding="utf-8")
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(text),
        pad_token=TINY_PAD, eos_token=TINY_EOS, model_max_length=TINY_MAX_POSITIONS,
        clean_up_tokenization_spaces=False,
    )


def fingerprint(model: transformers.PreTrainedModel) -> str:
    """sha256 hex of the model config (sorted keys, minus save/load bookkeeping) and every weight tensor.

    Tensors are hashed as loaded (sorted names, dtype, shape, raw bytes), so the same LLM in bfloat16 has
    another fingerprint than in float32: the fingerprint names the weights that actually computed.
    """
    digest = hashlib.sha256()
    config = {k: v for k, v in model.config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _freeze(
    model: transformers.PreTrainedModel,
    tokenizer: transformers.PreTrainedTokenizerBase,
    *,
    source: str,
    dtype: torch.dtype,
    num_layers: int = 0,
) -> FrozenLLM:
    source_layers = int(model.config.num_hidden_layers)
    keep_first_layers(model, num_layers, source=source)  # before the dtype cast and the fingerprint: less work
    _ensure_pad_token(model, tokenizer)
    tokenizer.padding_side = "left"  # Laser reads the last position; its callers pad on the left
    model = model.to(dtype).eval().requires_grad_(False)
    return FrozenLLM(model=model, tokenizer=tokenizer, source=source, fingerprint=fingerprint(model),
                     hidden_size=int(model.config.hidden_size), source_layers=source_layers)


def keep_first_layers(model: transformers.PreTrainedModel, num_layers: int, *, source: str) -> None:
    """Keep the first `num_layers` decoder blocks of a base decoder in place (0, or at least all: unchanged).

    `num_layers` is an upper bound: an LLM with that many blocks or fewer keeps them all (the default, 8, was
    measured for SmolLM2-135M's 30 blocks and leaves a smaller LLM, such as the embedded tiny one, whole).

    The final norm stays: it is applied after the block list (Llama/Qwen2 `norm`, GPT-2 `ln_f`), so the output is
    the final norm of block N's output. The dropped blocks are deleted from the module list; nothing else holds
    them, so their weights are freed. The config is updated (`num_hidden_layers`, which is GPT-2's `n_layer`, and
    per-layer lists such as Qwen2's `layer_types`): caches, masks, the fingerprint and the export see N layers.
    """
    total = int(model.config.num_hidden_layers)
    if num_layers == 0 or num_layers >= total:
        if num_layers > total:
            logger.info("llm.num_layers = %d: the LLM %s has %d layers, all kept", num_layers, source, total)
        return
    blocks = _decoder_blocks(model, num_layers, source)
    del blocks[num_layers:]
    model.config.num_hidden_layers = num_layers
    layer_types = getattr(model.config, "layer_types", None)
    if isinstance(layer_types, list):
        model.config.layer_types = layer_types[:num_layers]


def _decoder_blocks(model: transformers.PreTrainedModel, num_layers: int, source: str) -> nn.ModuleList:
    """The base decoder's list of blocks: `layers` (Llama, Qwen2, Mistral, ...) or `h` (GPT-2)."""
    total = int(model.config.num_hidden_layers)
    for name in ("layers", "h"):
        blocks = getattr(model, name, None)
        if isinstance(blocks, nn.ModuleList) and len(blocks) == total:
            return blocks
    raise ConfigError(f"llm.num_layers = {num_layers}: cannot truncate the LLM {source} "
                      f"({model.config.model_type}: no list of {total} decoder blocks named `layers` or `h`)")


def _ensure_pad_token(model: transformers.PreTrainedModel, tokenizer: transformers.PreTrainedTokenizerBase) -> None:
    """Padding needs a pad id: the EOS token, else a new "<|pad|>" token (zero embedding; it is always masked)."""
    if tokenizer.pad_token is not None:
        return
    if tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
        return
    tokenizer.add_special_tokens({"pad_token": TINY_PAD})
    table = model.get_input_embeddings()
    if tokenizer.pad_token_id >= table.num_embeddings:
        with torch.random.fork_rng(devices=[]):
            model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():
            model.get_input_embeddings().weight[table.num_embeddings:] = 0


def _looks_like_path(source: str) -> bool:
    """Hub ids are "name" or "owner/name"; anything else path-like is a local path the user meant."""
    return (os.path.isabs(source) or source.startswith((".", "~")) or "\\" in source or source.count("/") > 1
            or source.endswith("/"))


def _shorten(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _offline() -> bool:
    return bool(is_offline_mode())  # what transformers decided at import (HF_HUB_OFFLINE)
