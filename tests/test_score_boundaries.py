"""The scoring job's boundaries: what it refuses before any work (OUT naming a file, artefacts other than the pinned
ones, manifest names and external data that leave the artefact directory), users it has nothing to recommend to, and
a real job in an interpreter where torch cannot be imported."""

import json
import shutil
import subprocess
import sys

import polars as pl
import pytest
from test_score import _recs, _users, artifacts  # noqa: F401 (the tiny artefacts, built once per session)
from typer.testing import CliRunner

from laser_batch.artifacts import MANIFEST, load_manifest, manifest_sha256
from laser_batch.cli import app
from laser_batch.errors import ArtifactError, InputError
from laser_batch.files import sha256_file
from laser_batch.score import Recommender, score_users


def _write(df, path):
    df.write_parquet(path)
    return path


def _catalogue(art):
    return pl.read_parquet(art / "item_ids.parquet").sort("index")["item_id"].to_list()


def _cli(*args):
    """(exit code, stderr lines) of the CLI in this process."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.stderr.strip().splitlines()


def test_a_user_with_no_eligible_item_is_rejected_and_not_counted_as_scored(artifacts, tmp_path):  # noqa: F811
    art = artifacts / "laser_art"
    catalogue = _catalogue(art)
    users = pl.DataFrame({"user_id": [1, 2, 3], "history": [catalogue * 3, catalogue[2:], catalogue[:5]]})
    path = _write(users, tmp_path / "users.parquet")
    summary = score_users(path, art, tmp_path / "out", top_k=5)
    recs = _recs(tmp_path / "out")
    assert pl.read_parquet(tmp_path / "out" / "rejects.parquet").rows() == [(1, "no eligible items")]
    assert summary["users_scored"] == 2 and summary["users_in"] == 3
    assert summary["users_rejected"] == {"null user_id": 0, "duplicate user": 0, "empty history": 0,
                                         "no known items": 0, "no eligible items": 1}
    assert 1 not in recs["user_id"].to_list()
    # Fewer eligible items than K: the user gets every one of them.
    two = recs.filter(pl.col("user_id") == 2)
    assert two["rank"].to_list() == [1, 2] and sorted(two["item_id"]) == sorted(catalogue[:2])
    assert recs.filter(pl.col("user_id") == 3).height == 5
    # With the history included every item is eligible again.
    included = score_users(path, art, tmp_path / "included", top_k=5, include_history=True)
    assert included["users_scored"] == 3 and included["users_rejected"]["no eligible items"] == 0


def test_out_dir_and_artefact_errors(artifacts, tmp_path):  # noqa: F811
    path = _write(_users(artifacts, 5), tmp_path / "users.parquet")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("something")
    with pytest.raises(InputError, match="not empty; pass --resume"):
        score_users(path, artifacts / "laser_art", tmp_path / "out")
    score_users(path, artifacts / "laser_art", tmp_path / "out", overwrite=True)
    assert not (tmp_path / "out" / "x").exists()
    broken = tmp_path / "art"
    shutil.copytree(artifacts / "laser_art", broken)
    (broken / "sasrec.onnx").write_bytes(b"x" + (broken / "sasrec.onnx").read_bytes()[1:])
    with pytest.raises(ArtifactError, match="sasrec.onnx: checksum does not match"):
        score_users(path, broken, tmp_path / "out2")
    (broken / "item_matrix.npy").unlink()
    with pytest.raises(ArtifactError, match="listed in the manifest but missing"):
        Recommender(broken)


def test_out_naming_a_file_is_one_line_before_any_model_work(artifacts, tmp_path):  # noqa: F811
    path = _write(_users(artifacts, 3), tmp_path / "users.parquet")
    (tmp_path / "recs").write_text("a file")
    # The model does not exist: the OUT check comes first.
    code, lines = _cli("score", path, "--model", tmp_path / "no-model", "--out", tmp_path / "recs")
    assert code == InputError.exit_code == 2
    assert lines == [f"error: {tmp_path / 'recs'}: is a file, not a directory; --out names the directory to write "
                     "the results to"]
    assert (tmp_path / "recs").read_text() == "a file"


def test_expect_manifest_sha256_pins_the_artefacts_before_any_user_is_read(artifacts, tmp_path):  # noqa: F811
    art = artifacts / "laser_art"
    pinned = manifest_sha256(art)
    path = _write(_users(artifacts, 4), tmp_path / "users.parquet")
    summary = score_users(path, art, tmp_path / "ok", expect_manifest_sha256=pinned.upper())
    assert summary["manifest_sha256"] == pinned and summary["users_scored"] == 4
    other = "0123456789abcdef" * 4
    message = (f"{art / MANIFEST}: sha256 {pinned}, but --expect-manifest-sha256 is {other}; these are not the "
               "pinned artefacts")
    # The users file does not exist: the pin is checked before it is opened.
    with pytest.raises(ArtifactError) as refused:
        score_users(tmp_path / "no-users.parquet", art, tmp_path / "out", expect_manifest_sha256=other)
    assert str(refused.value) == message and not (tmp_path / "out").exists()
    code, lines = _cli("score", path, "--model", art, "--out", tmp_path / "cli", "--expect-manifest-sha256", other)
    assert (code, lines) == (2, [f"error: {message}"]) and not (tmp_path / "cli").exists()
    code, lines = _cli("score", path, "--model", art, "--out", tmp_path / "cli", "--expect-manifest-sha256", "abc")
    assert (code, lines) == (2, ["error: --expect-manifest-sha256 abc: expected 64 hex digits (the sha256 of "
                                 "ARTIFACTS/manifest.json)"])


def _edit_manifest(art, edit):
    manifest = json.loads((art / MANIFEST).read_text())
    edit(manifest)
    (art / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


@pytest.mark.parametrize("where", ["relative", "absolute"])
def test_a_manifest_name_outside_the_directory_is_refused_even_when_its_checksum_holds(artifacts, tmp_path,  # noqa: F811
                                                                                      where):
    art = tmp_path / "art"
    shutil.copytree(artifacts / "laser_art", art)
    (tmp_path / "elsewhere").mkdir()
    shutil.move(art / "sasrec.onnx", tmp_path / "elsewhere" / "sasrec.onnx")
    name = "../elsewhere/sasrec.onnx" if where == "relative" else str(tmp_path / "elsewhere" / "sasrec.onnx")

    def point_outside(manifest):
        manifest["files"][name] = manifest["files"].pop("sasrec.onnx")  # the same bytes: size and sha256 hold
        manifest["graphs"]["sasrec"]["file"] = name

    manifest = _edit_manifest(art, point_outside)
    assert all(sha256_file(art / n) == record["sha256"] for n, record in manifest["files"].items())
    message = f"{art / MANIFEST}: file name {name!r} is not a plain name inside the artefact directory"
    with pytest.raises(ArtifactError) as refused:
        load_manifest(art)
    assert str(refused.value) == message
    path = _write(_users(artifacts, 3), tmp_path / "users.parquet")
    code, lines = _cli("score", path, "--model", art, "--out", tmp_path / "out")
    assert (code, lines) == (2, [f"error: {message}"]) and not (tmp_path / "out" / "_SUCCESS").exists()


def test_external_data_outside_the_directory_is_refused_even_when_the_checksums_hold(artifacts, tmp_path):  # noqa: F811
    import onnx
    from onnx.external_data_helper import uses_external_data

    art = tmp_path / "art"
    shutil.copytree(artifacts / "laser_art", art)
    graph = art / "sasrec.onnx"
    onnx.save_model(onnx.load(str(graph)), str(graph), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="sasrec.onnx.data", size_threshold=0)
    # Point the weights at a file beside ARTIFACTS instead of inside it, and make the manifest agree.
    shutil.move(art / "sasrec.onnx.data", tmp_path / "stolen.data")
    model = onnx.load(str(graph), load_external_data=False)
    moved = 0
    for tensor in model.graph.initializer:
        if uses_external_data(tensor):
            next(e for e in tensor.external_data if e.key == "location").value = "../stolen.data"
            moved += 1
    assert moved
    graph.write_bytes(model.SerializeToString())
    _edit_manifest(art, lambda m: m["files"].update(
        {"sasrec.onnx": {"bytes": graph.stat().st_size, "sha256": sha256_file(graph)}}))
    message = f"{graph}: external data location '../stolen.data' is not a plain name inside the artefact directory"
    with pytest.raises(ArtifactError) as refused:
        load_manifest(art)
    assert str(refused.value) == message
    path = _write(_users(artifacts, 3), tmp_path / "users.parquet")
    assert _cli("score", path, "--model", art, "--out", tmp_path / "out") == (2, [f"error: {message}"])


# Runs the CLI's main() with the arguments after "-c" in an interpreter where torch looks installed (its spec is
# found, as Polars' optional-dependency probes look for it) but every import of it, or of a submodule, raises.
NO_TORCH = """
import importlib.abc
import importlib.machinery
import sys

tried = []

class NoTorch(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            return importlib.machinery.ModuleSpec(name, self)
        return None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        tried.append(module.__name__)
        raise ImportError(f"{module.__name__} is blocked in this interpreter")

sys.meta_path.insert(0, NoTorch())
try:
    import torch
    sys.exit("torch could be imported")
except ImportError:
    tried.clear()
from laser_batch.cli import main

sys.argv = ["laser-batch", *sys.argv[1:]]
try:
    main()
    code = 0
except SystemExit as e:
    code = e.code
print("torch imports tried:", tried, "torch in sys.modules:", "torch" in sys.modules)
sys.exit(code)
"""


@pytest.mark.parametrize("kind", ["laser_art", "sasrec_art"])
def test_a_real_score_job_runs_where_torch_cannot_be_imported(artifacts, tmp_path, kind):  # noqa: F811
    users = _users(artifacts, 12)
    path = _write(users, tmp_path / "users.parquet")
    done = subprocess.run([sys.executable, "-c", NO_TORCH, "score", str(path), "--model", str(artifacts / kind),
                           "--out", str(tmp_path / "out"), "--top-k", "5", "--device", "cpu"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "torch imports tried: [] torch in sys.modules: False"
    assert "12 users scored, 0 rejected" in done.stdout
    assert (tmp_path / "out" / "_SUCCESS").exists()
    recs = _recs(tmp_path / "out")
    assert sorted(recs["user_id"].unique()) == sorted(users["user_id"]) and recs.height == 12 * 5
