"""The frozen LLM: tiny decoders of three shapes, padding invariance, fingerprints, loading and its errors."""

from importlib import resources

import pytest
import torch
import transformers
from tokenizers import Tokenizer
from transformers.utils import is_offline_mode

import laser_batch.llm as llm_module
from laser_batch.config import LLMConfig
from laser_batch.errors import InputError
from laser_batch.llm import TINY_ARCHITECTURES, build_tiny_llm, load_llm, tiny_tokenizer

TEXTS = [">>1. The Silent Nebula (Paperback) (category: Sci-Fi Books, brand: Orbit Line)", "Kenyan Espresso Blend"]


@pytest.fixture(scope="module", params=TINY_ARCHITECTURES)
def tiny(request):
    return build_tiny_llm(request.param)


def _left_pad(llm, texts, extra=0):
    """Token embeddings, mask and position ids of `texts`, left-padded with `extra` more random pad vectors."""
    ids = [llm.tokenizer(t, add_special_tokens=False).input_ids for t in texts]
    width = max(map(len, ids)) + extra
    g = torch.Generator().manual_seed(extra)
    embeds = torch.randn(len(ids), width, llm.hidden_size, generator=g)  # arbitrary vectors under the padding
    mask = torch.zeros(len(ids), width, dtype=torch.long)
    for row, seq in enumerate(ids):
        embeds[row, width - len(seq):] = llm.embed(torch.tensor(seq))
        mask[row, width - len(seq):] = 1
    return embeds, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def test_shapes_and_description(tiny):
    ids = torch.randint(0, len(tiny.tokenizer), (2, 5))
    assert tiny.embed(ids).shape == (2, 5, 64)
    out = tiny(tiny.embed(ids), torch.ones(2, 5, dtype=torch.long), torch.arange(5).expand(2, 5))
    assert out.shape == (2, 5, 64) and torch.isfinite(out).all()
    info = tiny.describe()
    assert info["architecture"] == tiny.model.config.model_type
    assert (info["hidden_size"], info["num_layers"], info["source_layers"], info["dtype"]) == (64, 2, 2, "float32")
    assert info["vocab_size"] == len(tiny.tokenizer) == 1800
    assert info["fingerprint"] == tiny.fingerprint and len(tiny.fingerprint) == 64
    assert not hasattr(tiny.model, "lm_head")


def test_frozen_but_differentiable_to_inputs(tiny):
    assert not tiny.model.training
    assert all(not p.requires_grad for p in tiny.model.parameters())
    embeds = torch.randn(1, 4, 64, requires_grad=True)
    last = tiny(embeds, torch.ones(1, 4, dtype=torch.long), torch.arange(4)[None])[:, -1]
    (last * torch.linspace(-1, 1, 64)).sum().backward()  # not a plain sum: LayerNorm outputs sum to a constant
    assert embeds.grad is not None and embeds.grad[0, 0].abs().sum() > 0  # the last position sees the first
    assert all(p.grad is None for p in tiny.model.parameters())


def test_left_padding_does_not_change_the_last_hidden_state(tiny):
    with torch.no_grad():
        embeds, mask, positions = _left_pad(tiny, TEXTS)
        padded = _left_pad(tiny, TEXTS, extra=6)
        reference = tiny(embeds, mask, positions)[:, -1]
        torch.testing.assert_close(tiny(*padded)[:, -1], reference, atol=1e-5, rtol=0)
        alone = tiny(*_left_pad(tiny, TEXTS[1:]))[:, -1]  # and batch neighbours change nothing either
        torch.testing.assert_close(alone[0], reference[1], atol=1e-5, rtol=0)
        unmasked = tiny(padded[0], torch.ones_like(padded[1]), padded[2])[:, -1]
        assert (unmasked - reference).abs().max() > 1e-2  # the check above can fail: the mask is what protects


def test_position_ids_reach_gpt2():
    llm = build_tiny_llm("gpt2")
    embeds, mask, positions = _left_pad(llm, TEXTS[:1])
    with torch.no_grad():
        shifted = llm(embeds, mask, positions + 3)[:, -1] - llm(embeds, mask, positions)[:, -1]
    assert shifted.abs().max() > 1e-2  # learned absolute positions: the explicit ids are used


def test_fingerprint_is_deterministic_and_rng_is_untouched():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    first, again, other = build_tiny_llm(seed=0), build_tiny_llm(seed=0), build_tiny_llm(seed=1)
    assert torch.equal(torch.rand(3), expected)
    assert first.fingerprint == again.fingerprint != other.fingerprint
    assert first.fingerprint == load_llm(LLMConfig("tiny")).fingerprint
    assert first.source == "tiny" and other.source.startswith("tiny(")


@pytest.mark.parametrize("architecture", TINY_ARCHITECTURES)
def test_save_pretrained_round_trip(tmp_path, architecture):
    llm = build_tiny_llm(architecture, seed=3)
    llm.model.save_pretrained(tmp_path)
    llm.tokenizer.save_pretrained(tmp_path)
    back = load_llm(LLMConfig(source=str(tmp_path)))
    assert back.fingerprint == llm.fingerprint
    assert back.describe() == {**llm.describe(), "source": str(tmp_path)}
    assert back.tokenizer(TEXTS).input_ids == llm.tokenizer(TEXTS).input_ids
    assert back.tokenizer.pad_token_id == llm.tokenizer.pad_token_id
    with torch.no_grad():
        torch.testing.assert_close(back(*_left_pad(back, TEXTS)), llm(*_left_pad(llm, TEXTS)), atol=0, rtol=0)


def test_bfloat16_option():
    llm = load_llm(LLMConfig("tiny", dtype="bfloat16"))
    assert {p.dtype for p in llm.model.parameters()} == {torch.bfloat16}
    assert llm.describe()["dtype"] == "bfloat16"
    assert llm.fingerprint != build_tiny_llm().fingerprint
    embeds, mask, positions = _left_pad(llm, TEXTS)
    assert llm(embeds.bfloat16(), mask, positions).dtype == torch.bfloat16


@pytest.mark.parametrize("native", [True, False])
def test_auto_dtype_is_bfloat16_only_where_the_cpu_has_native_bf16(monkeypatch, native):
    monkeypatch.setattr(llm_module, "native_bf16", lambda: native)
    llm = load_llm(LLMConfig("tiny", dtype="auto"))
    assert llm.describe()["dtype"] == ("bfloat16" if native else "float32")


def _bare_tokenizer(**special):
    """The tiny tokenizer's vocabulary with only the given special tokens declared."""
    text = resources.files("laser_batch").joinpath("assets/tiny_tokenizer.json").read_text()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(text), **special)


def test_missing_pad_token_becomes_eos():
    llm = build_tiny_llm(tokenizer=_bare_tokenizer(eos_token="<|eos|>"))
    assert llm.tokenizer.pad_token == llm.tokenizer.eos_token == "<|eos|>"


def test_missing_pad_and_eos_gets_a_pad_token_inside_the_table(tmp_path):
    llm = build_tiny_llm(tokenizer=_bare_tokenizer())
    assert llm.tokenizer.pad_token is not None
    assert llm.tokenizer.pad_token_id < llm.model.get_input_embeddings().num_embeddings
    assert llm.tokenizer.padding_side == "left"


def test_loaded_llm_without_pad_token_gets_eos(tmp_path):
    llm = build_tiny_llm()
    llm.model.save_pretrained(tmp_path)
    _bare_tokenizer(eos_token="<|eos|>").save_pretrained(tmp_path)
    assert load_llm(LLMConfig(str(tmp_path))).tokenizer.pad_token == "<|eos|>"


def test_tiny_tokenizer_encodes_any_text():
    tokenizer = tiny_tokenizer()
    assert len(tokenizer) == 1800 and tokenizer.pad_token_id == 0 and tokenizer.eos_token == "<|eos|>"
    for text in ["Café Crème — 10% off", "Ünïcødé ✓ 日本語 🎲\ttabs\nnewlines", "  leading spaces", TEXTS[0]]:
        ids = tokenizer(text).input_ids
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids) == text
    assert tokenizer(TEXTS[0]).input_ids == tokenizer(TEXTS[0], add_special_tokens=False).input_ids  # adds no BOS
    assert len(tokenizer(TEXTS[0]).input_ids) < 30  # trained on the demo's item lines: whole words, not bytes


def test_shipped_tokenizer_is_what_the_build_script_makes(tmp_path):
    from laser_batch.examples import build_tiny_tokenizer

    build_tiny_tokenizer.main([str(tmp_path / "tok.json")])
    shipped = resources.files("laser_batch").joinpath("assets/tiny_tokenizer.json").read_bytes()
    assert (tmp_path / "tok.json").read_bytes() == shipped
    assert len(shipped) < 300_000


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("{tmp}/no-such-dir", "directory not found"),
        ("./no-such-relative-dir", "directory not found"),
        ("{tmp}/missing.gguf", "GGUF file not found"),
        ("no-such-org/no-such-model-xyz", "hub is offline"),
        ("{tmp}", "could not load the model"),  # an existing directory with nothing loadable in it
    ],
)
def test_bad_sources_name_the_source(tmp_path, source, message):
    assert is_offline_mode(), "tests must run with HF_HUB_OFFLINE=1 (see conftest.py)"
    source = source.format(tmp=tmp_path)
    with pytest.raises(InputError, match=message) as caught:
        load_llm(LLMConfig(source=source))
    text = str(caught.value)
    assert source in text and "\n" not in text and len(text) < 400


def test_unknown_tiny_architecture():
    with pytest.raises(InputError, match="mamba"):
        build_tiny_llm("mamba")
