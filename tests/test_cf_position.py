"""`laser.cf_position = "after_text"`: text + [prefix] + [suffix], trained over cached text keys/values.

The core check: the cached training path (`Laser.training_forward`) gives the same user embeddings and the same
gradients as the full-sequence forward that `encode` runs and the export traces, for left-padded batches.
"""

import json

import numpy as np
import pytest
import test_laser
import torch
from test_laser import small_config

from laser_batch.checkpoint import load_laser
from laser_batch.config import LaserConfig, LLMConfig, load_config
from laser_batch.encode import encode_items, encode_users
from laser_batch.errors import ConfigError
from laser_batch.llm import build_tiny_llm, load_llm
from laser_batch.train_laser import build_laser, train_laser, training_samples

AFTER_TEXT = {"cf_position": "after_text"}
sasrec_run = test_laser.sasrec_run  # the same module-scoped fixture: a SASRec run on a small example


def _llm(architecture):
    return load_llm(LLMConfig(source="tiny")) if architecture == "llama" else build_tiny_llm(architecture)


def _histories(sequences):
    """Six user histories whose texts have different lengths."""
    histories = [s[:-2] for s in sequences.seqs[:6]]
    histories[1], histories[2] = histories[1][:1], histories[2][:2]
    return histories


def _padded_batch(inputs, sequences):
    """A left-padded user batch whose rows have texts of different lengths."""
    batch = inputs.users(_histories(sequences))
    lengths = batch[2].sum(1)
    assert len(set(lengths.tolist())) >= 3 and (batch[2][:, 0] == 0).any()  # padded, of different lengths
    return batch


def _run_data(run):
    """A run's data set and its sequences."""
    from laser_batch.checkpoint import read_run_info
    from laser_batch.contracts import load_data_dir
    from laser_batch.sequences import build_sequences

    dataset = load_data_dir(read_run_info(run)["data_dir"])
    return dataset, build_sequences(dataset.interactions)


def test_the_default_is_after_the_text_and_an_unknown_position_is_refused():
    assert LaserConfig().cf_position == "after_text"  # the package's default; "prefix" is the paper's order
    assert load_config(None).laser.cf_position == "after_text"
    with pytest.raises(ConfigError, match="laser.cf_position"):
        load_config(None, laser={"cf_position": "suffix"})


def test_after_text_feeds_the_llm_text_then_prefix_then_suffix(sasrec_run):
    llm = _llm("llama")
    model, inputs, sequences = build_laser(small_config(laser=AFTER_TEXT), sasrec_run, llm)
    model.eval()
    id_history, input_ids, attention_mask = inputs.users([sequences.seqs[0][:-2]])  # one row: no padding
    prefix, _ = model.make_prefix(id_history, 1)
    embeds = torch.cat([llm.embed(input_ids), prefix, model.suffix[None]], dim=1)
    positions = torch.arange(embeds.shape[1])[None]
    by_hand = llm(inputs_embeds=embeds, attention_mask=torch.ones_like(positions), position_ids=positions)[:, -1]
    got = model.encode(prefix, input_ids, attention_mask, raw=True)
    torch.testing.assert_close(got, by_hand, atol=1e-5, rtol=1e-5)
    paper, _, _ = build_laser(small_config(), sasrec_run, llm)
    paper.load_state_dict(model.state_dict())
    assert (paper.encode(prefix, input_ids, attention_mask, raw=True) - got).abs().max() > 1e-2  # the order matters


@pytest.mark.parametrize("architecture", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("sections", [
    {},
    {"prefix": "free", "pooling": "mean"},
    {"prefix": "free", "pooling": "eos"},
    {"prefix": "none"},
    {"center": True},
])
def test_the_cached_path_embeds_users_as_the_full_sequence_does(sasrec_run, architecture, sections):
    model, inputs, sequences = build_laser(small_config(laser=AFTER_TEXT | sections), sasrec_run, _llm(architecture))
    model.eval()  # no M-Former dropout: both paths see the same prefix
    if model.config.center:
        model.center.normal_()
    batch = _padded_batch(inputs, sequences)
    full, full_lb = model(*batch)
    cached, cached_lb = model.training_forward(*batch)
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cached_lb, full_lb)
    for row, history in enumerate(_histories(sequences)):  # and each row as the full path embeds it unpadded
        torch.testing.assert_close(cached[row:row + 1], model(*inputs.users([history]))[0], atol=1e-5, rtol=1e-5)


def test_the_text_is_computed_without_gradients_and_only_the_trained_positions_are_new(sasrec_run):
    model, inputs, sequences = build_laser(small_config(laser=AFTER_TEXT), sasrec_run, _llm("llama"))
    id_history, input_ids, attention_mask = _padded_batch(inputs, sequences)
    text = model.encode_text(input_ids, attention_mask)
    layers = text.cache.layers
    assert len(layers) == model.llm.model.config.num_hidden_layers
    assert all(layer.keys.shape[2] == input_ids.shape[1] and not layer.keys.requires_grad
               and not layer.values.requires_grad for layer in layers)
    assert not text.hidden.requires_grad
    torch.testing.assert_close(text.lengths, attention_mask.sum(1))
    prefix, _ = model.make_prefix(id_history, input_ids.shape[0])
    users = model.encode_after_text(prefix, text)
    trained = model.mformer_config.num_queries + model.config.num_suffix_tokens
    assert users.requires_grad and layers[0].keys.shape[2] == input_ids.shape[1] + trained


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
def test_gradients_reach_the_mformer_and_the_suffix_as_through_the_full_sequence(sasrec_run, architecture):
    model, inputs, sequences = build_laser(small_config(laser=AFTER_TEXT), sasrec_run, _llm(architecture))
    items = encode_items(model, inputs, sequences.num_items, batch_size=16)
    model.eval()  # no dropout: both paths compute the same function
    batch = _padded_batch(inputs, sequences)
    targets = torch.from_numpy(np.array([s[-2] for s in sequences.seqs[:6]]))
    grads = {}
    for name, forward in (("full", model), ("cached", model.training_forward)):
        model.zero_grad(set_to_none=True)
        users, lb_loss = forward(*batch)
        model.loss(users, items, targets, lb_loss).backward()
        grads[name] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(grads["cached"]) == set(grads["full"]) == trained
    assert grads["cached"]["suffix"].abs().sum() > 0 and grads["cached"]["mformer.out_proj.weight"].abs().sum() > 0
    torch.testing.assert_close(grads["cached"], grads["full"], atol=1e-5, rtol=1e-4)
    assert not any(p.grad is not None for p in model.llm.model.parameters())


def test_training_uses_the_cached_path_and_the_run_records_and_reloads_the_position(sasrec_run, tmp_path,
                                                                                     monkeypatch):
    import shutil

    from laser_batch.model import Laser

    run = tmp_path / "run"
    shutil.copytree(sasrec_run, run)
    calls = []
    real = Laser.encode_after_text
    monkeypatch.setattr(Laser, "encode_after_text", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    llm = _llm("llama")
    config = small_config(laser=AFTER_TEXT | {"stage2_epochs": 0})
    train_laser(run, config, llm=llm)
    users = len(training_samples(_run_data(run)[1], 1, np.random.default_rng(0))[1])
    assert len(calls) == -(-users // config.laser.batch_size)  # every training batch of the one epoch
    assert json.loads((run / "laser" / "config.json").read_text())["laser"]["cf_position"] == "after_text"
    model, _, _ = load_laser(run, llm=llm)
    assert model.config.cf_position == "after_text"


def test_export_runs_the_whole_after_text_sequence_and_onnx_matches_torch(sasrec_run, tmp_path):
    import shutil

    from laser_batch.artifacts import Embedder
    from laser_batch.config import TextConfig
    from laser_batch.encode import laser_inputs
    from laser_batch.exporters.export import export_run

    run = tmp_path / "run"
    shutil.copytree(sasrec_run, run)
    llm = _llm("llama")
    train_laser(run, small_config(laser=AFTER_TEXT | {"stage2_epochs": 0, "center": True}), llm=llm)
    manifest = export_run(run, tmp_path / "art", llm=llm, validate_users=40)
    parity = manifest["graphs"]["user_encoder"]["parity"]
    assert all(v["max_abs_diff"] <= 1e-3 for check in parity for k, v in check.items() if "max_abs_diff" in v)
    assert manifest["end_to_end"]["top10"]["same_set"] >= 0.99

    model, _, config = load_laser(run, llm=llm)
    dataset, sequences = _run_data(run)
    inputs = laser_inputs(llm, dataset.items, sequences, TextConfig(**config["text"]), model.sasrec.config.max_len)
    histories = sequences.split("test")[0][:9]
    reference = encode_users(model, inputs, histories, batch_size=4).numpy()
    got = Embedder(tmp_path / "art", device="cpu").embed(histories)
    np.testing.assert_allclose(got, reference, atol=1e-4)
    model.config.cf_position = "prefix"  # the same weights in the paper's order embed otherwise
    assert np.abs(encode_users(model, inputs, histories, batch_size=4).numpy() - got).max() > 1e-2
