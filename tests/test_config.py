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


def _write(directory, name, text):
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_extends_overrides_the_base_key_by_key(tmp_path):
    _write(tmp_path, "base.toml", "[sasrec]\nhidden_size = 32\ndropout = 0.1\n[train]\nepochs = 7\n")
    # relative to the extending file, not to the working directory
    child = _write(tmp_path / "variants", "child.toml", 'extends = "../base.toml"\n[sasrec]\ndropout = 0.3\n')
    cfg = load_config(child, train={"seed": 3})
    assert (cfg.sasrec.hidden_size, cfg.sasrec.dropout) == (32, 0.3)  # the base's key kept, the child's wins
    assert (cfg.train.epochs, cfg.train.seed) == (7, 3)  # a table only the base has; overrides still apply last


def test_extends_chains(tmp_path):
    _write(tmp_path, "a.toml", "[train]\nepochs = 1\nlr = 0.5\nseed = 1\n")
    _write(tmp_path, "b.toml", 'extends = "a.toml"\n[train]\nlr = 0.25\nseed = 2\n')
    c = _write(tmp_path, "c.toml", 'extends = "b.toml"\n[train]\nseed = 3\n')
    t = load_config(c).train
    assert (t.epochs, t.lr, t.seed) == (1, 0.25, 3)


@pytest.mark.parametrize("files, start, message", [
    ({"a.toml": 'extends = "a.toml"\n'}, "a.toml", r"a\.toml: extends = 'a\.toml' makes a cycle"),
    ({"a.toml": 'extends = "b.toml"\n', "b.toml": 'extends = "a.toml"\n'}, "a.toml",
     r"b\.toml: extends = 'a\.toml' makes a cycle \(.*a\.toml -> .*b\.toml -> .*a\.toml\)"),
    ({"a.toml": 'extends = "gone.toml"\n'}, "a.toml",
     r"a\.toml: extends = 'gone\.toml', but .*gone\.toml is not a file"),
    ({"a.toml": "extends = 3\n"}, "a.toml", r"a\.toml: extends = 3 is invalid"),
    # unknown keys are still errors, in the base as in the extending file
    ({"a.toml": 'extends = "b.toml"\n[sasrec]\nhiden_size = 3\n', "b.toml": ""}, "a.toml", "sasrec.hiden_size"),
    ({"a.toml": 'extends = "b.toml"\n', "b.toml": "[trian]\nepochs = 3\n"}, "a.toml", "unknown config key.*trian"),
    ({"a.toml": 'extends = "b.toml"\n', "b.toml": "[sasrec\n"}, "a.toml", r"b\.toml: not valid TOML"),
])
def test_bad_extends_is_one_line_naming_the_file(tmp_path, files, start, message):
    for name, text in files.items():
        _write(tmp_path, name, text)
    with pytest.raises(ConfigError, match=message) as error:
        load_config(tmp_path / start)
    assert "\n" not in str(error.value)


def test_the_paper_example_is_the_papers_setup_whatever_the_defaults():
    """examples/laser_paper.toml: CF tokens as prefix, no fusion, all LLM layers, the paper's M-Former and tau."""
    from pathlib import Path

    config = load_config(Path(__file__).resolve().parent.parent / "examples" / "laser_paper.toml")
    assert (config.laser.prefix, config.laser.cf_position, config.laser.fusion) == ("mformer", "prefix", "none")
    assert config.llm.num_layers == 0 and not config.laser.center
    assert (config.mformer.num_experts, config.mformer.num_queries, config.mformer.hidden_size,
            config.mformer.num_blocks) == (8, 32, 768, 12)
    assert (config.laser.temperature, config.laser.stage1_epochs, config.laser.stage2_epochs) == (0.05, 15, 5)
