"""The three exportable parts of a trained run, with the Optimum `OnnxConfig`s that describe them.

Optimum's exporter (`optimum.exporters.onnx.export`) traces a module that carries a `PretrainedConfig`
as `.config` and takes its example inputs from the `OnnxConfig`'s dummy-input generators. Our parts are
custom modules, so each gets a small wrapper, a `PartConfig` with the sizes the generators need, and an
`OnnxConfig` that names its inputs and outputs with their dynamic axes:

- `sasrec.onnx`: item_ids (B, S) int64, 0 = left padding -> id_vectors (B, S, d_id);
- `mformer.onnx`: id_vectors (B, N, d_id) + id_mask (B, N) int64 -> prefix (B, L, d_llm) + expert (B,) int64;
- `user_encoder.onnx`: [prefix (B, L, d_llm)] + input_ids (B, T) + attention_mask (B, T) -> embedding (B, d_llm),
  the token lookup, the frozen LLM, the suffix, centering and L2 normalisation inside the graph.

`export_part` exports one of them with Optimum and validates the graph (exporters/validate.py).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from pathlib import Path

import torch
from optimum.exporters.onnx import OnnxConfig, export
from optimum.utils import DummyInputGenerator, NormalizedConfig
from torch import nn
from transformers import PretrainedConfig

from laser_batch.exporters.validate import validate_part

logger = logging.getLogger(__name__)

OPSET = 18
TRACE_SHAPES = {"batch_size": 2, "sequence_length": 16}  # the export's example shapes; validation uses others


class PartConfig(PretrainedConfig):
    """Sizes of one exported part (what the dummy-input generators and the manifest need)."""

    model_type = "laser_batch_part"

    def __init__(self, part: str = "", num_items: int = 1, id_size: int = 1, llm_size: int = 1,
                 num_queries: int = 1, vocab_size: int = 2, pad_id: int = 0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.part, self.num_items, self.id_size, self.llm_size = part, num_items, id_size, llm_size
        self.num_queries, self.vocab_size, self.pad_id = num_queries, vocab_size, pad_id


class LaserDummyInputs(DummyInputGenerator):
    """Example inputs for every part: left-padded ids and masks with at least one real position per row."""

    SUPPORTED_INPUT_NAMES = ("item_ids", "id_vectors", "id_mask", "prefix", "input_ids", "attention_mask")

    def __init__(self, task: str, normalized_config: NormalizedConfig, batch_size: int = 2,
                 sequence_length: int = 16, **kwargs) -> None:
        self.config = normalized_config.config
        self.batch_size, self.sequence_length = batch_size, sequence_length
        self.generator = torch.Generator().manual_seed(batch_size * 1000 + sequence_length)

    def _mask(self) -> torch.Tensor:
        """(B, S) int64 left-padded mask: row 0 full, the others with random amounts of padding."""
        b, s = self.batch_size, self.sequence_length
        lengths = torch.randint(1, s + 1, (b,), generator=self.generator)
        lengths[0] = s
        return (torch.arange(s)[None, :] >= (s - lengths)[:, None]).long()

    def generate(self, input_name: str, framework: str = "pt", int_dtype: str = "int64", float_dtype: str = "fp32"):
        b, s, c, g = self.batch_size, self.sequence_length, self.config, self.generator
        if input_name == "item_ids":
            value = torch.randint(1, c.num_items + 1, (b, s), generator=g) * self._mask()
        elif input_name == "id_vectors":
            value = torch.randn(b, s, c.id_size, generator=g)
        elif input_name == "id_mask":
            value = self._mask()
        elif input_name == "prefix":
            value = torch.randn(b, c.num_queries, c.llm_size, generator=g) * 0.02
        elif input_name == "input_ids":
            value = torch.randint(0, c.vocab_size, (b, s), generator=g)
        elif input_name == "attention_mask":
            value = self._mask()
        else:
            raise ValueError(f"no dummy input for {input_name!r}")
        if float_dtype == "fp16" and value.is_floating_point():
            value = value.half()
        return value if framework == "pt" else value.numpy()


class _PartOnnxConfig(OnnxConfig):
    NORMALIZED_CONFIG_CLASS = NormalizedConfig
    DUMMY_INPUT_GENERATOR_CLASSES = (LaserDummyInputs,)
    DEFAULT_ONNX_OPSET = OPSET
    INPUTS: dict[str, dict[int, str]] = {}
    OUTPUTS: dict[str, dict[int, str]] = {}

    def __init__(self, config: PartConfig, inputs: list[str] | None = None) -> None:
        super().__init__(config, task="feature-extraction")
        self._inputs = [name for name in self.INPUTS if inputs is None or name in inputs]

    @property
    def inputs(self) -> dict[str, dict[int, str]]:
        return OrderedDict((name, dict(self.INPUTS[name])) for name in self._inputs)

    @property
    def outputs(self) -> dict[str, dict[int, str]]:
        return OrderedDict((name, dict(axes)) for name, axes in self.OUTPUTS.items())


class SASRecOnnxConfig(_PartOnnxConfig):
    INPUTS = {"item_ids": {0: "batch_size", 1: "sequence_length"}}
    OUTPUTS = {"id_vectors": {0: "batch_size", 1: "sequence_length"}}


class MFormerOnnxConfig(_PartOnnxConfig):
    INPUTS = {"id_vectors": {0: "batch_size", 1: "sequence_length"}, "id_mask": {0: "batch_size", 1: "sequence_length"}}
    OUTPUTS = {"prefix": {0: "batch_size"}, "expert": {0: "batch_size"}}


class UserEncoderOnnxConfig(_PartOnnxConfig):
    INPUTS = {"prefix": {0: "batch_size"}, "input_ids": {0: "batch_size", 1: "sequence_length"},
              "attention_mask": {0: "batch_size", 1: "sequence_length"}}
    OUTPUTS = {"embedding": {0: "batch_size"}}


class SASRecPart(nn.Module):
    def __init__(self, sasrec: nn.Module, config: PartConfig) -> None:
        super().__init__()
        self.sasrec, self.config = sasrec.eval(), config

    def forward(self, item_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"id_vectors": self.sasrec(item_ids)}


class MFormerPart(nn.Module):
    def __init__(self, mformer: nn.Module, config: PartConfig) -> None:
        super().__init__()
        self.mformer, self.config = mformer.eval(), config

    def forward(self, id_vectors: torch.Tensor, id_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.mformer(id_vectors, id_mask != 0)
        return {"prefix": out.prefix, "expert": out.experts[:, 0]}


class UserEncoderPart(nn.Module):
    """LLM + suffix. With a free (learned, input-independent) prefix the prefix is part of the graph."""

    def __init__(self, laser: nn.Module, config: PartConfig) -> None:
        super().__init__()
        self.laser, self.config = laser.eval(), config
        # Registered here (Laser itself keeps the frozen LLM outside its module tree) so that the graph's weights
        # are named initializers ("llm.layers.0.mlp.down_proj...") that quantisers can find and select.
        self.llm = laser.llm.model
        self.takes_prefix = laser.config.prefix == "mformer"

    def forward(self, prefix: torch.Tensor | None = None, input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if not self.takes_prefix:
            prefix, _ = self.laser.make_prefix(input_ids, input_ids.shape[0])
        return {"embedding": self.laser.encode(prefix, input_ids, attention_mask)}


def export_part(name: str, part: nn.Module, config_class: type[OnnxConfig], directory: Path, *,
                inputs: list[str] | None = None) -> dict:
    """Write DIRECTORY/NAME.onnx from `part` with Optimum and validate it; returns its manifest record.

    Args:
        name: the graph's name (its file is NAME.onnx).
        part: one of the wrappers above, carrying its `PartConfig` as `.config`.
        config_class: the part's `OnnxConfig`.
        directory: where the graph is written.
        inputs: the inputs to keep (the user encoder without a prefix input), or None for all of them.

    Raises:
        ArtifactError: the graph does not match torch (exporters/validate.py).
    """
    onnx_config = config_class(part.config, inputs=inputs)
    path = directory / f"{name}.onnx"
    started = time.perf_counter()
    export(part, onnx_config, path, opset=OPSET, input_shapes=dict(TRACE_SHAPES))
    seconds = time.perf_counter() - started
    parity = validate_part(name, part, onnx_config, path)
    logger.info("%s.onnx: exported in %.1f s; %s", name, seconds, parity)
    return {"file": path.name, "inputs": onnx_config.inputs, "outputs": onnx_config.outputs,
            "trace_shapes": dict(TRACE_SHAPES), "export_seconds": round(seconds, 2), "parity": parity}
