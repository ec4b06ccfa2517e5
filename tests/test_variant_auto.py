"""`score --variant`: auto (the default) runs the export's recommended CPU variant or the exported graph and says
which and why; fp32 is the exported graph; a variant the artefacts lack is one line before OUT is touched."""

import json
import shutil

import numpy as np
import polars as pl
import pytest
from test_ray import ray_cluster, users_dir  # noqa: F401 (a local Ray cluster; users with duplicates and rejects)
from test_score import _recs, _users, artifacts  # noqa: F401 (the tiny artefacts, built once)
from typer.testing import CliRunner

from laser_batch.artifacts import MANIFEST, load_manifest, resolve_variant
from laser_batch.cli import app
from laser_batch.errors import InputError
from laser_batch.exporters.export import export_run
from laser_batch.score import score_users

CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"
NO_VARIANTS = "no quantised variants in the manifest"
NONE_PASSED = "no quantised variant passed the export's quality gate (recommended_cpu_variant is null)"


@pytest.fixture(scope="module")
def quantised(artifacts, tmp_path_factory):  # noqa: F811
    """The tiny Laser run exported with an nbits8 user encoder; `recommended(value)` is a copy of it whose manifest
    says recommended_cpu_variant = value (manifest.json is not among the files it checksums)."""
    root = tmp_path_factory.mktemp("quantised")
    export_run(artifacts / "run", root / "art", quantize=["nbits8"])

    def recommended(value):
        copy = root / f"recommended_{value}"
        if not copy.exists():
            shutil.copytree(root / "art", copy)
            manifest = json.loads((copy / MANIFEST).read_text())
            manifest["graphs"]["user_encoder"]["recommended_cpu_variant"] = value
            (copy / MANIFEST).write_text(json.dumps(manifest))
        return copy

    return recommended


def _users_file(artifacts, tmp_path, n=30):  # noqa: F811
    path = tmp_path / "users.parquet"
    _users(artifacts, n).write_parquet(path)
    return path


def _used(summary):
    return summary["variant"], summary["variant_requested"], summary["variant_reason"]


def test_auto_on_the_cpu_runs_the_recommended_variant_exactly_as_naming_it(artifacts, quantised, tmp_path):  # noqa: F811
    users, art = _users_file(artifacts, tmp_path), quantised("nbits8")
    auto = score_users(users, art, tmp_path / "auto", top_k=5, device="cpu")
    named = score_users(users, art, tmp_path / "named", top_k=5, device="cpu", variant="nbits8")
    fp32 = score_users(users, art, tmp_path / "fp32", top_k=5, device="cpu", variant="fp32")
    assert _used(auto) == ("nbits8", "auto", "the export's recommended_cpu_variant: the fastest variant that passed "
                                             "its quality gate")
    assert _used(named) == ("nbits8", "nbits8", "asked for") and _used(fp32) == ("fp32", "fp32", "asked for")
    assert _recs(tmp_path / "auto").equals(_recs(tmp_path / "named"))  # the same graph, the same batches
    # and it is not the exported graph: quantisation moves every score a little
    assert np.abs(_recs(tmp_path / "auto")["score"].to_numpy() - _recs(tmp_path / "fp32")["score"].to_numpy()).max() > 0


def test_auto_without_a_passing_variant_or_without_variants_runs_the_exported_graph_and_says_why(
        artifacts, quantised, tmp_path):  # noqa: F811
    users = _users_file(artifacts, tmp_path)
    none_passed = score_users(users, quantised(None), tmp_path / "none", top_k=5, device="cpu")
    without = score_users(users, artifacts / "laser_art", tmp_path / "without", top_k=5, device="cpu")
    score_users(users, quantised(None), tmp_path / "fp32", top_k=5, device="cpu", variant="fp32")
    assert _used(none_passed) == ("fp32", "auto", NONE_PASSED)
    assert _used(without) == ("fp32", "auto", NO_VARIANTS)
    assert json.loads((tmp_path / "none" / "summary.json").read_text())["variant_reason"] == NONE_PASSED
    assert _recs(tmp_path / "none").equals(_recs(tmp_path / "fp32"))


def test_fp32_is_the_old_empty_variant_the_exported_graph(artifacts, quantised, tmp_path):  # noqa: F811
    users, art = _users_file(artifacts, tmp_path), quantised("nbits8")  # auto would run nbits8 here
    old = score_users(users, art, tmp_path / "old", top_k=5, device="cpu", variant="")
    fp32 = score_users(users, art, tmp_path / "fp32", top_k=5, device="cpu", variant="fp32")
    nbits8 = score_users(users, art, tmp_path / "nbits8", top_k=5, device="cpu", variant="nbits8")
    assert _used(old) == ("fp32", "", "asked for") and fp32["variant"] == "fp32" and nbits8["variant"] == "nbits8"
    assert _recs(tmp_path / "old").equals(_recs(tmp_path / "fp32"))
    assert not _recs(tmp_path / "old")["score"].equals(_recs(tmp_path / "nbits8")["score"])


def test_an_unknown_variant_is_one_line_exit_2_listing_those_present_before_out_is_touched(artifacts, quantised,  # noqa: F811
                                                                                          tmp_path):
    users, art = _users_file(artifacts, tmp_path), quantised("nbits8")
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "old.txt").write_text("last night")
    cases = [(art, tmp_path / "new", [], f"--variant nbits9: not in {art / MANIFEST}; present: auto, fp32, nbits8"),
             (art, kept, ["--overwrite"], "--variant nbits9: not in"),
             (art, tmp_path / "plan", ["--dry-run"], "--variant nbits9: not in"),
             (artifacts / "sasrec_art", tmp_path / "sasrec", [],
              f"--variant nbits9: not in {artifacts / 'sasrec_art' / MANIFEST}; present: auto, fp32 (SASRec artefacts "
              "have no user encoder to quantise)")]
    for model, out, extra, message in cases:
        result = CliRunner().invoke(app, ["score", str(users), "--model", str(model), "--out", str(out), "--variant",
                                          "nbits9", *extra])
        assert result.exit_code == 2, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {message}"), lines
    assert not (tmp_path / "new").exists() and not (tmp_path / "plan").exists() and not (tmp_path / "sasrec").exists()
    assert [p.name for p in kept.iterdir()] == ["old.txt"]
    with pytest.raises(InputError, match="--variant nbits8: not in .*present: auto, fp32 "):  # a quantised name
        score_users(users, artifacts / "sasrec_art", tmp_path / "s", variant="nbits8")


def test_sasrec_auto_runs_its_exported_graph(artifacts, tmp_path):  # noqa: F811
    summary = score_users(_users_file(artifacts, tmp_path), artifacts / "sasrec_art", tmp_path / "out", top_k=5)
    assert _used(summary) == ("fp32", "auto", "SASRec artefacts have no user-encoder variants")
    assert summary["users_scored"] == 30


def test_resolution_by_provider_dtype_and_manifest(quantised):
    manifest = load_manifest(quantised("nbits8"), verify=False, check_graphs=False)
    encoder = manifest["graphs"]["user_encoder"]
    assert resolve_variant(manifest, "auto", CPU)[:2] == (encoder["variants"]["nbits8"]["file"], "nbits8")
    on_gpu = resolve_variant(manifest, "auto", CUDA)  # int8 CPU kernels are not for the GPU
    assert on_gpu[:2] == (encoder["file"], "fp32") and CUDA in on_gpu.reason
    assert resolve_variant(manifest, "nbits8", CUDA)[1:] == ("nbits8", "asked for")  # asked for, it runs
    skipped = {**manifest, "graphs": {**manifest["graphs"], "user_encoder": {
        **encoder, "variants": {"nbits8": encoder["variants"]["nbits8"], "int8-smooth": {"skipped": "not Llama"}},
        "recommended_cpu_variant": "int8-smooth"}}}
    assert resolve_variant(skipped, "auto", CPU)[1:] == (
        "fp32", "recommended_cpu_variant 'int8-smooth' is not a variant in the manifest")
    with pytest.raises(InputError, match="present: auto, fp32, nbits8$"):  # a skipped scheme is not present
        resolve_variant(skipped, "int8-smooth", CPU)
    with pytest.raises(InputError, match="--variant fp16: not in"):  # an fp32 export has no fp16 graph
        resolve_variant(manifest, "fp16", CPU)
    fp16 = {**manifest, "settings": {**manifest["settings"], "graph_dtype": "float16"},
            "graphs": {**manifest["graphs"], "user_encoder": {"file": encoder["file"]}}}
    assert resolve_variant(fp16, "auto", CPU)[1:] == ("fp16", NO_VARIANTS)
    assert resolve_variant(fp16, "auto", CUDA)[:2] == (encoder["file"], "fp16")
    assert resolve_variant(fp16, "fp16", CUDA)[1:] == ("fp16", "asked for")
    assert resolve_variant(fp16, "fp32", CUDA)[1] == "fp16"  # fp32 has always meant "the exported graph"


def test_incremental_reuse_keys_on_the_resolved_variant(artifacts, quantised, tmp_path):  # noqa: F811
    users, art = _users_file(artifacts, tmp_path), quantised("nbits8")
    score_users(users, art, tmp_path / "named", top_k=5, device="cpu", variant="nbits8")
    score_users(users, art, tmp_path / "fp32", top_k=5, device="cpu", variant="fp32")
    same = score_users(users, art, tmp_path / "auto", top_k=5, device="cpu", previous=str(tmp_path / "named"))
    assert same["incremental"]["rescore_reason"] is None
    assert same["incremental"]["reused"] == same["users_scored"] == 30 and same["incremental"]["scored"] == 0
    assert _recs(tmp_path / "auto").equals(_recs(tmp_path / "named"))
    # last night ran the exported graph; tonight auto chooses nbits8: nothing can be reused
    moved = score_users(users, art, tmp_path / "moved", top_k=5, device="cpu", previous=str(tmp_path / "fp32"))
    assert moved["incremental"]["rescore_reason"] == "options changed: variant"
    assert moved["incremental"]["reused"] == 0 and moved["incremental"]["scored"] == 30


def test_dry_run_prints_the_resolved_variant_and_why(artifacts, quantised, tmp_path):  # noqa: F811
    users = _users_file(artifacts, tmp_path)
    for model, variant, reason in [(quantised("nbits8"), "nbits8", "the export's recommended_cpu_variant: the "
                                    "fastest variant that passed its quality gate"),
                                   (artifacts / "laser_art", "fp32", NO_VARIANTS)]:
        result = CliRunner().invoke(app, ["score", str(users), "--model", str(model), "--out", str(tmp_path / "x"),
                                          "--device", "cpu", "--dry-run"])
        assert result.exit_code == 0, result.output
        plan = dict(line.split(None, 1) for line in result.stdout.strip().splitlines())
        assert (plan["variant"], plan["variant_requested"], plan["variant_reason"]) == (variant, "auto", reason)
    assert not (tmp_path / "x").exists()


def test_ray_resolves_auto_once_for_its_actors_and_reports_it(artifacts, quantised, users_dir, ray_cluster,  # noqa: F811
                                                             tmp_path):
    from laser_batch.ray_engine import score_ray

    art = quantised("nbits8")
    local = score_users(users_dir / "all.parquet", art, tmp_path / "local", top_k=5, chunk_size=16, device="cpu")
    ray = score_ray(str(users_dir / "dir"), str(art), str(tmp_path / "ray"), top_k=5, chunk_size=16, workers=1)
    assert _used(ray) == _used(local) == ("nbits8", "auto", "the export's recommended_cpu_variant: the fastest "
                                                            "variant that passed its quality gate")
    mine, theirs = _recs(tmp_path / "ray"), _recs(tmp_path / "local")  # duplicates were scored on the driver
    assert mine.select("user_id", "rank", "item_id").equals(theirs.select("user_id", "rank", "item_id"))
    np.testing.assert_allclose(mine["score"].to_numpy(), theirs["score"].to_numpy(), atol=1e-5)
    job = json.loads((tmp_path / "ray" / "_job.json").read_text())
    assert job["variant"] == "nbits8" and ray["incremental"]["fingerprint"]["variant"] == "nbits8"
    assert pl.read_parquet(tmp_path / "ray" / "rejects.parquet").height == sum(ray["users_rejected"].values())
