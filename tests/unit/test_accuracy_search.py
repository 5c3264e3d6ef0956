"""Accuracy-aware precision: target expressions, the evaluator, and the search itself on a small model
with one planted quantization-sensitive layer (an outlier channel in its input), for the CPU target
(ONNX Runtime INT8, end to end) and a TensorRT target (modelopt exclude nodes)."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from edgemm.errors import InputError, ParityError  # noqa: E402
from edgemm.quant.accuracy_search import (AccuracyTarget, Condition, Evaluator, accuracy_aware,  # noqa: E402
                                          bypass_qdq, estimate_macs, parse_accuracy_target)

# --- target expressions ----------------------------------------------------------------------------


def test_parse_accuracy_target():
    t = parse_accuracy_target("cosine>=0.998")
    assert t.conditions == (Condition("cosine", ">=", 0.998),) and str(t) == "cosine>=0.998"
    t = parse_accuracy_target("cosine@text_embeds >= 0.999, top1-drop<=0.5 and top1-agreement>=0.99")
    assert [c.metric for c in t.conditions] == ["cosine", "top1-drop", "top1-agreement"]
    assert t.conditions[0].output == "text_embeds" and t.needs_labels
    assert not parse_accuracy_target("min-cosine>=0.99").needs_labels
    assert parse_accuracy_target("recall@1-drop<=1").conditions[0].metric == "recall@1-drop"


@pytest.mark.parametrize("expr,match", [
    ("", "empty"), ("cosine", "cannot read"), ("cosine<=0.9", "takes >="), ("top1-drop>=1", "takes <="),
    ("accuracy>=0.9", "unknown metric"), ("cosine>=1.5", "outside"), ("top1-agreement>=99", "fraction"),
    ("top1-drop<=-1", "negative"), ("cosine>=nan", "not finite"),
])
def test_parse_accuracy_target_errors(expr, match):
    with pytest.raises(InputError, match=match) as err:
        parse_accuracy_target(expr)
    assert "\n" not in str(err.value) and "--accuracy-target" in str(err.value)


# --- the evaluator -----------------------------------------------------------------------------------

def _feeds(n, seed=0):
    return {"x": np.random.default_rng(seed).standard_normal((n, 64)).astype(np.float32)}


def test_evaluator_scores_cosine_agreement_and_drop():
    rng = np.random.default_rng(0)
    proj = rng.standard_normal((64, 10)).astype(np.float32)
    ref = lambda f: {"logits": f["x"] @ proj, "embeds": f["x"][:, :8]}  # noqa: E731
    feeds = _feeds(40)
    labels = (feeds["x"] @ proj).argmax(1)
    target = parse_accuracy_target("cosine>=0.999,top1-agreement>=0.9,top1-drop<=2")
    ev = Evaluator(ref, feeds, target, output_names=["logits", "embeds"], labels=labels, batch_size=16)
    same = ev.measure(ref)
    assert same.check.met and same.check.values == {"cosine>=0.999": 1.0, "top1-agreement>=0.9": 1.0,
                                                    "top1-drop<=2": 0.0}

    def noisy(f):
        out = ref(f)
        out["logits"] = out["logits"] + np.random.default_rng(1).standard_normal(out["logits"].shape) * 3
        return out

    m = ev.measure(noisy)
    assert not m.check.met and m.check.values["cosine>=0.999"] < 0.999
    assert m.check.values["top1-drop<=2"] > 2 and m.errors["embeds"] == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(InputError, match="needs labels"):
        Evaluator(ref, feeds, target, output_names=["logits", "embeds"])
    with pytest.raises(InputError, match="no output 'nope'"):
        Evaluator(ref, feeds, parse_accuracy_target("cosine@nope>=0.9"), output_names=["logits", "embeds"])


# --- a model with one planted sensitive layer ------------------------------------------------------

AMP = 100.0
TOKENS = 8   # 3-D activations: modelopt skips GEMV-shaped MatMuls (M == 1), as TensorRT gains nothing there


def _tokens(n, seed=0):
    return {"x": np.random.default_rng(seed).standard_normal((n, TOKENS, 64)).astype(np.float32)}


def _planted_model(path):
    """x -> mm1 -> relu -> (channel 0 x100) -> mm_outlier (weights /100: same function) -> relu -> mm3.

    FP32 computes the same as without the amplification; per-tensor INT8 of mm_outlier's input cannot
    serve a channel 100x larger than the rest, so that layer alone carries almost all INT8 error."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((64, 64)).astype(np.float32) / 8
    w2 = rng.standard_normal((64, 64)).astype(np.float32) / 8
    w3 = rng.standard_normal((64, 16)).astype(np.float32) / 8
    amp = np.ones(64, np.float32)
    amp[0] = AMP
    w2c = (w2 / amp[:, None]).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h1"], name="mm1"),
             helper.make_node("Relu", ["h1"], ["r1"], name="relu1"),
             helper.make_node("Mul", ["r1", "amp"], ["a1"], name="amplify"),
             helper.make_node("MatMul", ["a1", "w2"], ["h2"], name="mm_outlier"),
             helper.make_node("Relu", ["h2"], ["r2"], name="relu2"),
             helper.make_node("MatMul", ["r2", "w3"], ["h3"], name="mm3"),
             helper.make_node("ReduceMean", ["h3"], ["logits"], name="pool", axes=[1], keepdims=0)]
    graph = helper.make_graph(nodes, "planted",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", TOKENS, 64])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 16])],
                              [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2c, "w2"),
                               numpy_helper.from_array(w3, "w3"), numpy_helper.from_array(amp, "amp")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("planted")
    path = _planted_model(folder / "planted.onnx")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    evald = _tokens(64, seed=2)
    labels = sess.run(None, evald)[0].argmax(1)
    return {"path": path, "calib": _tokens(32, seed=1), "eval": evald, "labels": labels, "folder": folder}


def _ops(path):
    return {n.name: n.op_type for n in onnx.load(str(path)).graph.node}


def _cosine(path_a, path_b, feeds):
    a = ort.InferenceSession(str(path_a), providers=["CPUExecutionProvider"]).run(None, feeds)[0].astype(np.float64)
    b = ort.InferenceSession(str(path_b), providers=["CPUExecutionProvider"]).run(None, feeds)[0].astype(np.float64)
    return float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).mean())


def test_cpu_search_keeps_exactly_the_planted_layer(planted, tmp_path):
    out = tmp_path / "aa.onnx"
    result = accuracy_aware(planted["path"], out, planted["calib"], planted["eval"], "cosine>=0.999", "cpu",
                            workdir=tmp_path / "work", timing_iterations=10)
    rec = result.recipe
    assert not rec["all_quantized"]["met"] and rec["met"]
    assert [row["unit"] for row in rec["kept"]] == ["mm_outlier"]
    assert rec["search"]["most_sensitive"][0]["unit"] == "mm_outlier"
    assert rec["kept"][0]["bought"]["cosine>=0.999"] > 0        # measured leave-one-out gain
    assert result.mode == "mixed:fp32+int8" and rec["exclude_nodes"] == ["mm_outlier"]
    ops = _ops(out)
    assert ops["mm_outlier"] == "MatMul" and "mm1" not in ops and "mm3" not in ops   # the others are INT8
    # Independent check on samples the search never saw.
    assert _cosine(planted["path"], out, _tokens(64, seed=3)) >= 0.999
    lat = rec["latency"]
    assert lat["batch"] == 1 and lat["fp32_p50_ms"] > 0 and lat["result_p50_ms"] > 0


def test_cpu_target_already_met_keeps_nothing(planted, tmp_path):
    result = accuracy_aware(planted["path"], tmp_path / "aa.onnx", planted["calib"], planted["eval"], "cosine>=0.98",
                            "onnxruntime", workdir=tmp_path / "work", timing_iterations=5)
    assert result.recipe["met"] and result.recipe["kept"] == [] and result.mode == "int8"
    assert result.recipe["search"]["builds"] == 1            # the all-INT8 build only: no sensitivity runs


def test_top1_drop_target_with_labels(planted, tmp_path):
    with pytest.raises(InputError, match="needs labels"):
        accuracy_aware(planted["path"], tmp_path / "x.onnx", planted["calib"], planted["eval"], "top1-drop<=1",
                       "cpu", workdir=tmp_path / "w0")
    result = accuracy_aware(planted["path"], tmp_path / "aa.onnx", planted["calib"], planted["eval"],
                            "top1-drop<=1", "cpu", labels=planted["labels"], metric=("top1", ["logits"]),
                            workdir=tmp_path / "w", timing_iterations=5)
    rec = result.recipe
    assert rec["all_quantized"]["values"]["top1-drop<=1"] > 1    # INT8 everywhere loses accuracy
    assert rec["met"] and rec["measured"]["values"]["top1-drop<=1"] <= 1
    assert "mm_outlier" in rec["exclude_nodes"]


def test_tensorrt_search_emits_modelopt_exclude_nodes(planted, tmp_path):
    pytest.importorskip("modelopt.onnx.quantization")
    out = tmp_path / "trt.onnx"
    result = accuracy_aware(planted["path"], out, planted["calib"], planted["eval"], "cosine>=0.999",
                            "jetson-orin-nx", workdir=tmp_path / "work", high_precision="fp32")
    rec = result.recipe
    assert rec["met"] and not rec["all_quantized"]["met"]
    assert "mm_outlier" in rec["exclude_nodes"] and rec["latency"].startswith("measure on the device")
    assert "^mm_outlier$" in rec["backend"]["nodes_to_exclude"]
    model = onnx.load(str(out))
    producers = {o: n.op_type for n in model.graph.node for o in n.output}
    outlier = next(n for n in model.graph.node if n.name == "mm_outlier")
    assert all(producers.get(i) != "DequantizeLinear" for i in outlier.input)     # kept unquantized
    assert any(n.op_type == "QuantizeLinear" for n in model.graph.node)            # the rest is INT8


def test_impossible_target_raises(planted, tmp_path):
    """Even with every layer out of INT8, the TensorRT build keeps FP16 there: cosine 1.0 is out of reach."""
    pytest.importorskip("modelopt.onnx.quantization")
    with pytest.raises(ParityError, match="not met even with every"):
        accuracy_aware(planted["path"], tmp_path / "x.onnx", planted["calib"], planted["eval"],
                       AccuracyTarget((Condition("cosine", ">=", 1.0),)), "jetson-orin-nx", workdir=tmp_path / "w")
    assert not (tmp_path / "x.onnx").exists()


# --- helpers ----------------------------------------------------------------------------------------

def test_bypass_qdq_reads_float_inputs(tmp_path):
    w = np.random.default_rng(0).integers(-127, 127, size=(8, 4)).astype(np.int8)
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"], name="xq"),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"], name="xd"),
             helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], name="wd"),
             helper.make_node("MatMul", ["xd", "wd"], ["y"], name="mm")]
    graph = helper.make_graph(nodes, "q", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
                              [numpy_helper.from_array(np.float32(0.05), "xs"), numpy_helper.from_array(np.int8(0), "xz"),
                               numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.float32(0.01), "ws"),
                               numpy_helper.from_array(np.int8(0), "wz")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    plain = bypass_qdq(model, ["mm"])
    assert [n.op_type for n in plain.graph.node] == ["MatMul"]
    x = np.random.default_rng(1).standard_normal((2, 8)).astype(np.float32)
    got = ort.InferenceSession(plain.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, x @ (w.astype(np.float32) * 0.01), rtol=1e-5)
    assert [n.op_type for n in bypass_qdq(model, []).graph.node] == [n.op_type for n in nodes]


def test_estimate_macs(planted):
    macs = estimate_macs(planted["path"], planted["eval"])
    assert macs == {"mm1": TOKENS * 64 * 64, "mm_outlier": TOKENS * 64 * 64, "mm3": TOKENS * 64 * 16}
