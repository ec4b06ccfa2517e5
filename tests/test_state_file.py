"""The pickle-free state file behind Laser's resume: what goes in comes out, and nothing else is read."""

import json

import numpy as np
import pytest
import torch

from laser_batch.errors import CheckpointError
from laser_batch.state_file import read_state, write_state


def test_a_tree_of_tensors_and_json_values_comes_back_as_it_went_in(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(4, 3)).sum().backward()
    optimizer.step()
    rng = np.random.default_rng(7)
    tree = {"optimizer": optimizer.state_dict(), "numpy_rng": rng.bit_generator.state,
            "torch_rng": torch.get_rng_state(), "best": None, "seconds": [0.25, 1e-300], "pair": (1, "a"),
            "scalar": torch.tensor(3.5),
            "shared": {"a": model.weight, "b": model.weight}}  # one tensor under two names
    write_state(tmp_path / "s.safetensors", tree)
    back = read_state(tmp_path / "s.safetensors")

    assert back["optimizer"]["param_groups"] == optimizer.state_dict()["param_groups"]  # tuples (betas) included
    assert isinstance(back["optimizer"]["param_groups"][0]["betas"], tuple)
    assert set(back["optimizer"]["state"]) == {0, 1}  # integer keys, as load_state_dict needs them
    for key, saved in optimizer.state_dict()["state"][0].items():
        loaded = back["optimizer"]["state"][0][key]
        assert torch.equal(loaded, saved) and loaded.dtype == saved.dtype
    assert back["numpy_rng"] == rng.bit_generator.state  # 128-bit integers survive JSON
    assert torch.equal(back["torch_rng"], torch.get_rng_state()) and back["torch_rng"].dtype == torch.uint8
    assert back["best"] is None and back["seconds"] == [0.25, 1e-300] and back["pair"] == (1, "a")
    assert back["scalar"].shape == () and back["scalar"].item() == 3.5
    shared = back["shared"]
    assert torch.equal(shared["a"], model.weight.detach()) and torch.equal(shared["b"], shared["a"])
    restored = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=0.1)
    restored.load_state_dict(back["optimizer"])
    assert restored.state_dict()["param_groups"] == optimizer.state_dict()["param_groups"]
    assert [p.name for p in tmp_path.iterdir()] == ["s.safetensors"]  # no temporary file left behind


def test_values_that_would_need_pickle_are_refused_when_written(tmp_path):
    with pytest.raises(TypeError, match="cannot store a set without pickle"):
        write_state(tmp_path / "s.safetensors", {"ids": {1, 2}})
    with pytest.raises(TypeError, match="keys must be"):
        write_state(tmp_path / "s.safetensors", {"$tensor": 1})
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("content", [
    b"not a state file",
    b"PK\x03\x04" + b"\x00" * 64,  # the start of a torch.save zip archive
])
def test_anything_but_a_state_file_is_a_one_line_checkpoint_error(tmp_path, content):
    path = tmp_path / "resume.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=r"resume.safetensors: not a laser-batch state file \(") as caught:
        read_state(path)
    assert len(str(caught.value).splitlines()) == 1


def test_a_safetensors_file_without_our_state_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(CheckpointError, match="not a laser-batch state file"):
        read_state(tmp_path / "plain.safetensors")
    save_file({"x": torch.zeros(2)}, str(tmp_path / "missing.safetensors"),
              metadata={"laser_batch_state": json.dumps({"w": {"$tensor": "w"}})})
    with pytest.raises(CheckpointError, match="not a laser-batch state file"):
        read_state(tmp_path / "missing.safetensors")
