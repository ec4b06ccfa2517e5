"""ONNX export: every part through Optimum, validated against torch, atomic, self-describing, tamper-evident."""

import json
import shutil

import numpy as np
import pytest
import torch
from test_laser import small_config

from laser_batch.artifacts import MANIFEST, Embedder, load_manifest
from laser_batch.checkpoint import load_laser
from laser_batch.config import LLMConfig
from laser_batch.encode import encode_users, laser_inputs
from laser_batch.errors import ArtifactError, CheckpointError, InputError
from laser_batch.exporters.export import export_run
from laser_batch.exporters.parts import TRACE_SHAPES
from laser_batch.exporters.validate import VALIDATION_SHAPES
from laser_batch.llm import build_tiny_llm, load_llm
from laser_batch.sequences import build_sequences
from laser_batch.train import train_sasrec
from laser_batch.train_laser import train_laser


def _llm(architecture):
    return load_llm(LLMConfig(source="tiny")) if architecture == "llama" else build_tiny_llm(architecture)


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def laser_run(request, tmp_path_factory):
    from laser_batch.examples.synthetic import write_example

    root = tmp_path_factory.mktemp(f"export_{request.param}")
    write_example(root / "data", users=80, items=40, seed=5)
    config = small_config(laser={"center": request.param == "llama"})
    train_sasrec(root / "data", root / "run", config)
    train_laser(root / "run", config, llm=_llm(request.param))
    return root / "run", request.param


def _run_data(run):
    """The run's data set and its sequences."""
    from laser_batch.checkpoint import read_run_info
    from laser_batch.contracts import load_data_dir

    dataset = load_data_dir(read_run_info(run)["data_dir"])
    return dataset, build_sequences(dataset.interactions)


def _held_out_and_torch_users(run, architecture, count):
    """Test-split histories of the run's data, and their embeddings by the torch model."""
    from laser_batch.config import TextConfig

    model, _, config = load_laser(run, llm=_llm(architecture))
    dataset, sequences = _run_data(run)
    histories = sequences.split("test")[0][:count]
    inputs = laser_inputs(model.llm, dataset.items, sequences, TextConfig(**config["text"]),
                          model.sasrec.config.max_len)
    return histories, encode_users(model, inputs, histories, batch_size=7).numpy()


def test_every_part_exports_validates_and_matches_torch_end_to_end(laser_run, tmp_path):
    run, architecture = laser_run
    manifest = export_run(run, tmp_path / "art", llm=_llm(architecture))
    assert set(manifest["graphs"]) == {"sasrec", "mformer", "user_encoder"}
    for graph in manifest["graphs"].values():
        assert [p["shape"] for p in graph["parity"]] == list(VALIDATION_SHAPES)
        assert all(p["shape"] != TRACE_SHAPES for p in graph["parity"])
        for check in graph["parity"]:
            floats = [v for k, v in check.items() if k != "shape" and "max_abs_diff" in v]
            assert floats and all(v["max_abs_diff"] <= 1e-3 and v["min_cosine"] >= 0.9999 for v in floats)
    assert manifest["end_to_end"]["top10"]["same_set"] >= 0.99 and manifest["end_to_end"]["users"] == 80

    # Independently of the export's own check: the ONNX path embeds held-out users as torch does.
    histories, reference = _held_out_and_torch_users(run, architecture, 9)
    embedder = Embedder(tmp_path / "art", device="cpu")
    assert embedder.providers == ["CPUExecutionProvider"]
    got = embedder.embed(histories)
    np.testing.assert_allclose(got, reference, atol=1e-4)
    assert got.shape == (9, _llm(architecture).hidden_size)


def test_manifest_round_trips_and_lists_every_file(laser_run, tmp_path):
    run, architecture = laser_run
    written = export_run(run, tmp_path / "art", llm=_llm(architecture))
    loaded = load_manifest(tmp_path / "art")
    assert loaded == json.loads(json.dumps(written))
    files = {p.name for p in (tmp_path / "art").iterdir()} - {MANIFEST}
    assert set(loaded["files"]) == files
    assert {"sasrec.onnx", "mformer.onnx", "user_encoder.onnx", "item_matrix.npy", "item_ids.parquet",
            "items.parquet", "tokenizer.json"} <= files
    assert loaded["opset"] == 18 and loaded["versions"]["optimum"] == "2.1.0"
    assert loaded["graphs"]["user_encoder"]["inputs"]["input_ids"] == {"0": "batch_size", "1": "sequence_length"}
    assert loaded["settings"]["llm"]["fingerprint"] == _llm(architecture).fingerprint
    matrix = np.load(tmp_path / "art" / "item_matrix.npy")
    np.testing.assert_allclose(np.linalg.norm(matrix, axis=1), 1.0, rtol=1e-5)


def test_a_tampered_file_is_detected(laser_run, tmp_path):
    run, architecture = laser_run
    export_run(run, tmp_path / "art", llm=_llm(architecture))
    path = tmp_path / "art" / "mformer.onnx"
    original = path.read_bytes()
    data = bytearray(original)
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="mformer.onnx: checksum does not match"):
        Embedder(tmp_path / "art")
    path.write_bytes(original)
    assert load_manifest(tmp_path / "art")["kind"] == "laser"
    (tmp_path / "art" / "tokenizer.json").unlink()
    with pytest.raises(ArtifactError, match="tokenizer.json: listed in the manifest but missing"):
        load_manifest(tmp_path / "art")


def test_existing_output_is_refused_and_replaced_only_with_overwrite(laser_run, tmp_path):
    run, architecture = laser_run
    out = tmp_path / "art"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="already exists; pass --overwrite"):
        export_run(run, out, llm=_llm(architecture))
    assert (out / "keep.txt").read_text() == "mine"
    export_run(run, out, overwrite=True, llm=_llm(architecture))
    assert not (out / "keep.txt").exists() and (out / MANIFEST).exists()
    assert [p.name for p in tmp_path.iterdir()] == ["art"]  # no partial or old directories left


def test_a_failed_validation_is_an_error_and_leaves_nothing(laser_run, tmp_path, monkeypatch):
    import laser_batch.exporters.validate as validate

    run, architecture = laser_run
    monkeypatch.setitem(validate.TOLERANCE, "min_cosine", 1.5)  # impossible
    with pytest.raises(ArtifactError, match="differs from torch"):
        export_run(run, tmp_path / "art", llm=_llm(architecture))
    assert list(tmp_path.iterdir()) == []


def test_missing_run_incomplete_run_and_another_llm_are_refused(laser_run, tmp_path):
    run, architecture = laser_run
    with pytest.raises(CheckpointError, match="run directory not found"):
        export_run(tmp_path / "nope", tmp_path / "art")
    broken = tmp_path / "broken"
    shutil.copytree(run, broken)
    (broken / "laser" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="incomplete checkpoint, missing model.safetensors"):
        export_run(broken, tmp_path / "art", llm=_llm(architecture))
    with pytest.raises(CheckpointError, match="fingerprint"):
        export_run(run, tmp_path / "art", llm=build_tiny_llm("qwen2", seed=99))
    assert not (tmp_path / "art").exists()


def test_sasrec_only_run_exports_a_sasrec_artefact_set(laser_run, tmp_path):
    from laser_batch.checkpoint import load_sasrec
    from laser_batch.sequences import pad_left

    run, _ = laser_run
    sasrec_only = tmp_path / "run"
    shutil.copytree(run, sasrec_only, ignore=shutil.ignore_patterns("laser"))
    manifest = export_run(sasrec_only, tmp_path / "art")
    assert manifest["kind"] == "sasrec" and set(manifest["graphs"]) == {"sasrec"}
    assert manifest["settings"]["score"] == "dot" and manifest["end_to_end"]["top10"]["same_set"] >= 0.99
    sasrec, _ = load_sasrec(run / "sasrec")
    histories = [np.array([1, 2, 3]), np.array([5]), np.array([7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19])]
    with torch.no_grad():
        reference = sasrec(torch.from_numpy(pad_left(histories, sasrec.config.max_len)))[:, -1].numpy()
    np.testing.assert_allclose(Embedder(tmp_path / "art").embed(histories), reference, atol=1e-5)
    with pytest.raises(InputError, match="nothing to quantise"):
        export_run(sasrec_only, tmp_path / "art2", quantize=["nbits8"])


def test_quantised_variants_are_judged_by_the_gate_on_held_out_pairs(laser_run, tmp_path):
    from laser_batch.exporters.gate import NON_INFERIORITY, gate_pairs

    run, architecture = laser_run
    schemes = ["nbits8", "nbits8-mixed", "nbits8-fp32", "int8-dynamic",
               *(["int8-smooth", "int8-smooth-mixed"] if architecture == "llama" else [])]
    manifest = export_run(run, tmp_path / "art", quantize=schemes, llm=_llm(architecture))
    encoder = manifest["graphs"]["user_encoder"]
    variants = encoder["variants"]
    assert set(variants) == set(schemes)
    sequences = _run_data(run)[1]
    pairs = gate_pairs(sequences)
    assert encoder["gate"]["pairs"] == len(pairs) == 2 * min(sequences.num_users, 1000)
    fp32 = encoder["gate"]["fp32"]
    assert 0 <= fp32["ndcg10"] <= fp32["hr10"] <= 1
    bf16 = encoder["gate"]["torch_bf16"]  # PyTorch bf16 judged the same way: the reference for numeric noise
    assert bf16["pairs"] == len(pairs) and bf16["ndcg10_fp32"] == pytest.approx(fp32["ndcg10"])
    for scheme, record in variants.items():
        assert record["file"] == f"user_encoder.{scheme}.onnx" and record["file"] in manifest["files"]
        judged = record["gate"]
        low, high = judged["ndcg10_diff_ci95"]
        assert low <= judged["ndcg10_diff"] <= high
        assert judged["ndcg10_diff"] == pytest.approx(judged["ndcg10"] - judged["ndcg10_fp32"])
        assert judged["ndcg10_fp32"] == pytest.approx(fp32["ndcg10"])  # one fp32 reference for every variant
        assert judged["non_inferiority_bar"] == pytest.approx(-NON_INFERIORITY * fp32["ndcg10"])
        assert judged["non_inferior"] == (low >= judged["non_inferiority_bar"])
        assert 0 <= judged["hit_changes"] <= len(pairs) and 0 <= judged["top10_overlap"] <= 1
        assert judged["top10_same_set"] == record["top10_vs_fp32"]["same_set"]  # the old bar, a diagnostic now
        assert record["speedup_vs_fp32"] == pytest.approx(record["users_per_second"] / record[
            "fp32_users_per_second"], rel=0.02)
        assert record["mean_cosine"] > 0.99
        if architecture == "llama":  # centred: each variant's centre was re-calibrated (or left, if no better)
            correction = record["centre_correction"]
            assert correction["calibration_users"] > 0 and correction["shift_norm"] > 0
            assert correction["applied"] == (correction["calibration_cosine_after"] > correction[
                "calibration_cosine_before"])
        else:
            assert "centre_correction" not in record
    passing = [s for s, v in variants.items() if v["gate"]["non_inferior"] and v["speedup_vs_fp32"] > 1]
    fastest = max(passing, key=lambda s: variants[s]["speedup_vs_fp32"], default=None)
    assert encoder["recommended_cpu_variant"] == fastest and encoder["recommended_reason"]
    # The sensitivity pass: every weight MatMul quantised alone and measured; the mixed variant keeps its pick.
    nbits_pass = encoder["sensitivity"]["nbits8"]
    layers = 7 * 2 if architecture == "llama" else 0  # GPT-2's Conv1D layers are Gemm nodes: nothing to quantise
    assert len(nbits_pass["layers"]) == layers and all(e >= 0 for e in nbits_pass["layers"].values())
    assert list(nbits_pass["layers"].values()) == sorted(nbits_pass["layers"].values(), reverse=True)
    assert set(nbits_pass["kept"]) <= set(nbits_pass["layers"]) and len(nbits_pass["kept"]) <= layers // 4
    assert variants["nbits8-mixed"]["quantized_layers"] == layers - len(nbits_pass["kept"])
    import onnx

    ops = [n.op_type for n in onnx.load(str(tmp_path / "art" / "user_encoder.nbits8.onnx")).graph.node]
    assert variants["nbits8"]["quantized_layers"] == ops.count("MatMulNBits")
    if architecture == "llama":  # q, k, v, o, gate, up, down per layer; attention scores stay fp32 MatMuls
        assert ops.count("MatMulNBits") == 7 * 2 and "MatMul" in ops
        levels = {scheme: {a.i for n in onnx.load(str(tmp_path / "art" / f"user_encoder.{scheme}.onnx")).graph.node
                           if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "accuracy_level"}
                  for scheme in ("nbits8", "nbits8-fp32")}
        assert levels == {"nbits8": {4}, "nbits8-fp32": {1}}  # int8 compute vs fp32 compute, same 8-bit weights
        assert variants["nbits8-fp32"]["mean_cosine"] >= variants["nbits8"]["mean_cosine"]
    else:  # GPT-2's Conv1D layers are Gemm nodes: not quantised, and the manifest says so
        assert ops.count("MatMulNBits") == 0
    fp32 = Embedder(tmp_path / "art", device="cpu")
    int8 = Embedder(tmp_path / "art", device="cpu", variant="nbits8")
    histories = [np.array([1, 2, 3]), np.array([4, 5])]
    cosine = (fp32.embed(histories) * int8.embed(histories)).sum(1)
    assert (cosine > 0.99).all()
    if architecture == "llama":  # SmoothQuant's graph: dynamic int8 of all 7 linear layers per decoder layer
        smooth_ops = [n.op_type for n in onnx.load(str(tmp_path / "art" / "user_encoder.int8-smooth.onnx")).graph.node]
        assert variants["int8-smooth"]["quantized_layers"] == 7 * 2 == smooth_ops.count("DynamicQuantizeMatMul") + \
            smooth_ops.count("MatMulInteger")
        kept = encoder["sensitivity"]["int8-smooth"]["kept"]
        assert 1 <= len(kept) <= 3 and variants["int8-smooth-mixed"]["quantized_layers"] == 7 * 2 - len(kept)
    else:
        with pytest.raises(InputError, match="int8-smooth: needs a Llama-family LLM"):
            export_run(run, tmp_path / "x", quantize=["int8-smooth"], llm=_llm(architecture))
        assert not (tmp_path / "x").exists()
    with pytest.raises(InputError, match="choose int8"):
        export_run(run, tmp_path / "x", quantize=["int3"])


def test_centre_correction_removes_a_constant_shift_of_the_pooled_state(laser_run, tmp_path):
    """A "quantised" graph whose pooled state is off by a constant vector is repaired exactly by the correction."""
    import onnx
    from onnx import helper, numpy_helper

    from laser_batch.artifacts import session
    from laser_batch.exporters.quantize import CENTRE, correct_centre
    from laser_batch.exporters.validate import sample

    run, architecture = laser_run
    export_run(run, tmp_path / "art", llm=_llm(architecture))
    model = onnx.load(str(tmp_path / "art" / "user_encoder.onnx"))
    centring = [n for n in model.graph.node if n.op_type == "Sub" and n.input[1] == CENTRE]
    fp32 = Embedder(tmp_path / "art", device="cpu")
    histories = sample(*_run_data(run)[1].split("test"), 20)[0]  # held-out users, spread as the export's are
    calibration, held_out = histories[:12], histories[12:]
    if architecture == "gpt2":  # the fixture trains it without centring: nothing to correct
        assert not centring and correct_centre(fp32, "user_encoder.onnx", calibration) is None
        return
    shift = np.random.default_rng(0).normal(0, 0.5, fp32.user_encoder.get_outputs()[0].shape[-1]).astype(np.float32)
    (sub,) = centring
    model.graph.initializer.append(numpy_helper.from_array(shift, "injected_shift"))
    model.graph.node.append(helper.make_node("Add", [sub.input[0], "injected_shift"], ["shifted_state"]))
    sub.input[0] = "shifted_state"
    onnx.save(model, str(tmp_path / "art" / "user_encoder.shifted.onnx"))

    def shifted_embed():  # the graph file as it is now (not listed in the manifest: a plain session)
        graph = session(tmp_path / "art" / "user_encoder.shifted.onnx", ["CPUExecutionProvider"])
        return graph.run(["embedding"], fp32.feeds(held_out))[0]

    before = (shifted_embed() * fp32.embed(held_out)).sum(1)
    assert before.mean() < 0.999  # the shift really matters

    record = correct_centre(fp32, "user_encoder.shifted.onnx", calibration)
    assert record["applied"] and record["calibration_users"] == 12
    assert record["shift_norm"] == pytest.approx(float(np.linalg.norm(shift)), rel=1e-4)
    assert record["calibration_cosine_after"] > record["calibration_cosine_before"]
    np.testing.assert_allclose(shifted_embed(), fp32.embed(held_out), atol=1e-4)  # on users it never saw


def test_fp16_graphs_and_external_data(laser_run, tmp_path, monkeypatch):
    run, architecture = laser_run
    monkeypatch.setenv("FORCE_ONNX_EXTERNAL_DATA", "1")  # the path LLMs over 2 GB take, on a small model
    manifest = export_run(run, tmp_path / "art", dtype="fp16", llm=_llm(architecture))
    assert "user_encoder.onnx_data" in manifest["files"]
    assert all(g["dtype"] == "float16" for g in manifest["graphs"].values())
    assert np.load(tmp_path / "art" / "item_matrix.npy").dtype == np.float16
    assert manifest["end_to_end_fp16"]["min_cosine"] >= 0.999
    assert Embedder(tmp_path / "art").embed([np.array([1, 2])]).dtype == np.float32


def test_cli_export_and_refusal(laser_run, tmp_path):
    from typer.testing import CliRunner

    from laser_batch.cli import app

    run, architecture = laser_run
    if architecture != "llama":
        pytest.skip("the CLI loads the LLM the run names; the gpt2 run's tiny LLM is built in the test")
    result = CliRunner().invoke(app, ["export", str(run), "--out", str(tmp_path / "art")])
    assert result.exit_code == 0, result.output
    assert "top-10 same for 100.0%" in result.output
    again = CliRunner().invoke(app, ["export", str(run), "--out", str(tmp_path / "art")])
    assert again.exit_code == 2 and "already exists; pass --overwrite" in again.output
