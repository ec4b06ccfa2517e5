import pytest

from laser_batch.config import load_config
from laser_batch.errors import ConfigError


def test_defaults_and_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[sasrec]\nhidden_size = 32\n[train]\nlr = 1\n")
    cfg = load_config(path, train={"epochs": 3, "seed": None})
    assert cfg.sasrec.hidden_size == 32 and cfg.train.epochs == 3
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.train.seed == 42  # None overrides are ignored


@pytest.mark.parametrize("text, message", [
    ("[sasrec]\nhiden_size = 32\n", "sasrec.hiden_size"),
    ("[trian]\nepochs = 3\n", "unknown config key.*trian"),
    ("[sasrec]\nhidden_size = -1\n", r"sasrec.hidden_size = -1"),
    ("[sasrec]\nhidden_size = 'big'\n", r"sasrec.hidden_size = 'big'.*int"),
    ("[sasrec]\nloss = 'mse'\n", "sasrec.loss = 'mse'.*ce, bce"),
    ("[sasrec]\nhidden_size = 50\nnum_heads = 3\n", "sasrec.num_heads"),
    ("[train]\nselect_metric = 'AUC'\n", "train.select_metric"),
    ("[train]\nepochs = true\n", "train.epochs = True"),
    ("sasrec = 3\n", "sasrec must be a table"),
    ("[sasrec\n", "not valid TOML"),
])
def test_bad_config_names_the_option(tmp_path, text, message):
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.toml")
