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
    ("[laser]\nprefix = 'qformer'\n", "laser.prefix = 'qformer'.*mformer, free, none"),
    ("[laser]\npooling = 'max'\n", "laser.pooling = 'max'"),
    ("[laser]\ntemperature = 0\n", "laser.temperature = 0"),
    ("[laser]\nstage1_epochs = 0\nstage2_epochs = 0\n", "at least one epoch"),
    ("[mformer]\ntop_k = 9\n", r"mformer.top_k = 9.*\[1, num_experts=8\]"),
    ("[mformer]\npreset = 'huge'\n", "mformer.preset = 'huge'.*paper"),
    ("[mformer]\nnum_experts = 0\n", "mformer.num_experts = 0"),
    ("[llm]\ndtype = 'float16'\n", "llm.dtype = 'float16'.*float32, bfloat16"),
    ("[text]\nitem_line = '>>{index}.'\n", "text.item_line.*{title}"),
    ("[text]\ntext_columns = 'brand'\n", "text.text_columns = 'brand'"),
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


def test_paper_preset_sets_the_paper_sizes(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[mformer]\npreset = 'paper'\n")
    m = load_config(path).mformer
    assert (m.num_experts, m.num_queries, m.hidden_size, m.num_blocks, m.cross_attention_freq) == (8, 32, 768, 12, 2)
