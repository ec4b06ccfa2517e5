"""`llm.num_layers`: a frozen LLM cut after its first N blocks is exact, frozen, freed, fingerprinted and exported."""

import gc
import json
import weakref

import onnx
import pytest
import test_laser
import torch
from test_laser import SMALL, small_config
from test_llm import TEXTS, _left_pad

from laser_batch.checkpoint import load_laser
from laser_batch.config import LLMConfig, load_config
from laser_batch.errors import CheckpointError, ConfigError
from laser_batch.llm import TINY_ARCHITECTURES, build_tiny_llm, keep_first_layers, load_llm
from laser_batch.train_laser import build_laser, train_laser

FULL = 4  # layers of the test's "full" LLM
sasrec_run = test_laser.sasrec_run  # a trained SASRec on a small example data set (module-scoped fixture)


def _final_norm(model):
    return model.norm if hasattr(model, "norm") else model.ln_f  # Llama/Qwen2, GPT-2


@pytest.mark.parametrize("architecture", TINY_ARCHITECTURES)
@pytest.mark.parametrize("kept", [1, 2, 3])
def test_truncation_is_exact_and_frozen(architecture, kept):
    full = build_tiny_llm(architecture, num_layers=FULL, seed=2)
    cut = build_tiny_llm(architecture, num_layers=FULL, seed=2, keep_layers=kept)
    inputs = _left_pad(full, TEXTS, extra=3)
    real = inputs[1].bool()
    with torch.no_grad():
        states = full.model(inputs_embeds=inputs[0], attention_mask=inputs[1], position_ids=inputs[2],
                            output_hidden_states=True, use_cache=False).hidden_states
        # hidden_states[0] is the embeddings, [kept] the output of block `kept` (before the final norm)
        expected = _final_norm(full.model)(states[kept])
        got = cut(*inputs)
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=0)
    assert (got[real] - full(*inputs)[real]).abs().max() > 1e-3  # the check can fail: the cut model differs

    assert not cut.model.training and all(not p.requires_grad for p in cut.model.parameters())
    assert cut.model.config.num_hidden_layers == kept
    assert len(getattr(cut.model, "layers", None) or cut.model.h) == kept
    assert getattr(cut.model.config, "layer_types", [None] * kept)[kept:] == []  # Qwen2's per-layer list follows
    assert {k: cut.describe()[k] for k in ("num_layers", "source_layers")} == {"num_layers": kept,
                                                                              "source_layers": FULL}
    assert cut.fingerprint != full.fingerprint


def test_dropped_blocks_are_freed():
    llm = build_tiny_llm("llama", num_layers=FULL)
    dropped = [weakref.ref(block) for block in llm.model.layers[2:]]
    kept = [weakref.ref(block) for block in llm.model.layers[:2]]
    keep_first_layers(llm.model, 2, source="tiny")
    gc.collect()
    assert [ref() is None for ref in dropped] == [True, True]
    assert all(ref() is not None for ref in kept)
    assert sum(p.numel() for p in llm.model.parameters()) == sum(
        p.numel() for p in build_tiny_llm("llama", num_layers=2).model.parameters())


def test_loading_a_saved_llm_keeps_only_the_asked_blocks_alive(tmp_path):
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    def alive():
        gc.collect()
        return sum(type(o) is LlamaDecoderLayer for o in gc.get_objects())  # type(): no attribute lookups

    source = build_tiny_llm("llama", num_layers=FULL, seed=4)
    source.model.save_pretrained(tmp_path)
    source.tokenizer.save_pretrained(tmp_path)
    before = alive()
    llm = load_llm(LLMConfig(str(tmp_path), num_layers=1))
    assert alive() - before == 1 and len(llm.model.layers) == 1
    assert llm.fingerprint == build_tiny_llm("llama", num_layers=FULL, seed=4, keep_layers=1).fingerprint


def test_fingerprint_names_the_kept_layers():
    full = load_llm(LLMConfig("tiny"))
    assert load_llm(LLMConfig("tiny", num_layers=1)).fingerprint != full.fingerprint
    # Keeping every layer is no truncation: the same model, the same fingerprint (0 and 2 for the 2-layer tiny LLM).
    assert load_llm(LLMConfig("tiny", num_layers=2)).fingerprint == full.fingerprint
    assert full.describe()["num_layers"] == full.describe()["source_layers"] == 2


def test_num_layers_is_an_upper_bound_so_the_default_keeps_a_smaller_llm_whole(caplog):
    full = load_llm(LLMConfig("tiny", num_layers=0))
    with caplog.at_level("INFO", logger="laser_batch.llm"):
        above = load_llm(LLMConfig("tiny", num_layers=3))
    assert above.fingerprint == full.fingerprint and above.describe()["num_layers"] == 2
    assert "llm.num_layers = 3: the LLM tiny has 2 layers, all kept" in caplog.text
    assert LLMConfig().num_layers == 8 and load_llm(LLMConfig("tiny")).fingerprint == full.fingerprint


@pytest.mark.parametrize(("value", "message"), [(-1, "integer >= 0"), (True, "expected int"), (2.5, "expected int")])
def test_bad_num_layers_values(value, message):
    with pytest.raises(ConfigError, match=f"llm.num_layers = {value!r} is invalid.*{message}"):
        load_config(None, llm={"num_layers": value})


def test_a_run_records_its_layers_reloads_them_and_refuses_another_count(sasrec_run, tmp_path):
    import shutil

    run = shutil.copytree(sasrec_run, tmp_path / "run")
    config = load_config(None, **{**SMALL, "llm": {"num_layers": 1}, "laser": {**SMALL["laser"], "stage2_epochs": 0}})
    train_laser(run, config)
    saved = json.loads((run / "laser" / "config.json").read_text())
    assert (saved["llm"]["num_layers"], saved["llm"]["source_layers"]) == (1, 2)
    model, _, _ = load_laser(run)  # finds the same truncated LLM by itself
    assert model.llm.fingerprint == saved["llm"]["fingerprint"] and len(model.llm.model.layers) == 1
    with pytest.raises(CheckpointError, match="fingerprint"):
        load_laser(run, llm=load_llm(LLMConfig("tiny")))  # all layers: refused

    from laser_batch.exporters.export import export_run

    manifest = export_run(run, tmp_path / "art")  # the exporter finds the truncated LLM through the checkpoint
    assert manifest["settings"]["llm"] == saved["llm"]


def test_exported_user_encoder_holds_only_the_kept_blocks(sasrec_run, tmp_path):
    from laser_batch.exporters.parts import PartConfig, UserEncoderOnnxConfig, UserEncoderPart, export_part

    sizes = {}
    for kept in (2, 0):
        llm = build_tiny_llm("llama", num_layers=FULL, seed=6, keep_layers=kept)
        model, _, _ = build_laser(small_config(), sasrec_run, llm)
        part = UserEncoderPart(model, PartConfig(part="user_encoder", llm_size=llm.hidden_size,
                                                 num_queries=model.mformer_config.num_queries,
                                                 vocab_size=len(llm.tokenizer), pad_id=llm.tokenizer.pad_token_id))
        (tmp_path / str(kept)).mkdir()
        export_part("user_encoder", part, UserEncoderOnnxConfig, tmp_path / str(kept))  # validated against torch
        graph = onnx.load(str(tmp_path / str(kept) / "user_encoder.onnx")).graph
        sizes[kept] = (sum(onnx.numpy_helper.to_array(t).nbytes for t in graph.initializer), len(graph.node))
    block_bytes = sum(p.numel() * 4 for p in build_tiny_llm("llama", num_layers=FULL, seed=6).model.layers[2:]
                      .parameters())
    assert sizes[0][0] - sizes[2][0] == pytest.approx(block_bytes, rel=0.01)  # two blocks' weights fewer
    assert sizes[2][1] < sizes[0][1]
