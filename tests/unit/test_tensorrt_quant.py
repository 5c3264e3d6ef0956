"""TensorRT-targeted precision on the CPU: modelopt INT8 / FP8 Q/DQ and AutoCast FP16 on a tiny
two-input model exported here with torch.onnx.export."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
torch = pytest.importorskip("torch")
pytest.importorskip("modelopt.onnx.quantization", reason="nvidia-modelopt is needed for Q/DQ generation")

from edgemm.errors import InputError  # noqa: E402
from edgemm.quant.fp16 import to_fp16  # noqa: E402
from edgemm.quant.modelopt_qdq import inspect_qdq, quantize_qdq  # noqa: E402


class _TwoInput(torch.nn.Module):
    """Conv image tower + embedding text tower + head. Layers are >= 32 wide on purpose: modelopt
    skips Q/DQ for MatMul/Gemm with K or N < 16 and FP8 convs with <= 16 channels."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 32, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(32, 32, 3, padding=1)
        self.embed = torch.nn.Embedding(50, 32)
        self.text = torch.nn.Linear(32, 32)
        self.head = torch.nn.Linear(64, 4)

    def forward(self, image, input_ids):
        a = torch.relu(self.conv2(torch.relu(self.conv1(image)))).mean(dim=(2, 3))
        b = torch.relu(self.text(self.embed(input_ids))).mean(dim=1)
        return self.head(torch.cat([a, b], dim=1))


@pytest.fixture(scope="module")
def fp32_onnx(tmp_path_factory):
    torch.manual_seed(0)
    model = _TwoInput().eval()
    path = tmp_path_factory.mktemp("qdq") / "two_input.onnx"
    args = (torch.randn(2, 3, 16, 16), torch.randint(0, 50, (2, 8)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # The TorchScript exporter takes 0.5 s here, the dynamo one 6 s; the graph is the same for this test.
        torch.onnx.export(model, args, str(path), input_names=["image", "input_ids"], output_names=["logits"],
                          dynamic_axes={"image": {0: "batch"}, "input_ids": {0: "batch"}, "logits": {0: "batch"}},
                          dynamo=False, opset_version=17)
    return path


def _calib(n=8, seed=0):
    rng = np.random.default_rng(seed)
    return {"image": rng.standard_normal((n, 3, 16, 16)).astype(np.float32),
            "input_ids": rng.integers(0, 50, (n, 8)).astype(np.int64)}


def _zero_point_types(model) -> set[str]:
    inits = {i.name: i for i in model.graph.initializer}
    out = set()
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            out.add(onnx.TensorProto.DataType.Name(inits[node.input[2]].data_type))
    return out


def _ort_run(path, feeds):
    import onnxruntime as ort
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0]


def test_int8_qdq_nodes_are_int8_and_model_stays_accurate(fp32_onnx, tmp_path):
    out = tmp_path / "int8.onnx"
    recipe = quantize_qdq(fp32_onnx, out, _calib(), "int8")
    model = onnx.load(str(out))
    onnx.checker.check_model(model)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("QuantizeLinear") > 0 and ops.count("DequantizeLinear") > 0
    assert _zero_point_types(model) == {"INT8"}
    assert recipe["quantized_dtype"] == "INT8" and recipe["calibration_eps"] == ["cpu"]
    assert recipe["calibration_samples"] == 8
    assert {"Conv", "MatMul"} <= set(recipe["qdq"]["quantized_ops"])
    assert recipe["qdq"] == inspect_qdq(model)
    # I/O types stay FP32 (keep the bundle's interface); INT8 Q/DQ runs on ORT CPU, close to FP32.
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    feeds = {k: v[:2] for k, v in _calib(seed=1).items()}
    ref, got = _ort_run(fp32_onnx, feeds), _ort_run(out, feeds)
    cos = float((ref * got).sum() / (np.linalg.norm(ref) * np.linalg.norm(got)))
    assert cos > 0.98


def test_fp8_qdq_nodes_are_e4m3(fp32_onnx, tmp_path):
    out = tmp_path / "fp8.onnx"
    recipe = quantize_qdq(fp32_onnx, out, _calib(), "fp8")
    model = onnx.load(str(out))
    q = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert q and dq
    assert _zero_point_types(model) == {"FLOAT8E4M3FN"}
    # The quantized tensors themselves are FP8 E4M3 (shape inference types Q's output from the zero point).
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {vi.name: vi.type.tensor_type.elem_type for vi in inferred.graph.value_info}
    assert {types[n.output[0]] for n in q} == {onnx.TensorProto.FLOAT8E4M3FN}
    assert recipe["quantized_dtype"] == "FLOAT8E4M3FN" and recipe["runs_on_onnxruntime_cpu"] is False


def test_empty_or_partial_calibration_is_refused(fp32_onnx, tmp_path):
    out = tmp_path / "x.onnx"
    with pytest.raises(InputError, match="random data"):
        quantize_qdq(fp32_onnx, out, {}, "int8")
    with pytest.raises(InputError, match="input_ids"):
        quantize_qdq(fp32_onnx, out, {"image": _calib()["image"]}, "int8")
    bad = _calib()
    bad["image"] = bad["image"][:, :, :8]
    with pytest.raises(InputError, match=r"axis 2 is 8, the model needs 16"):
        quantize_qdq(fp32_onnx, out, bad, "int8")
    uneven = _calib()
    uneven["input_ids"] = uneven["input_ids"][:5]
    with pytest.raises(InputError, match="different numbers of samples"):
        quantize_qdq(fp32_onnx, out, uneven, "fp8")
    empty = {k: v[:0] for k, v in _calib().items()}
    with pytest.raises(InputError, match="no samples"):
        quantize_qdq(fp32_onnx, out, empty, "int8")
    assert not out.exists()


def test_already_quantized_and_unknown_mode_are_refused(fp32_onnx, tmp_path):
    quantized = tmp_path / "q.onnx"
    quantize_qdq(fp32_onnx, quantized, _calib(4), "int8")
    with pytest.raises(InputError, match="already holds"):
        quantize_qdq(quantized, tmp_path / "qq.onnx", _calib(4), "int8")
    with pytest.raises(InputError, match="unknown Q/DQ mode"):
        quantize_qdq(fp32_onnx, tmp_path / "x.onnx", _calib(4), "int4")


def test_model_too_small_for_qdq_is_refused(tmp_path):
    """modelopt leaves layers narrower than 16 unquantized; an all-small model must not pass as INT8."""
    small = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4)).eval()
    path = tmp_path / "small.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(small, (torch.randn(1, 8),), str(path), input_names=["x"], output_names=["y"],
                          dynamo=False, opset_version=17)
    with pytest.raises(InputError, match="placed no int8 Q/DQ"):
        quantize_qdq(path, tmp_path / "out.onnx", {"x": np.ones((4, 8), np.float32)}, "int8")


@pytest.mark.parametrize("for_tensorrt", [True, False])
def test_fp16_conversion_keeps_fp32_io(fp32_onnx, tmp_path, for_tensorrt):
    out = tmp_path / f"fp16_{for_tensorrt}.onnx"
    recipe = to_fp16(fp32_onnx, out, keep_io_types=True, for_tensorrt=for_tensorrt,
                     calib={k: v[:4] for k, v in _calib().items()} if for_tensorrt else None)
    model = onnx.load(str(out))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert recipe["graph"]["initializer_dtypes"].get("FLOAT16", 0) > 0
    assert recipe["tool"].startswith("modelopt.onnx.autocast" if for_tensorrt else "onnxconverter_common")
    feeds = {k: v[:2] for k, v in _calib(seed=2).items()}
    np.testing.assert_allclose(_ort_run(out, feeds), _ort_run(fp32_onnx, feeds), atol=5e-3, rtol=5e-3)


class _OutputAlsoConsumed(torch.nn.Module):
    """`embeds` is a model output AND feeds the head: onnxconverter-common's keep_io_types casts it back to
    float32 under its own name, which broke the Concat below before edgemm split such outputs."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(16, 16)
        self.b = torch.nn.Linear(16, 16)
        self.head = torch.nn.Linear(32, 4)

    def forward(self, x):
        embeds = self.b(x)
        return self.head(torch.cat([self.a(x), embeds], 1)), embeds


def test_fp16_onnxruntime_path_handles_outputs_read_inside_the_graph(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "consumed.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_OutputAlsoConsumed().eval(), (torch.randn(2, 16),), str(path), input_names=["x"],
                          output_names=["logits", "embeds"], dynamic_axes={"x": {0: "batch"}}, dynamo=False,
                          opset_version=17)
    out = tmp_path / "consumed_fp16.onnx"
    recipe = to_fp16(path, out, keep_io_types=True, for_tensorrt=False)
    assert recipe["tool"].startswith("onnxconverter_common") and recipe["outputs_split"] == 1
    feeds = {"x": np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32)}
    np.testing.assert_allclose(_ort_run(out, feeds), _ort_run(path, feeds), atol=5e-3, rtol=5e-3)


def test_target_dla_with_a_modelopt_that_would_swallow_it_is_refused_before_calibration(fp32_onnx, tmp_path,
                                                                                         monkeypatch):
    # modelopt < 0.46 takes target_dla into **kwargs and ignores it: old code then wrote a GPU Q/DQ placement
    # for a DLA build. The stand-in is such a signature; it cannot prove which release first had the parameter.
    import edgemm.quant.modelopt_qdq as mq
    from edgemm.errors import DependencyError

    ran = []

    def old_quantize(onnx_path, quantize_mode="int8", **kwargs):
        ran.append(kwargs)

    monkeypatch.setattr(mq, "_import_modelopt", lambda: (old_quantize, "0.45.0"))
    with pytest.raises(DependencyError, match="nvidia-modelopt 0.45.0 cannot place Q/DQ for DLA"):
        quantize_qdq(fp32_onnx, tmp_path / "dla.onnx", _calib(), "int8", target_dla=True)
    assert ran == [] and not (tmp_path / "dla.onnx").exists()
    monkeypatch.undo()
    # The installed modelopt, through edgemm's ORT-isolation wrapper, exposes the parameter.
    mq._require_target_dla(*mq._import_modelopt())
