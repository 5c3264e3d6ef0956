"""Quantizing transformer towers with attention masks, and --exclude: a BERT text tower (random init) fused
with a conv image tower, exported here with an attention-mask input. Its extended mask holds
finfo(float32).min, which broke modelopt's histogram calibration ("Too many bins for data range")."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("transformers")
pytest.importorskip("modelopt.onnx.quantization", reason="nvidia-modelopt is needed for Q/DQ generation")

from edgemm.errors import InputError  # noqa: E402
from edgemm.quant import PrecisionRequest, apply_precision  # noqa: E402
from edgemm.quant.exclusions import (mask_arithmetic_nodes, parse_exclude, resolve_exclude,  # noqa: E402
                                     unquantizable_nodes)
from edgemm.quant.modelopt_qdq import quantize_qdq  # noqa: E402
from tests.fixtures.bert_tower import export_onnx, make_data  # noqa: E402


@pytest.fixture(scope="module")
def bert_onnx(tmp_path_factory):
    path = tmp_path_factory.mktemp("bert") / "bert_tower.onnx"
    export_onnx(path)
    return path


def _unpadded(n=24, seed=1):
    data = make_data(n, seed=seed)
    data["attention_mask"][:] = 1      # a calibration set without padding never shows the sentinel
    data["input_ids"][data["input_ids"] == 0] = 7
    return data


def _run(path, feeds):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


def _cosine(a, b):
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    return float(np.mean((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


def _dq_consumers(model) -> set[str]:
    dq = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return {n.name for n in model.graph.node if dq & set(n.input)}


def test_mask_arithmetic_found_from_data_flow(bert_onnx):
    model = onnx.load(str(bert_onnx))
    found = mask_arithmetic_nodes(onnx.shape_inference.infer_shapes(model))
    ops = {n.name: n.op_type for n in model.graph.node}
    applied = [n for n, why in found.items() if why.startswith("applies")]
    # one mask application (scores + mask) per attention layer, never an embedding lookup or a MatMul
    assert sorted(ops[n] for n in applied) == ["Add", "Add"]
    assert all("attention_mask" in why for why in found.values())
    assert not {ops[n] for n in found} & {"MatMul", "Gather", "Conv", "Gemm"}


def test_probe_sees_the_sentinel_even_without_padding_in_calibration(bert_onnx, tmp_path):
    found = unquantizable_nodes(bert_onnx, _unpadded(8), tmp_path)
    ops = {n.name: n.op_type for n in onnx.load(str(bert_onnx)).graph.node}
    sentinel = [n for n, why in found.items() if "reaches" in why or "non-finite" in why]
    assert sentinel and {ops[n] for n in sentinel} >= {"Softmax"}
    assert list(tmp_path.iterdir()) == []          # the probe model is removed


@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_qdq_calibrates_through_the_mask(bert_onnx, tmp_path, mode):
    out = tmp_path / f"{mode}.onnx"
    recipe = quantize_qdq(bert_onnx, out, _unpadded(), mode)
    assert recipe["qdq"]["quantize_linear"] > 0 and recipe["calibration_fallback"] is None
    assert recipe["auto_excluded"]
    model = onnx.load(str(out))
    # no Q/DQ on the mask application: an 8-bit mask would stop masking
    masked_adds = {n for n, why in recipe["auto_excluded"].items() if why.startswith("applies")}
    assert masked_adds and not masked_adds & _dq_consumers(model)
    if mode == "int8":   # INT8 Q/DQ runs on ORT: padded inputs still give the FP32 answer
        feeds = make_data(16, seed=5)
        assert feeds["attention_mask"].min() == 0
        ref, got = _run(bert_onnx, feeds), _run(out, feeds)
        assert _cosine(ref["logits"], got["logits"]) > 0.99


def test_eager_attention_mask_is_found_too(tmp_path):
    path = tmp_path / "eager.onnx"
    export_onnx(path, attn="eager")
    recipe = quantize_qdq(path, tmp_path / "int8.onnx", make_data(16, seed=3), "int8")
    assert any(why.startswith("applies") for why in recipe["auto_excluded"].values())


def test_histogram_failure_falls_back_to_max_calibration(bert_onnx, tmp_path, monkeypatch):
    """A range no histogram can bin that the exclusions missed: modelopt's error, then max calibration."""
    from edgemm.capture import _Captured
    from edgemm.quant import modelopt_qdq

    real, methods = modelopt_qdq._run_modelopt, []

    def histogram_breaks(quantize, src, dst, mode, data, method, *rest):
        methods.append(method)
        if method == "entropy":
            return ValueError("Too many bins for data range. Cannot create 128 finite-sized bins."), _Captured()
        return real(quantize, src, dst, mode, data, method, *rest)

    monkeypatch.setattr(modelopt_qdq, "_run_modelopt", histogram_breaks)
    recipe = quantize_qdq(bert_onnx, tmp_path / "int8.onnx", make_data(16, seed=4), "int8")
    assert methods == ["entropy", "max"] and recipe["calibration_method"] == "max"
    assert "Too many bins" in recipe["calibration_fallback"] and recipe["qdq"]["quantize_linear"] > 0


def test_exclude_patterns_resolve_and_a_miss_is_one_line(bert_onnx):
    model = onnx.load(str(bert_onnx))
    softmax = resolve_exclude(model, parse_exclude(["op:Softmax"]))
    assert softmax and all(n.op_type == "Softmax" for n in model.graph.node if n.name in softmax)
    text = resolve_exclude(model, parse_exclude(["/text/encoder/layer\\.1/.*,op:Conv"]))
    assert any(n.startswith("/text/encoder/layer.1/") for n in text) and "/vision/vision.0/Conv" in text
    with pytest.raises(InputError) as err:
        resolve_exclude(model, ["/no/such/.*"])
    assert err.value.field == "--exclude" and "matches no node" in str(err.value) and "\n" not in str(err.value)
    for bad in ("op:", "a,,b", "(unclosed"):
        with pytest.raises(InputError):
            parse_exclude([bad])


def test_exclude_on_tensorrt_target_keeps_nodes_unquantized(bert_onnx, tmp_path):
    def build(exclude):
        out = tmp_path / f"trt{len(exclude)}.onnx"
        apply_precision(bert_onnx, out, PrecisionRequest(precision="int8", backend="tensorrt", calib=_unpadded(16),
                                                         workdir=tmp_path, exclude=exclude, log=lambda m: None))
        return onnx.load(str(out))

    layer1 = [n for n in resolve_exclude(onnx.load(str(bert_onnx)), ["op:MatMul"]) if "layer.1" in n]
    plain, excluded = build([]), build(["/text/encoder/layer\\.1/.*"])
    assert set(layer1) & _dq_consumers(plain)            # quantized by default
    assert not set(layer1) & _dq_consumers(excluded)     # kept in high precision when excluded
    assert _dq_consumers(excluded) - set(layer1)         # the rest is still quantized


def test_exclude_on_cpu_target_keeps_nodes_fp32(bert_onnx, tmp_path):
    from edgemm.quant import cpu_int8

    recipe = cpu_int8.ALL_RECIPES["dynamic_per_channel"]
    plain, kept = tmp_path / "plain.onnx", tmp_path / "kept.onnx"
    cpu_int8.apply_recipe(recipe, bert_onnx, plain, _unpadded(8))
    facts = cpu_int8.apply_recipe(recipe, bert_onnx, kept, _unpadded(8), exclude=["op:MatMul"])
    assert facts["excluded_nodes"]

    def float_matmuls(path):
        return sum(n.op_type == "MatMul" for n in onnx.load(str(path)).graph.node)
    assert float_matmuls(kept) > float_matmuls(plain)
    assert not any(n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul") for n in onnx.load(str(kept)).graph.node)
    with pytest.raises(InputError, match="matches no node"):
        cpu_int8.apply_recipe(recipe, bert_onnx, tmp_path / "x.onnx", _unpadded(8), exclude=["op:NoSuchOp"])
