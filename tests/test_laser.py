"""Laser on the embedded tiny LLM and a small slice of the example data (seconds per test)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from laser_batch.checkpoint import load_laser
from laser_batch.config import LLMConfig, load_config
from laser_batch.encode import encode_items, encode_users, recenter_users
from laser_batch.errors import CheckpointError, ConfigError
from laser_batch.llm import load_llm
from laser_batch.train import train_sasrec
from laser_batch.train_laser import build_laser, train_laser

# The paper's design (the M-Former's CF tokens before the text, ranking by Laser's cosine alone), small: most tests
# check its mechanics and extend it. The package's defaults (text only, after the text, gated fusion) are checked
# in test_fusion.py, test_cf_position.py and test_defaults_are_the_measured_combination below.
PAPER_DESIGN = {"prefix": "mformer", "cf_position": "prefix", "fusion": "none", "center": False,
                "temperature": 0.05, "valid_users": 0}
SMALL = {
    "sasrec": {"hidden_size": 16, "max_len": 12, "dropout": 0.1},
    "train": {"epochs": 3, "batch_size": 16, "lr": 0.01, "threads": 1},
    "mformer": {"num_experts": 4, "num_queries": 4, "hidden_size": 32, "num_blocks": 2, "num_heads": 2},
    "text": {"max_history_items": 4, "max_text_tokens": 96},
    "laser": {"stage1_epochs": 1, "stage2_epochs": 1, "batch_size": 16, "lr": 0.003, "item_batch_size": 32,
              **PAPER_DESIGN},
}


def small_config(**sections):
    merged = {k: {**v, **sections.get(k, {})} for k, v in SMALL.items()}
    return load_config(None, **merged)


@pytest.fixture(scope="module")
def llm():
    return load_llm(LLMConfig(source="tiny"))


@pytest.fixture(scope="module")
def sasrec_run(tmp_path_factory):
    from laser_batch.examples.synthetic import write_example

    root = tmp_path_factory.mktemp("laser")
    write_example(root / "data", users=120, items=60, seed=3)
    train_sasrec(root / "data", root / "run", small_config())
    return root / "run"


def _toml(sections: dict) -> str:
    def value(v: object) -> str:
        return str(v).lower() if isinstance(v, bool) else repr(v).replace("'", '"')

    return "\n".join(f"[{section}]\n" + "\n".join(f"{k} = {value(v)}" for k, v in values.items())
                     for section, values in sections.items())


def _copy_run(sasrec_run, tmp_path):
    import shutil

    shutil.copytree(sasrec_run, tmp_path / "run")
    return tmp_path / "run"


def test_user_and_item_embeddings_are_unit_vectors(sasrec_run, llm):
    model, inputs, sequences = build_laser(small_config(), sasrec_run, llm)
    histories, _ = sequences.split("valid")
    users = encode_users(model, inputs, histories[:5], batch_size=2)
    items = encode_items(model, inputs, sequences.num_items, batch_size=16)
    assert users.shape == (5, llm.hidden_size) and items.shape == (sequences.num_items, llm.hidden_size)
    torch.testing.assert_close(users.norm(dim=-1), torch.ones(5))
    torch.testing.assert_close(items.norm(dim=-1), torch.ones(sequences.num_items))


def test_a_user_embeds_the_same_alone_and_in_a_padded_batch(sasrec_run, llm):
    model, inputs, sequences = build_laser(small_config(), sasrec_run, llm)
    model.eval()
    histories, _ = sequences.split("test")
    short, long = min(histories, key=len), max(histories, key=len)
    alone = model(*inputs.users([short]))[0]
    batched = model(*inputs.users([long, short]))[0][1:]
    torch.testing.assert_close(alone, batched, atol=1e-5, rtol=1e-5)


MFORMER_PARAMETERS = {
    "mformer.queries", "mformer.router.weight", "mformer.router.bias",
    "mformer.input_proj.0.weight", "mformer.input_proj.0.bias", "mformer.input_proj.1.weight",
    "mformer.input_proj.1.bias", "mformer.final_norm.weight", "mformer.final_norm.bias", "mformer.out_proj.weight",
    "mformer.out_proj.bias",
}


@pytest.mark.parametrize("sections, expected", [
    ({"laser": {"prefix": "free"}}, {"suffix", "free_prefix"}),
    ({"laser": {"prefix": "none"}}, {"suffix"}),
    ({"laser": {"pooling": "mean", "prefix": "free"}}, {"free_prefix"}),
    ({"laser": {"pooling": "eos", "prefix": "free"}}, {"free_prefix"}),
])
def test_exact_trainable_parameters_of_the_ablations(sasrec_run, llm, sections, expected):
    model, _, _ = build_laser(small_config(**sections), sasrec_run, llm)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
    assert set(model.trainable_state_dict()) == expected


def test_exact_trainable_parameters_of_laser(sasrec_run, llm):
    model, _, _ = build_laser(small_config(), sasrec_run, llm)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    blocks = {n for n in names if n.startswith("mformer.blocks.")}
    assert names == {"suffix"} | MFORMER_PARAMETERS | blocks
    # two blocks with cross-attention every 2nd: only block 0 cross-attends
    assert any(n.startswith("mformer.blocks.0.cross") for n in blocks)
    assert not any(n.startswith("mformer.blocks.1.cross") for n in blocks)
    assert set(model.trainable_state_dict()) == names
    assert all(p.requires_grad for p in model.parameters())  # frozen parts are outside the module tree


def test_training_steps_lower_the_loss_and_leave_llm_and_sasrec_bitwise_unchanged(sasrec_run, llm):
    torch.manual_seed(0)
    model, inputs, sequences = build_laser(small_config(laser={"lr": 0.01}), sasrec_run, llm)
    frozen_before = {**{f"llm.{k}": v.clone() for k, v in llm.model.state_dict().items()},
                     **{f"sasrec.{k}": v.clone() for k, v in model.sasrec.state_dict().items()}}
    items = encode_items(model, inputs, sequences.num_items, batch_size=32)
    histories = [s[:-3] for s in sequences.seqs][:32]
    targets = torch.tensor([s[-3] for s in sequences.seqs][:32])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.01)
    model.eval()  # no dropout, so the loss is comparable
    losses = []
    for _ in range(8):
        users, lb = model(*inputs.users(histories))
        loss = model.loss(users, items, targets, lb)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.2
    after = {**{f"llm.{k}": v for k, v in llm.model.state_dict().items()},
             **{f"sasrec.{k}": v for k, v in model.sasrec.state_dict().items()}}
    assert all(torch.equal(frozen_before[k], after[k]) for k in frozen_before)
    assert not any(p.requires_grad for p in llm.model.parameters())
    assert not llm.model.training and not model.sasrec.training


def test_train_writes_only_trained_weights_and_reloads_identically(sasrec_run, llm, tmp_path, monkeypatch):
    import laser_batch.train_laser as tl

    run = _copy_run(sasrec_run, tmp_path)
    _, inputs, sequences = build_laser(small_config(), run, llm)
    histories, _ = sequences.split("test")
    trained, real_save = {}, tl.save_laser

    def keep_the_trained_model(directory, model, item_matrix, *args):
        # What the trained model in memory computes just before it is written: the reference for the reload.
        trained.update(users=encode_users(model, inputs, histories, batch_size=8), items=item_matrix.clone(),
                       weights={k: v.clone() for k, v in model.trainable_state_dict().items()})
        real_save(directory, model, item_matrix, *args)

    monkeypatch.setattr(tl, "save_laser", keep_the_trained_model)
    result = train_laser(run, small_config(), llm=llm)
    files = sorted(p.name for p in (run / "laser").iterdir())
    assert files == ["config.json", "item_ids.parquet", "item_matrix.safetensors", "metrics.jsonl",
                     "model.safetensors", "user_ids.parquet"]
    config = json.loads((run / "laser" / "config.json").read_text())
    assert config["llm"]["source"] == "tiny" and config["llm"]["fingerprint"] == llm.fingerprint
    assert config["trainable_parameters"] == result.trainable_parameters
    lines = [json.loads(x) for x in (run / "laser" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["epoch"]) for r in lines] == [(1, 1), (2, 1)]

    from safetensors.torch import load_file

    saved = load_file(str(run / "laser" / "model.safetensors"))
    assert not any(k.startswith(("llm", "sasrec")) for k in saved)
    model, item_matrix, _ = load_laser(run, llm=llm)
    untrained, _, _ = build_laser(small_config(), run, llm)
    assert not torch.equal(encode_users(untrained, inputs, histories, batch_size=8), trained["users"])  # it learnt
    torch.testing.assert_close(model.trainable_state_dict(), trained["weights"], rtol=0, atol=0)
    torch.testing.assert_close(encode_users(model, inputs, histories, batch_size=8), trained["users"], rtol=0, atol=0)
    torch.testing.assert_close(item_matrix, trained["items"], rtol=0, atol=0)
    assert item_matrix.shape == (sequences.num_items, llm.hidden_size)


def test_a_different_llm_is_refused_on_load(sasrec_run, llm, tmp_path):
    from laser_batch.llm import build_tiny_llm

    run = _copy_run(sasrec_run, tmp_path)
    train_laser(run, small_config(laser={"stage2_epochs": 0}), llm=llm)
    with pytest.raises(CheckpointError, match="fingerprint"):
        load_laser(run, llm=build_tiny_llm("llama", seed=123, tokenizer=llm.tokenizer))


@pytest.mark.parametrize("sections", [
    {"mformer": {"num_experts": 1}},                 # no MoE
    {"mformer": {"top_k": 2}},                        # soft top-k routing
    {"laser": {"prefix": "free"}},                    # no collaborative prefix
    {"laser": {"prefix": "none"}},                    # no prefix
    {"laser": {"pooling": "mean"}},
    {"laser": {"pooling": "eos"}},
    {"laser": {"stage1_epochs": 0, "stage2_epochs": 1}},  # skip stage 1
    {"laser": {"stage1_epochs": 1, "stage2_epochs": 0}},  # skip stage 2
])
def test_ablations_train_and_evaluate(sasrec_run, llm, tmp_path, sections):
    from laser_batch.evaluate import evaluate_run

    run = _copy_run(sasrec_run, tmp_path)
    result = train_laser(run, small_config(**sections), llm=llm)
    stages = json.loads((run / "laser" / "config.json").read_text())
    expected_stages = {1 for _ in range(stages["laser"]["stage1_epochs"] > 0)} | {
        2 for _ in range(stages["laser"]["stage2_epochs"] > 0)}
    lines = [json.loads(x) for x in (run / "laser" / "metrics.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in lines} == expected_stages
    assert result.best_stage in expected_stages
    evaluation = evaluate_run(run, model="laser", split="test")
    assert evaluation["users"] == 120 and 0.0 <= evaluation["metrics"]["HR@10"] <= 1.0


def test_resume_after_an_interruption_matches_an_uninterrupted_run(sasrec_run, llm, tmp_path, monkeypatch):
    import laser_batch.train_laser as tl

    config = small_config(laser={"stage1_epochs": 2, "stage2_epochs": 1})
    straight_run = _copy_run(sasrec_run, tmp_path / "a")
    straight = train_laser(straight_run, config, llm=llm)

    run = _copy_run(sasrec_run, tmp_path / "b")
    real_epoch, calls = tl._train_epoch, []

    def dies_in_second_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(tl, "_train_epoch", dies_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        train_laser(run, config, llm=llm)
    assert not (run / "laser").exists() and (run / ".laser.partial" / "resume.safetensors").exists()
    monkeypatch.setattr(tl, "_train_epoch", real_epoch)
    with pytest.raises(CheckpointError, match="resume.safetensors: the interrupted run used another config"):
        train_laser(run, small_config(laser={"stage1_epochs": 2, "stage2_epochs": 1, "lr": 0.002}), llm=llm,
                    resume=True)
    from laser_batch.llm import build_tiny_llm

    with pytest.raises(CheckpointError, match="used another llm fingerprint"):
        train_laser(run, config, llm=build_tiny_llm("llama", seed=123, tokenizer=llm.tokenizer), resume=True)
    resumed = train_laser(run, config, llm=llm, resume=True)
    assert resumed.valid_metrics == pytest.approx(straight.valid_metrics, abs=1e-9)
    for name in ("model.safetensors", "item_matrix.safetensors"):  # optimizer, schedule and generators came back
        assert (run / "laser" / name).read_bytes() == (straight_run / "laser" / name).read_bytes(), name
    lines = [json.loads(x) for x in (run / "laser" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["epoch"]) for r in lines] == [(1, 1), (1, 2), (2, 1)]


class _RunsCode:
    """Unpickling this creates MARKER: what a pickled resume file from someone else could do instead."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.mark.parametrize("name", ["resume.safetensors", "resume.pt"])
def test_a_pickled_resume_file_is_refused_with_one_line_and_never_run(sasrec_run, tmp_path, name):
    from typer.testing import CliRunner

    from laser_batch.cli import app

    run, marker = _copy_run(sasrec_run, tmp_path), tmp_path / "payload-ran"
    (run / ".laser.partial").mkdir()
    torch.save({"state": _RunsCode(marker)}, run / ".laser.partial" / name)
    config = tmp_path / "small.toml"
    config.write_text(_toml(SMALL))
    result = CliRunner().invoke(app, ["-q", "train", "--stage", "laser", "--out", str(run), "--llm", "tiny",
                                      "--config", str(config), "--resume"])
    assert result.exit_code != 0 and not (run / "laser").exists()
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {run / '.laser.partial' / name}: "), result.stderr
    assert not marker.exists()
    with open(run / ".laser.partial" / name, "rb") as f:  # a file object: torch picks no loader by file name
        torch.load(f, weights_only=False)  # the payload is live: loading the file the old way runs it
    assert marker.exists()


def test_nothing_to_train_is_a_config_error():
    with pytest.raises(ConfigError, match="laser.pooling"):
        small_config(laser={"prefix": "none", "pooling": "mean"})


def test_sasrec_stage_is_required(tmp_path, llm):
    from laser_batch.checkpoint import write_run_info
    from laser_batch.examples.synthetic import write_example

    write_example(tmp_path / "data", users=30, items=30)
    write_run_info(tmp_path / "run", tmp_path / "data")
    with pytest.raises(CheckpointError, match="train the sasrec stage first"):
        train_laser(tmp_path / "run", small_config(), llm=llm)


def test_scores_rank_items_by_cosine(sasrec_run, llm):
    from laser_batch.encode import laser_scorer

    model, inputs, sequences = build_laser(small_config(), sasrec_run, llm)
    items = encode_items(model, inputs, sequences.num_items, batch_size=32)
    histories, _ = sequences.split("test")
    scores = laser_scorer(model, inputs, items, batch_size=8)(histories[:3])
    users = encode_users(model, inputs, histories[:3], batch_size=8)
    np.testing.assert_allclose(scores, (users @ items.T).numpy(), rtol=1e-6)
    assert scores.max() <= 1.0 + 1e-5


def test_cli_trains_all_stages_and_evaluates_laser(tmp_path):
    from typer.testing import CliRunner

    from laser_batch.cli import app
    from laser_batch.examples.synthetic import write_example

    write_example(tmp_path / "data", users=80, items=40, seed=5)
    config = tmp_path / "small.toml"
    config.write_text(_toml(SMALL))
    runner = CliRunner()
    result = runner.invoke(app, ["train", "--stage", "all", "--data", str(tmp_path / "data"), "--out",
                                 str(tmp_path / "run"), "--llm", "tiny", "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert "best stage" in result.output and (tmp_path / "run" / "laser" / "model.safetensors").exists()
    out = tmp_path / "laser.json"
    result = runner.invoke(app, ["evaluate", str(tmp_path / "run"), "--model", "laser", "--json", str(out)])
    assert result.exit_code == 0, result.output
    record = json.loads(out.read_text())
    assert record["model"] == "laser" and record["users"] == 80 and "MRR" in record["metrics"]
    result = runner.invoke(app, ["train", "--stage", "laser", "--out", str(tmp_path / "run"), "--config", str(config)])
    assert result.exit_code == 2 and "laser: already exists; pass --overwrite" in result.output


def test_centering_subtracts_the_catalogue_mean_and_is_saved_with_the_weights(sasrec_run, llm, tmp_path):
    config = small_config(laser={"center": True})
    model, inputs, sequences = build_laser(config, sasrec_run, llm)
    model.eval()  # no M-Former dropout, as in encode_items
    raw = torch.cat([model(*inputs.items(np.arange(1, sequences.num_items + 1)[i:i + 16]), raw=True, items=True)[0]
                     for i in range(0, sequences.num_items, 16)])
    items = encode_items(model, inputs, sequences.num_items, batch_size=16, recenter=True)
    torch.testing.assert_close(model.center, raw.mean(0), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(items, torch.nn.functional.normalize(raw - raw.mean(0), dim=-1), rtol=1e-4, atol=1e-4)
    assert abs((items @ items.T).mean().item()) < 0.05  # centred: no shared direction left
    plain = encode_items(model, inputs, sequences.num_items, batch_size=16)  # no recenter: center kept
    torch.testing.assert_close(plain, items, rtol=1e-4, atol=1e-4)

    run = _copy_run(sasrec_run, tmp_path)
    train_laser(run, config, llm=llm)
    reloaded, item_matrix, _ = load_laser(run, llm=llm)
    assert "center" in reloaded.state_dict() and reloaded.center.abs().sum() > 0
    histories, _ = sequences.split("test")
    user = encode_users(reloaded, inputs, histories[:4], batch_size=4)
    with torch.no_grad():
        raw_user = reloaded(*inputs.users(histories[:4]), raw=True)[0]
    torch.testing.assert_close(user, torch.nn.functional.normalize(raw_user - reloaded.center, dim=-1))


def test_users_are_centred_by_their_own_mean_and_items_by_the_catalogue_mean(sasrec_run, llm, tmp_path):
    config = small_config(laser={"center": True, "center_users": 20})
    run = _copy_run(sasrec_run, tmp_path)
    train_laser(run, config, llm=llm)
    model, item_matrix, _ = load_laser(run, llm=llm)
    model.eval()
    _, inputs, sequences = build_laser(config, run, llm)
    assert {"center", "user_center"} <= set(model.state_dict())
    assert not torch.allclose(model.user_center, model.center, atol=1e-3)
    histories, _ = sequences.split("test")
    with torch.no_grad():
        raw_users = model(*inputs.users(histories[:4]), raw=True)[0]
        raw_items = model(*inputs.items(np.arange(1, 5)), raw=True, items=True)[0]
        users = model(*inputs.users(histories[:4]))[0]
        items = model(*inputs.items(np.arange(1, 5)), items=True)[0]
    torch.testing.assert_close(users, torch.nn.functional.normalize(raw_users - model.user_center, dim=-1))
    torch.testing.assert_close(items, torch.nn.functional.normalize(raw_items - model.center, dim=-1))

    # recenter_users sets the centre to the mean raw embedding of the histories it is given
    sample = histories[:9]
    recenter_users(model, inputs, sample, batch_size=4)
    with torch.no_grad():
        expected = model(*inputs.users(sample), raw=True)[0].mean(0)
    torch.testing.assert_close(model.user_center, expected, rtol=1e-4, atol=1e-4)


def test_center_users_needs_center():
    with pytest.raises(ConfigError, match="laser.center_users = 8 is invalid"):
        small_config(laser={"center_users": 8})


@pytest.mark.parametrize("source", ["embedding", "sequence"])
def test_an_item_prefix_reads_the_configured_id_vector(sasrec_run, llm, source):
    model, _, _ = build_laser(small_config(laser={"item_id_vector": source}), sasrec_run, llm)
    model.eval()
    ids = torch.tensor([[3], [7]])
    with torch.no_grad():
        item_prefix, _ = model.make_prefix(ids, 2, items=True)
        user_prefix, _ = model.make_prefix(ids, 2)  # a one-item user history always reads SASRec's output
        vectors = model.sasrec.item_embedding(ids) if source == "embedding" else model.sasrec(ids)
        torch.testing.assert_close(item_prefix, model.mformer(vectors, ids != 0).prefix)
        torch.testing.assert_close(user_prefix, model.mformer(model.sasrec(ids), ids != 0).prefix)
    assert torch.equal(item_prefix, user_prefix) == (source == "sequence")


def test_defaults_are_the_measured_combination_and_laser_paper_toml_is_the_paper():
    defaults = load_config(None)
    assert (defaults.laser.prefix, defaults.laser.cf_position, defaults.laser.fusion) == ("free", "after_text", "gated")
    assert defaults.llm.num_layers == 8 and defaults.laser.center and defaults.text.max_history_items == 3
    paper = load_config(Path(__file__).resolve().parent.parent / "examples" / "laser_paper.toml")
    assert (paper.laser.prefix, paper.laser.cf_position, paper.laser.fusion) == ("mformer", "prefix", "none")
    assert paper.llm.num_layers == 0 and not paper.laser.center and paper.text.max_history_items == 10
    assert (paper.mformer.hidden_size, paper.mformer.num_blocks, paper.mformer.num_experts) == (768, 12, 8)
    assert (paper.laser.temperature, paper.laser.stage1_epochs, paper.laser.stage2_epochs) == (0.05, 15, 5)
    assert (paper.laser.lr, paper.laser.batch_size, paper.laser.valid_users) == (1e-4, 4, 0)
