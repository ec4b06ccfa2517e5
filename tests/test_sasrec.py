import json

import pytest
import torch

from laser_batch.checkpoint import CONFIG_FILE, load_sasrec, save_sasrec
from laser_batch.config import SASRecConfig
from laser_batch.errors import CheckpointError
from laser_batch.sasrec import SASRec
from laser_batch.sequences import Sequences

NUM_ITEMS = 30


def _model(**overrides) -> SASRec:
    torch.manual_seed(0)
    cfg = dict(hidden_size=16, num_blocks=2, num_heads=2, max_len=12, dropout=0.2)
    return SASRec(SASRecConfig(**{**cfg, **overrides}), NUM_ITEMS)


def _batch() -> torch.Tensor:
    return torch.tensor([[0, 0, 3, 4, 5, 6], [0, 0, 0, 0, 0, 9], [1, 2, 3, 4, 5, 6]])


def test_shapes_and_zero_padding():
    out = _model().eval()(_batch())
    assert out.shape == (3, 6, 16)
    assert torch.all(out[0, :2] == 0) and torch.all(out[1, :5] == 0)
    assert torch.isfinite(out).all()


def test_causal_future_items_do_not_change_earlier_positions():
    model = _model().eval()
    a = torch.tensor([[1, 2, 3, 4, 5]])
    b = torch.tensor([[1, 2, 3, 9, 8]])
    torch.testing.assert_close(model(a)[:, :3], model(b)[:, :3])
    assert not torch.allclose(model(a)[:, 3], model(b)[:, 3])


def test_padding_never_leaks_amount_of_padding_does_not_matter():
    model = _model().eval()
    short = model(torch.tensor([[3, 4, 5]]))
    long = model(torch.tensor([[0, 0, 0, 0, 3, 4, 5]]))[:, 4:]
    torch.testing.assert_close(short, long)
    # a sequence batched with a longer one gets the same vectors as alone
    together = model(torch.tensor([[0, 0, 3, 4, 5], [7, 8, 9, 1, 2]]))[0, 2:]
    torch.testing.assert_close(short[0], together)


def test_eval_mode_is_deterministic_and_train_mode_uses_dropout():
    model = _model()
    x = _batch()
    model.eval()
    torch.testing.assert_close(model(x), model(x))
    model.train()
    assert not torch.allclose(model(x), model(x))


@pytest.mark.parametrize("loss", ["ce", "bce"])
def test_a_few_steps_lower_the_loss(loss):
    model = _model(loss=loss, dropout=0.0)
    inputs = torch.tensor([[1, 2, 3, 4, 5, 6, 7], [0, 0, 8, 9, 10, 11, 12]])
    targets = torch.tensor([[2, 3, 4, 5, 6, 7, 8], [0, 0, 9, 10, 11, 12, 13]])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    torch.manual_seed(1)
    first = model.loss(inputs, targets).item()
    for _ in range(30):
        optimizer.zero_grad()
        model.loss(inputs, targets).backward()
        optimizer.step()
    torch.manual_seed(1)
    assert model.loss(inputs, targets).item() < 0.5 * first


def _sequences() -> Sequences:
    import numpy as np
    import polars as pl

    return Sequences(user_ids=pl.Series("user_id", [1]), item_ids=pl.Series("item_id", list(range(101, 131))),
                     seqs=[np.arange(1, 6)], dropped_users=0)


def test_checkpoint_round_trip_gives_identical_outputs(tmp_path):
    model = _model().eval()
    save_sasrec(tmp_path, model, _sequences(), {"best_epoch": 3})
    loaded, config = load_sasrec(tmp_path)
    assert config["best_epoch"] == 3 and config["sasrec"]["hidden_size"] == 16
    torch.testing.assert_close(loaded(_batch()), model(_batch()), rtol=0, atol=0)


def test_checkpoint_of_another_format_version_is_refused(tmp_path):
    save_sasrec(tmp_path, _model(), _sequences(), {})
    config = json.loads((tmp_path / CONFIG_FILE).read_text())
    config["format_version"] = 99
    (tmp_path / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="format version 99"):
        load_sasrec(tmp_path)


def test_incomplete_checkpoint_names_the_missing_file(tmp_path):
    save_sasrec(tmp_path, _model(), _sequences(), {})
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"missing model\.safetensors"):
        load_sasrec(tmp_path)
