"""`laser.fusion = "gated"`: score = SASRec(u, i) + g * cos(laser_u, laser_i) / tau, with g from 0: fitted on
validation (`gate_fit = "valid"`, the default, or `"residual"`: Laser trained against a held-out SASRec's scores) or
trained (`"train"`).

It starts at SASRec's exact ranking, model selection keeps that start unless an epoch beats it, and the export
scores it as one product of [SASRec state ; g / tau * laser_u] with [SASRec item ; laser_i], as evaluate does.
"""
# ruff: noqa: F811 (llm and sasrec_run are test_laser's fixtures, imported, then taken as arguments)

import json

import numpy as np
import polars as pl
import pytest
import torch
import torch.nn.functional as F
from test_laser import _copy_run, llm, sasrec_run, small_config  # noqa: F401 (llm, sasrec_run: fixtures)

from laser_batch.checkpoint import CONFIG_FILE, LASER_DIR, WEIGHTS_FILE, load_laser
from laser_batch.config import TextConfig, load_config
from laser_batch.encode import encode_items, encode_users, laser_inputs, laser_scorer
from laser_batch.errors import ConfigError
from laser_batch.evaluate import evaluate_run
from laser_batch.exporters.gate import gate_pairs
from laser_batch.metrics import exclude_items, rank_targets, top_k
from laser_batch.train_laser import build_laser, parameter_groups, train_laser
from laser_batch.training import sasrec_scores

GATED = {"fusion": "gated", "gate_fit": "train"}  # g trained by gradient on the fused loss
# gate_fit = "valid" (the default): g chosen on validation after every epoch; without the guard (tested on its own)
FITTED = {"fusion": "gated", "gate_guard": False}


def _metrics_lines(run):
    return [json.loads(line) for line in (run / LASER_DIR / "metrics.jsonl").read_text().splitlines()]


def _set_gate(model, value):
    with torch.no_grad():
        model.gate.fill_(value)


def test_fusion_is_none_or_gated():
    assert load_config(None).laser.fusion == "gated"  # the package's default; "none" is the paper
    with pytest.raises(ConfigError, match="laser.fusion = 'sum' is invalid: expected one of none, gated"):
        small_config(laser={"fusion": "sum"})


def test_the_gate_is_the_one_more_trained_parameter_and_starts_at_zero(sasrec_run, llm):
    plain, _, _ = build_laser(small_config(), sasrec_run, llm)
    fused, _, _ = build_laser(small_config(laser=GATED), sasrec_run, llm)
    names = lambda model: {n for n, p in model.named_parameters() if p.requires_grad}  # noqa: E731
    assert names(fused) - names(plain) == {"gate"} and names(plain) <= names(fused)
    assert set(fused.trainable_state_dict()) == names(fused)
    assert fused.gate.shape == () and fused.gate_value == 0.0 and plain.gate_value is None


def test_at_gate_zero_the_fused_scores_are_sasrecs_exactly_and_then_add_the_scaled_cosine(sasrec_run, llm):
    model, inputs, sequences = build_laser(small_config(laser=GATED), sasrec_run, llm)
    items = encode_items(model, inputs, sequences.num_items, batch_size=32)
    histories, _ = sequences.split("valid")
    scorer = laser_scorer(model, inputs, items, batch_size=8)
    sasrec = sasrec_scores(model.sasrec, histories)
    assert np.array_equal(scorer(histories), sasrec)  # bit for bit: not a rescaled or renormalised SASRec

    _set_gate(model, 0.3)
    cosine = (encode_users(model, inputs, histories, batch_size=8) @ items.T).numpy()
    fused = scorer(histories)
    np.testing.assert_allclose(fused, sasrec + 0.3 * cosine / model.config.temperature, rtol=1e-5, atol=1e-5)
    assert not np.allclose(fused, sasrec)
    # The one matrix product the export writes gives the same scores.
    users = model.fused_users(encode_users(model, inputs, histories, batch_size=8), inputs.id_history(histories))
    np.testing.assert_allclose((users @ model.fused_items(items).T).numpy(), fused, rtol=1e-5, atol=1e-5)
    assert users.shape == (len(histories), model.sasrec.config.hidden_size + llm.hidden_size)


def test_the_loss_is_the_cross_entropy_of_the_fused_logits_and_trains_the_gate(sasrec_run, llm):
    model, inputs, sequences = build_laser(small_config(laser=GATED), sasrec_run, llm)
    model.eval()  # no dropout: the hand computation below sees the same embeddings
    items = encode_items(model, inputs, sequences.num_items, batch_size=32)
    histories, targets = sequences.split("valid")
    id_history, input_ids, attention_mask = inputs.users(histories)
    users, lb = model(id_history, input_ids, attention_mask)
    loss = model.loss(users, items, torch.from_numpy(targets), lb, id_history=id_history)

    sasrec = torch.from_numpy(sasrec_scores(model.sasrec, histories))
    expected = F.cross_entropy(sasrec, torch.from_numpy(targets) - 1) + model.config.lb_weight * lb
    torch.testing.assert_close(loss, expected)
    loss.backward()
    # d loss / d g at g = 0: the mean over users of (E_softmax(SASRec)[cosine] - cosine of the target) / tau.
    cosine = (users @ items.T).detach() / model.config.temperature
    rows = torch.arange(len(targets))
    by_hand = ((sasrec.softmax(1) * cosine).sum(1) - cosine[rows, torch.from_numpy(targets) - 1]).mean()
    torch.testing.assert_close(model.gate.grad, by_hand, rtol=1e-4, atol=1e-6)
    assert model.gate.grad != 0
    with pytest.raises(ValueError, match="id_history"):
        model.loss(users, items, torch.from_numpy(targets), lb)


def test_selection_keeps_sasrecs_start_when_no_epoch_beats_it(sasrec_run, llm, tmp_path, monkeypatch):
    import laser_batch.train_laser as tl

    run = _copy_run(sasrec_run, tmp_path)

    def spoils_the_ranking(training, items, desc):  # an epoch that makes the fused ranking worse
        _set_gate(training.model, -20.0)
        return 0.0

    monkeypatch.setattr(tl, "_train_epoch", spoils_the_ranking)
    result = train_laser(run, small_config(laser=GATED), llm=llm)
    lines = _metrics_lines(run)
    assert [(r["stage"], r["epoch"], r["gate"]) for r in lines] == [(1, 0, 0.0), (1, 1, -20.0), (2, 1, -20.0)]
    assert all(r["NDCG@10"] < lines[0]["NDCG@10"] for r in lines[1:])  # the epochs really are worse
    assert (result.best_stage, result.best_epoch, result.gate) == (1, 0, 0.0)
    config = json.loads((run / LASER_DIR / CONFIG_FILE).read_text())
    assert (config["best_epoch"], config["gate"]) == (0, 0.0)
    # The saved checkpoint is SASRec's ranking: the same metrics, exactly, on both splits.
    for split in ("valid", "test"):
        laser = evaluate_run(run, model="laser", split=split)
        assert laser["metrics"] == evaluate_run(run, model="sasrec", split=split)["metrics"]
        assert laser["gate"] == 0.0
    assert laser["metrics"] != evaluate_run(run, model="popularity")["metrics"]


def test_a_fused_run_trains_the_gate_and_reports_it_every_epoch(sasrec_run, llm, tmp_path):
    run = _copy_run(sasrec_run, tmp_path)
    config = small_config(laser={**GATED, "stage1_epochs": 2, "lr": 0.02})
    result = train_laser(run, config, llm=llm)
    lines = _metrics_lines(run)
    assert [(r["stage"], r["epoch"]) for r in lines] == [(1, 0), (1, 1), (1, 2), (2, 1)]
    assert lines[0]["gate"] == 0.0 and "loss" not in lines[0]  # the start: validated, not trained
    assert all(r["gate"] != 0.0 for r in lines[1:])  # trained
    best = max(lines, key=lambda r: r["NDCG@10"])  # the first of equals, as selection keeps it
    assert (result.best_stage, result.best_epoch) == (best["stage"], best["epoch"])
    assert result.valid_metrics["NDCG@10"] >= lines[0]["NDCG@10"]
    model, _, saved = load_laser(run, llm=llm)
    assert saved["gate"] == result.gate == model.gate_value == best["gate"]
    assert evaluate_run(run, model="laser", split="test")["gate"] == result.gate
    assert "gate" not in evaluate_run(run, model="sasrec", split="test")


def test_a_resumed_fused_run_matches_an_uninterrupted_one(sasrec_run, llm, tmp_path, monkeypatch):
    import laser_batch.train_laser as tl

    config = small_config(laser={**GATED, "lr": 0.02})
    straight = _copy_run(sasrec_run, tmp_path / "a")
    train_laser(straight, config, llm=llm)
    run = _copy_run(sasrec_run, tmp_path / "b")

    def dies_in_the_first_epoch(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tl, "_train_epoch", dies_in_the_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        train_laser(run, config, llm=llm)
    monkeypatch.undo()
    train_laser(run, config, llm=llm, resume=True)
    for name in ("model.safetensors", "item_matrix.safetensors"):
        assert (run / LASER_DIR / name).read_bytes() == (straight / LASER_DIR / name).read_bytes(), name
    assert [(r["stage"], r["epoch"]) for r in _metrics_lines(run)] == [(1, 0), (1, 1), (2, 1)]  # start validated once


@pytest.fixture(scope="module", params=[{}, {"prefix": "free", "cf_position": "after_text"}],
                ids=["mformer-prefix", "text-only-llm"])
def fused_export(request, sasrec_run, llm, tmp_path_factory):
    """A trained fused run whose gate is set to 0.02 (g / tau = 0.4: both terms matter), and its export (with an
    int8 variant): the paper's M-Former prefix, and the LLM reading text only (a learned prefix after the text, SASRec
    entering through the fusion alone: benchmarks/configs/laser_scientific_text.toml)."""
    from safetensors.torch import load_file, save_file

    from laser_batch.exporters.export import export_run

    root = tmp_path_factory.mktemp("fused_export")
    run = _copy_run(sasrec_run, root)
    train_laser(run, small_config(laser={**GATED, "center": True, **request.param}), llm=llm)
    weights = load_file(str(run / LASER_DIR / WEIGHTS_FILE))
    save_file({**weights, "gate": torch.tensor(0.02)}, str(run / LASER_DIR / WEIGHTS_FILE))
    config = json.loads((run / LASER_DIR / CONFIG_FILE).read_text())
    (run / LASER_DIR / CONFIG_FILE).write_text(json.dumps({**config, "gate": 0.02}))
    manifest = export_run(run, root / "art", llm=llm, quantize=["int8-dynamic"])
    return run, root / "art", manifest


def test_the_export_writes_the_fused_item_matrix_and_records_the_gate(fused_export, llm):
    run, art, manifest = fused_export
    settings = manifest["settings"]
    assert (settings["fusion"], settings["temperature"], settings["score"]) == ("gated", 0.05, "dot")
    assert settings["gate"] == pytest.approx(0.02)
    assert manifest["end_to_end"]["top10"]["same_set"] >= 0.99
    model, items, _ = load_laser(run, llm=llm)
    matrix = np.load(art / "item_matrix.npy")
    np.testing.assert_array_equal(matrix[:, :model.sasrec.config.hidden_size], model.sasrec.item_vectors().detach())
    np.testing.assert_array_equal(matrix[:, model.sasrec.config.hidden_size:], items.numpy())
    # The int8 variant is judged on the fused ranking: the gate's fp32 HR@10 is the torch model's fused one on the
    # same held-out pairs (history excluded, as evaluate ranks), up to a near-tie or two between torch and ONNX.
    gate = manifest["graphs"]["user_encoder"]["gate"]
    assert "gate" in manifest["graphs"]["user_encoder"]["variants"]["int8-dynamic"]
    sequences, inputs = _run_inputs(run, model)
    pairs = gate_pairs(sequences)
    ranks = rank_targets(laser_scorer(model, inputs, items, batch_size=16), pairs.histories, pairs.targets)
    assert gate["fp32"]["hr10"] == pytest.approx(float((ranks <= 10).mean()), abs=2 / len(pairs))


def _run_inputs(run, model):
    """The run's sequences and the torch model's inputs, as evaluate builds them."""
    from laser_batch.checkpoint import read_run_info
    from laser_batch.contracts import load_data_dir
    from laser_batch.sequences import build_sequences

    dataset = load_data_dir(read_run_info(run)["data_dir"])
    sequences = build_sequences(dataset.interactions)
    config = json.loads((run / LASER_DIR / CONFIG_FILE).read_text())
    inputs = laser_inputs(model.llm, dataset.items, sequences, TextConfig(**config["text"]),
                          model.sasrec.config.max_len)
    return sequences, inputs


def test_score_and_evaluate_agree_on_every_users_top_10(fused_export, llm, tmp_path):
    from laser_batch.score import score_users

    run, art, _ = fused_export
    model, items, config = load_laser(run, llm=llm)
    sequences, inputs = _run_inputs(run, model)
    histories, _ = sequences.split("test")
    users = pl.DataFrame({"user_id": sequences.user_ids,
                          "history": [sequences.item_ids.gather(h - 1).to_list() for h in histories]})
    users.write_parquet(tmp_path / "users.parquet")
    # fp32 graphs: `--variant auto` (the default) may pick the int8 variant, which is judged on quality, not scores.
    summary = score_users(tmp_path / "users.parquet", art, tmp_path / "out", top_k=10, variant="fp32")
    assert summary["variant"] == "fp32"
    recs = pl.read_parquet(tmp_path / "out" / "part-*.parquet").sort("user_id", "rank")

    # evaluate --model laser's scorer
    scores = laser_scorer(model, inputs, items, batch_size=config["laser"]["item_batch_size"])(histories)
    sasrec = sasrec_scores(model.sasrec, histories)
    for table in (scores, sasrec):
        exclude_items(table, histories)
    top, best = top_k(scores, 10)
    assert recs.height == 10 * len(histories)
    for row, user in enumerate(sequences.user_ids.to_list()):
        mine = recs.filter(pl.col("user_id") == user)
        assert mine["item_id"].to_list() == sequences.item_ids.gather(top[row]).to_list(), user
        np.testing.assert_allclose(mine["score"].to_numpy(), best[row], rtol=1e-4, atol=1e-4)
    # Laser's part counts at this gate: most users' fused top 10 is not SASRec's.
    assert (top != top_k(sasrec, 10)[0]).any(axis=1).mean() > 0.5


def test_the_gate_has_its_own_learning_rate_and_no_weight_decay(sasrec_run, llm):
    from laser_batch.train_laser import parameter_groups

    config = small_config(laser={**GATED, "lr": 1e-4, "gate_lr": 0.05, "weight_decay": 0.1})
    model, _, _ = build_laser(config, sasrec_run, llm)
    weights, gate = parameter_groups(model, config.laser)
    assert gate["params"] == [model.gate] and gate["lr"] == 0.05 and gate["weight_decay"] == 0.0
    assert all(p is not model.gate for p in weights["params"]) and "lr" not in weights  # the optimizer's laser.lr
    assert len(weights["params"]) + 1 == len([p for p in model.parameters() if p.requires_grad])
    # One AdamW step moves g by about its own lr (Adam's first step is lr * sign(gradient)), not by laser.lr
    optimizer = torch.optim.AdamW(parameter_groups(model, config.laser), lr=config.laser.lr,
                                  weight_decay=config.laser.weight_decay)
    model.gate.grad = torch.tensor(-3.0)
    optimizer.step()
    assert model.gate_value == pytest.approx(0.05, rel=1e-3)
    unset, _, _ = build_laser(small_config(laser={**GATED, "lr": 1e-4, "gate_lr": 0.0}), sasrec_run, llm)
    assert parameter_groups(unset, unset.config)[1]["lr"] == 1e-4  # 0: laser.lr
    plain, _, _ = build_laser(small_config(), sasrec_run, llm)
    assert len(parameter_groups(plain, plain.config)) == 1
    with pytest.raises(ConfigError, match="laser.gate_lr"):
        small_config(laser={"gate_lr": -1.0})


def test_a_validation_fitted_gate_is_not_trained_and_laser_learns_on_its_own_loss(sasrec_run, llm):
    config = small_config(laser=FITTED)
    assert config.laser.gate_fit == "valid"
    model, inputs, sequences = build_laser(config, sasrec_run, llm)
    assert "gate" not in dict(model.named_parameters()) and "gate" in model.trainable_state_dict()
    assert parameter_groups(model, config.laser) == [{"params": [p for p in model.parameters() if p.requires_grad]}]
    plain, _, _ = build_laser(small_config(), sasrec_run, llm)
    plain.load_state_dict({k: v for k, v in model.trainable_state_dict().items() if k != "gate"}, strict=False)
    model.eval(), plain.eval()
    _set_gate(model, 0.5)
    items = encode_items(model, inputs, sequences.num_items, batch_size=32)
    histories, targets = sequences.split("valid")
    batch = inputs.users(histories)
    users, lb = model(*batch)
    loss = model.loss(users, items, torch.from_numpy(targets), lb)  # no id_history needed: Laser's own logits
    expected = F.cross_entropy(users @ items.T / model.config.temperature, torch.from_numpy(targets) - 1)
    torch.testing.assert_close(loss, expected + model.config.lb_weight * lb)
    with pytest.raises(ConfigError, match="laser.gate_fit = 'test' is invalid: expected one of valid, train"):
        small_config(laser={"gate_fit": "test"})


def test_the_fitted_gate_is_the_grid_value_that_ranks_validation_best(sasrec_run, llm, tmp_path):
    from laser_batch.laser_state import GATE_GRID
    from laser_batch.metrics import metrics_from_ranks, rank_targets

    run = _copy_run(sasrec_run, tmp_path)
    config = small_config(laser={**FITTED, "stage1_epochs": 2, "lr": 0.02})
    result = train_laser(run, config, llm=llm)
    lines = _metrics_lines(run)
    assert [(r["stage"], r["epoch"]) for r in lines] == [(1, 0), (1, 1), (1, 2), (2, 1)]
    assert all(r["gate"] in GATE_GRID and "laser_alone_NDCG@10" in r for r in lines)
    sasrec_valid = evaluate_run(run, model="sasrec", split="valid")["metrics"]["NDCG@10"]
    assert all(r["NDCG@10"] >= sasrec_valid for r in lines)  # g = 0 is on the grid: never below SASRec

    # Recomputed independently for the saved checkpoint: every grid value's validation NDCG@10 through the
    # ordinary fused scorer; the saved g is the first of the best, and its metrics are the best line's.
    model, items, saved = load_laser(run, llm=llm)
    _, inputs, sequences = build_laser(config, run, llm)
    histories, targets = sequences.split("valid")
    by_gate = []
    for g in GATE_GRID:
        _set_gate(model, g)
        scorer = laser_scorer(model, inputs, items, batch_size=8)
        by_gate.append(metrics_from_ranks(rank_targets(scorer, histories, targets))["NDCG@10"])
    chosen = GATE_GRID.index(saved["gate"])
    assert by_gate[chosen] == pytest.approx(max(by_gate), abs=1e-9)
    assert all(v < by_gate[chosen] - 1e-12 for v in by_gate[:chosen])
    best = next(r for r in lines if (r["stage"], r["epoch"]) == (result.best_stage, result.best_epoch))
    assert best["gate"] == saved["gate"] == result.gate
    assert best["NDCG@10"] == pytest.approx(by_gate[chosen], abs=1e-9)
    assert evaluate_run(run, model="laser", split="valid")["metrics"]["NDCG@10"] == pytest.approx(by_gate[chosen])


def test_the_guard_keeps_sasrec_unless_the_validation_gain_is_above_noise(sasrec_run, llm, tmp_path):
    from laser_batch.metrics import metric_per_user, paired_bootstrap, rank_targets

    guarded, free = _copy_run(sasrec_run, tmp_path / "guarded"), _copy_run(sasrec_run, tmp_path / "free")
    settings = {"fusion": "gated", "stage1_epochs": 2, "stage2_epochs": 0, "lr": 0.02}
    config = small_config(laser=settings)
    assert config.laser.gate_guard  # on by default
    train_laser(guarded, config, llm=llm)
    train_laser(free, small_config(laser={**settings, "gate_guard": False}), llm=llm)
    sasrec_valid = evaluate_run(guarded, model="sasrec", split="valid")["metrics"]["NDCG@10"]
    # g does not enter Laser's own loss, so both runs train the same weights: the guard only changes which g is kept
    for with_guard, without in zip(_metrics_lines(guarded), _metrics_lines(free), strict=True):
        assert with_guard.get("gate_fitted", 0.0) == without["gate"]
        if without["gate"] == 0.0:
            assert with_guard["gate"] == 0.0 and "gate_gain_ci95_low" not in with_guard
        elif with_guard["gate_gain_ci95_low"] > 0:
            assert with_guard["gate"] == without["gate"] and with_guard["NDCG@10"] == without["NDCG@10"]
        else:  # the gain is within noise: SASRec's exact ranking
            assert with_guard["gate"] == 0.0 and with_guard["NDCG@10"] == pytest.approx(sasrec_valid, abs=1e-12)
    # the recorded lower end, recomputed from the saved model of the run without the guard (its best epoch)
    model, items, saved = load_laser(free, llm=llm)
    best = next(r for r in _metrics_lines(free) if r["gate"] == saved["gate"] and r["gate"] > 0)
    _, inputs, sequences = build_laser(config, free, llm)
    histories, targets = sequences.split("valid")
    ranks = {}
    for g in (0.0, saved["gate"]):
        _set_gate(model, g)
        ranks[g] = rank_targets(laser_scorer(model, inputs, items, batch_size=8), histories, targets)
    _, (low, _) = paired_bootstrap(metric_per_user(ranks[0.0], "NDCG@10"), metric_per_user(ranks[saved["gate"]],
                                                                                             "NDCG@10"))
    twin = next(r for r in _metrics_lines(guarded) if (r["stage"], r["epoch"]) == (best["stage"], best["epoch"]))
    assert twin["gate_gain_ci95_low"] == pytest.approx(low, abs=1e-9)


def test_metric_per_user_matches_the_aggregate_metrics():
    from laser_batch.metrics import metric_per_user, metrics_from_ranks

    ranks = np.array([1, 3, 10, 11, 250])
    aggregate = metrics_from_ranks(ranks, [10])
    for name in ("HR@10", "NDCG@10", "MRR"):
        assert metric_per_user(ranks, name).mean() == pytest.approx(aggregate[name])
    with pytest.raises(ValueError, match="unknown metric 'AUC'"):
        metric_per_user(ranks, "AUC")


RESIDUAL = {"fusion": "gated", "gate_fit": "residual"}  # Laser trains on held-out SASRec + cosine / tau


def test_the_heldout_sasrec_never_sees_the_item_each_training_sample_predicts(sasrec_run, llm, tmp_path, monkeypatch):
    import laser_batch.train_laser as train_laser_module
    from laser_batch.train import fit_sasrec

    config = small_config(laser=RESIDUAL)
    _, _, sequences = build_laser(config, sasrec_run, llm)
    seen = {}

    def recording_fit(config, num_items, train_seqs, valid, progress, **kwargs):
        seen.update(train_seqs=train_seqs, valid=valid)
        return fit_sasrec(config, num_items, train_seqs, valid, progress, **kwargs)

    monkeypatch.setattr(train_laser_module, "fit_sasrec", recording_fit)
    heldout = train_laser_module.heldout_sasrec(config, sequences, tmp_path)
    train = sequences.train_sequences()
    assert [s.tolist() for s in seen["train_seqs"]] == [s[:-1].tolist() for s in train]
    histories, targets = seen["valid"]
    assert targets.tolist() == [s[-1] for s in train if len(s) >= 2]  # the item `training_samples` predicts
    assert [h.tolist() for h in histories] == [s[:-1].tolist() for s in train if len(s) >= 2]
    assert not any(p.requires_grad for p in heldout.parameters())

    # Kept beside the resume state: a second call (a resumed run) loads it instead of fitting again.
    monkeypatch.setattr(train_laser_module, "fit_sasrec", lambda *a, **k: pytest.fail("fitted twice"))
    again = train_laser_module.heldout_sasrec(config, sequences, tmp_path)
    for name, value in heldout.state_dict().items():
        torch.testing.assert_close(again.state_dict()[name], value)


def test_the_residual_loss_offsets_lasers_logits_by_the_heldout_sasrec_and_trains_laser_at_gate_zero(
        sasrec_run, llm):
    config = small_config(laser=RESIDUAL)
    model, inputs, sequences = build_laser(config, sasrec_run, llm)
    assert "gate" not in dict(model.named_parameters()) and model.gate_value == 0.0
    items = encode_items(model, inputs, sequences.num_items, batch_size=32)
    histories, targets = sequences.split("valid")
    batch = inputs.users(histories)
    users, lb = model.training_forward(*batch)
    offsets = torch.randn(len(targets), sequences.num_items) * 3
    loss = model.loss(users, items, torch.from_numpy(targets), lb, offsets=offsets)
    expected = F.cross_entropy(offsets + users @ items.T / model.config.temperature, torch.from_numpy(targets) - 1)
    torch.testing.assert_close(loss, expected + model.config.lb_weight * lb)
    loss.backward()  # g = 0 at validation does not stop Laser's gradient: it trains against SASRec's scores
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="held-out SASRec"):
        model.loss(users.detach(), items, torch.from_numpy(targets), lb.detach())


def test_a_residual_run_fits_the_gate_on_validation_and_leaves_no_heldout_model_behind(sasrec_run, llm, tmp_path):
    from laser_batch.laser_state import GATE_GRID

    run = _copy_run(sasrec_run, tmp_path)
    result = train_laser(run, small_config(laser={**RESIDUAL, "stage1_epochs": 2, "lr": 0.02}), llm=llm)
    lines = _metrics_lines(run)
    assert [(r["stage"], r["epoch"]) for r in lines] == [(1, 0), (1, 1), (1, 2), (2, 1)]
    assert all(r["gate"] in GATE_GRID for r in lines) and result.gate in GATE_GRID
    sasrec_valid = evaluate_run(run, model="sasrec", split="valid")["metrics"]["NDCG@10"]
    assert all(r["NDCG@10"] >= sasrec_valid for r in lines)
    assert not list(run.rglob("heldout_sasrec*"))
    assert evaluate_run(run, model="laser", split="valid")["metrics"]["NDCG@10"] == pytest.approx(
        next(r for r in lines if (r["stage"], r["epoch"]) == (result.best_stage, result.best_epoch))["NDCG@10"])
