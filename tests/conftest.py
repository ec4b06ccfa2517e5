import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Small, fast settings under which SASRec learns the example data in a few seconds.
FAST_CONFIG = """
[sasrec]
hidden_size = 32
max_len = 20
dropout = 0.2
[train]
epochs = 15
batch_size = 32
lr = 0.005
patience = 4
threads = 1
"""


@pytest.fixture(scope="session")
def example_dir(tmp_path_factory):
    """The embedded example dataset (deterministic), written once per test session."""
    from laser_batch.examples.synthetic import write_example

    out = tmp_path_factory.mktemp("example")
    write_example(out)
    return out


@pytest.fixture(scope="session")
def fast_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("config") / "fast.toml"
    path.write_text(FAST_CONFIG)
    return path
