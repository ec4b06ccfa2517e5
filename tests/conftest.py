import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

EXAMPLE_CONFIG = Path(__file__).resolve().parent.parent / "examples" / "sasrec.toml"


@pytest.fixture(scope="session")
def example_dir(tmp_path_factory):
    """The embedded example dataset (deterministic), written once per test session."""
    from laser_batch.examples.synthetic import write_example

    out = tmp_path_factory.mktemp("example")
    write_example(out)
    return out


@pytest.fixture(scope="session")
def fast_config():
    """The example's SASRec config: small settings under which SASRec learns the example in seconds."""
    return EXAMPLE_CONFIG
