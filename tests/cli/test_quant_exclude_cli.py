"""`edgemm compile` with INT8/FP8 on a model with a BERT text tower (attention-mask input), and
`--exclude`, through the CLI. TensorRT targets make portable bundles here (no TensorRT needed)."""

from __future__ import annotations

import json
import re

import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("transformers")
pytest.importorskip("modelopt.onnx.quantization", reason="nvidia-modelopt is needed for Q/DQ generation")

BERT = "tests.fixtures.bert_tower:build"   # the factory: export included (slow tests)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Calibration data and the model as ONNX (export skipped by compile: fast tests)."""
    from tests.fixtures.bert_tower import export_onnx, save_data

    folder = tmp_path_factory.mktemp("bert-data")
    paths = save_data(folder)
    paths["onnx"] = folder / "bert_tower.onnx"
    export_onnx(paths["onnx"])
    return paths


def _bundle_onnx(bundle):
    manifest = json.loads((bundle / "manifest.json").read_text())
    return manifest, onnx.load(str(bundle / (manifest["backend"].get("onnx") or manifest["backend"]["model"])))


def _dq_consumer_ops(model) -> set[str]:
    dq = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return {n.op_type for n in model.graph.node if dq & set(n.input)}


def _compile_ok(cli, *args):
    r = cli("compile", *args, "--no-thread-tuning")
    assert r.returncode == 0, r.stderr + r.stdout
    return r


def test_tensorrt_int8_of_a_bert_tower_calibrates_through_the_mask(cli, data, tmp_path):
    out = tmp_path / "int8"
    r = _compile_ok(cli, data["onnx"], "--int8", "--target", "jetson-agx-orin", "--calib", data["calib"], "-o", out)
    manifest, model = _bundle_onnx(out)
    assert manifest["precision"]["mode"] == "int8" and {"MatMul", "Conv"} <= _dq_consumer_ops(model)
    auto = manifest["precision"]["exclusions"]["automatic"]
    assert auto and all("attention_mask" in why or "calibration data" in why for why in auto.values())
    assert "kept out of int8 calibration" in r.stdout


@pytest.mark.slow   # two compiles of ~20-40 s each on a loaded 2-core host
@pytest.mark.parametrize("precision,target", [("--fp8", "h100"), ("--int8", "jetson-agx-orin")])
def test_tensorrt_quantization_of_a_bert_tower_with_and_without_sparsity(cli, data, tmp_path, precision, target):
    for extra in ([], ["--sparsity", "2:4"]):
        out = tmp_path / f"b{len(extra)}"
        _compile_ok(cli, BERT, precision, "--target", target, "--calib", data["calib"], "-o", out, *extra)
        manifest, model = _bundle_onnx(out)
        assert manifest["precision"]["exclusions"]["automatic"]
        assert any(n.op_type == "QuantizeLinear" for n in model.graph.node)
        if extra:
            assert manifest["prune"]["sparsity"]


def test_exclude_on_a_tensorrt_target(cli, data, tmp_path):
    out = tmp_path / "excl"
    _compile_ok(cli, data["onnx"], "--int8", "--target", "jetson-agx-orin", "--calib", data["calib"], "-o", out,
                "--exclude", r"op:Conv,/text/encoder/layer\.1/.*")
    manifest, model = _bundle_onnx(out)
    excl = manifest["precision"]["exclusions"]
    assert excl["patterns"] == ["op:Conv", r"/text/encoder/layer\.1/.*"]
    dq = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    quantized = {n.name for n in model.graph.node if dq & set(n.input)}
    assert not set(excl["nodes"]) & quantized      # the named nodes stay in high precision
    assert "Conv" not in _dq_consumer_ops(model)
    assert any(n.startswith("/text/encoder/layer.0/") for n in quantized)      # the rest is still INT8
    assert not any(n.startswith("/text/encoder/layer.1/") for n in quantized)


@pytest.mark.slow   # exports through the factory (~1 min on a loaded 2-core host)
def test_exclude_module_pattern_on_an_exported_factory(cli, data, tmp_path):
    out = tmp_path / "module"
    _compile_ok(cli, BERT, "--int8", "--target", "jetson-agx-orin", "--calib", data["calib"], "-o", out,
                "--exclude", "module:text.encoder.layer.1")
    manifest, model = _bundle_onnx(out)
    dq = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    quantized = {n.name for n in model.graph.node if dq & set(n.input)}
    assert manifest["precision"]["exclusions"]["nodes"] and not set(manifest["precision"]["exclusions"]["nodes"]) & quantized


def test_exclude_on_the_cpu_target(cli, tiny, tmp_path):
    def build(name, *extra):
        out = tmp_path / name
        _compile_ok(cli, tiny["torchscript"], "--int8", "--int8-recipe", "dynamic_per_channel", "--calib",
                    tiny["calib"], "-o", out, *extra)
        return _bundle_onnx(out)

    _, plain = build("plain")
    manifest, kept = build("kept", "--exclude", "op:Conv")
    assert any(n.op_type == "QLinearConv" for n in plain.graph.node)
    assert not any(n.op_type == "QLinearConv" for n in kept.graph.node)
    assert sum(n.op_type == "Conv" for n in kept.graph.node) == 2
    assert manifest["precision"]["exclusions"]["patterns"] == ["op:Conv"]


def test_exclude_matching_nothing_is_one_line_and_writes_nothing(cli, tiny, tmp_path):
    out = tmp_path / "none"
    r = cli("compile", tiny["torchscript"], "--int8", "--int8-recipe", "dynamic_per_channel", "--calib",
            tiny["calib"], "-o", out, "--exclude", "/no/such/node.*")
    assert r.returncode == 2 and not out.exists()
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "--exclude" in lines[0] and "matches no node" in lines[0]
    r = cli("compile", tiny["torchscript"], "--fp16", "--calib", tiny["calib"], "-o", out, "--exclude", "op:Conv")
    assert r.returncode == 2 and "--exclude" in r.stderr and not out.exists()


def test_quantization_failure_names_the_model_and_real_flags(cli, data, tmp_path):
    """Excluding every node leaves modelopt nothing to quantize: the error must name the user's model
    (not a staging file that is gone) and suggest only flags `edgemm compile` has."""
    out = tmp_path / "all"
    r = cli("compile", data["onnx"], "--int8", "--target", "jetson-agx-orin", "--calib", data["calib"], "-o", out,
            "--exclude", ".*")
    assert r.returncode == 2 and not out.exists()
    line = r.stderr.strip()
    assert len(line.splitlines()) == 1 and line.startswith(f"error: {data['onnx']}:")
    assert ".edgemm-staging" not in line
    help_text = cli("compile", "--help").stdout
    for flag in re.findall(r"--[a-z][a-z0-9-]+", line):
        assert flag in help_text, flag
