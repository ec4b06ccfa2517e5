"""SmoothQuant rescaling of the frozen LLM (exporters/smooth.py): the same function, flatter activations."""

import pytest
import torch

from laser_batch.exporters.smooth import activation_ranges, smooth, supports_smoothing
from laser_batch.llm import build_tiny_llm

OUTLIERS = [3, 17, 40]  # channels given a huge range, as small LLMs' hidden states have


def _model(architecture):
    model = build_tiny_llm(architecture, num_layers=2, num_heads=4).model  # 2 key/value heads: grouped attention
    with torch.no_grad():
        for layer in model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[OUTLIERS] *= 60.0
            layer.mlp.up_proj.weight[OUTLIERS] *= 30.0  # outliers into down_proj's input too
    return model


def _run(model, ids):
    return lambda: model(input_ids=ids, attention_mask=torch.ones_like(ids))


@pytest.mark.parametrize("architecture", ["llama", "qwen2"])
def test_smoothing_keeps_the_function_and_flattens_every_linear_input(architecture):
    model = _model(architecture)
    ids = torch.randint(3, 200, (4, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
    ranges = activation_ranges(model, _run(model, ids))
    assert set(ranges) == {f"{i}.{n}" for i in range(2) for n in ("self_attn.q_proj", "self_attn.o_proj",
                                                                   "mlp.gate_proj", "mlp.down_proj")}
    smooth(model, ranges)
    with torch.no_grad():
        after = model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4 * before.abs().max().item())
    flat = activation_ranges(model, _run(model, ids))
    for key in ("0.self_attn.q_proj", "1.mlp.gate_proj", "1.mlp.down_proj"):
        spread = lambda r: (r.max() / r.median()).item()  # noqa: E731 (what one per-tensor int8 scale must cover)
        assert spread(flat[key]) < spread(ranges[key]) / 4, key


def test_only_llama_family_models_are_smoothed():
    assert supports_smoothing(build_tiny_llm("llama").model)
    assert not supports_smoothing(build_tiny_llm("gpt2").model)
    with pytest.raises(ValueError, match="needs Llama-family decoder layers"):
        smooth(build_tiny_llm("gpt2").model, {})
