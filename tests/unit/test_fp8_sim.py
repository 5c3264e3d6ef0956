"""FP8 (E4M3) Q/DQ generation for FP8-capable targets, refusal for the others, and the CPU simulation
that estimates FP8 accuracy (float ops rounding like ml_dtypes)."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
ml_dtypes = pytest.importorskip("ml_dtypes")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from edgemm.errors import InputError  # noqa: E402
from edgemm.quant.fp8_sim import Fp8Simulator, rewrite_fp8_qdq, round_to_fp8, simulate_fp8  # noqa: E402


def _qdq_pair_model(fmt: int, scale: float = 0.37):
    zp = helper.make_tensor("zp", fmt, [], [0.0])
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"], name="q"),
         helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"], name="dq")], "pair",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])],
        [numpy_helper.from_array(np.array(scale, np.float32), "s"), zp])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def _hard_values(np_fp8) -> np.ndarray:
    """Every representable value, the midpoints between neighbours (ties), their float32 neighbours,
    out-of-range values (saturation) and a wide random spread."""
    reps = np.arange(256, dtype=np.uint8).view(np_fp8).astype(np.float32)
    reps = np.unique(reps[np.isfinite(reps)])
    mids = (reps[1:] + reps[:-1]) / 2
    rng = np.random.default_rng(0)
    return np.concatenate([reps, mids, np.nextafter(mids, np.inf), np.nextafter(mids, -np.inf),
                           np.nextafter(reps, np.inf), np.nextafter(reps, -np.inf),
                           rng.standard_normal(50_000).astype(np.float32) * 300,
                           np.float32([1e6, -1e6, 0.0, -0.0, 1e-30])]).astype(np.float32)


@pytest.mark.parametrize("fmt,np_name", [(TensorProto.FLOAT8E4M3FN, "float8_e4m3fn"),
                                         (TensorProto.FLOAT8E5M2, "float8_e5m2")])
def test_activation_rounding_equals_ml_dtypes(fmt, np_name):
    scale = np.float32(0.37)
    sim, stats = rewrite_fp8_qdq(_qdq_pair_model(fmt, float(scale)))
    assert stats.activation_pairs == 1 and stats.weight_pairs == 0
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in sim.graph.node)
    values = _hard_values(getattr(ml_dtypes, np_name))
    x = values * scale
    got = ort.InferenceSession(sim.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    want = round_to_fp8(x / scale, TensorProto.DataType.Name(fmt)) * scale
    np.testing.assert_array_equal(got, want)


def test_simulation_matches_onnxruntime_native_fp8_where_it_runs():
    model = _qdq_pair_model(TensorProto.FLOAT8E4M3FN)
    try:
        native = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception:  # builds without float8 kernels: nothing to compare against
        pytest.skip("this onnxruntime build cannot run float8 Q/DQ")
    x = _hard_values(ml_dtypes.float8_e4m3fn) * np.float32(0.37)
    sim, _ = rewrite_fp8_qdq(model)
    got = ort.InferenceSession(sim.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_array_equal(got, native.run(None, {"x": x})[0])


def test_per_channel_weights_are_folded_with_ml_dtypes():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((8, 6)).astype(np.float32) * np.float32([[1], [10], [100], [0.1], [1], [3], [7], [50]])
    scales = (np.abs(w).max(axis=1) / 448.0).astype(np.float32)
    zp = helper.make_tensor("wzp", TensorProto.FLOAT8E4M3FN, [8], [0.0] * 8)
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["w", "ws", "wzp"], ["wq"], name="wq", axis=0),
         helper.make_node("DequantizeLinear", ["wq", "ws", "wzp"], ["wdq"], name="wdq", axis=0),
         helper.make_node("MatMul", ["wdq", "x"], ["y"], name="mm")], "w",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [6, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, 3])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(scales, "ws"), zp])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    sim, stats = rewrite_fp8_qdq(model)
    assert stats.weight_pairs == 1 and stats.activation_pairs == 0
    folded = numpy_helper.to_array(next(t for t in sim.graph.initializer if t.name == "wdq"))
    want = (w / scales[:, None]).astype(ml_dtypes.float8_e4m3fn).astype(np.float32) * scales[:, None]
    np.testing.assert_array_equal(folded, want)
    assert not any(numpy_helper.to_array(t).dtype == ml_dtypes.float8_e4m3fn for t in sim.graph.initializer)


def test_blocked_and_non_fp8_models_are_refused(tmp_path):
    int8 = _qdq_pair_model(TensorProto.INT8)
    path = tmp_path / "int8.onnx"
    onnx.save(int8, str(path))
    with pytest.raises(InputError, match="no float8"):
        Fp8Simulator(path)
    with pytest.raises(InputError, match="not found"):
        simulate_fp8(tmp_path / "missing.onnx", {})


# --- FP8 generation for TensorRT targets -----------------------------------------------------------

torch = pytest.importorskip("torch")
pytest.importorskip("modelopt.onnx.quantization", reason="nvidia-modelopt is needed for Q/DQ generation")


class _Towers(torch.nn.Module):
    """Image tower (convs, >16 channels: modelopt skips smaller FP8 convs) + text tower + head."""

    def __init__(self):
        super().__init__()
        self.image_encoder = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU(),
                                                 torch.nn.Conv2d(32, 32, 3, padding=1), torch.nn.ReLU())
        self.embed = torch.nn.Embedding(100, 64)
        self.text_encoder = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 64))
        self.head = torch.nn.Linear(96, 32)

    def forward(self, image, input_ids):
        a = self.image_encoder(image).mean(dim=(2, 3))
        b = self.text_encoder(self.embed(input_ids)).mean(dim=1)
        return self.head(torch.cat([a, b], dim=1))


def _data(n, seed):
    rng = np.random.default_rng(seed)
    return {"image": rng.standard_normal((n, 3, 16, 16)).astype(np.float32),
            "input_ids": rng.integers(0, 100, size=(n, 12)).astype(np.int64)}


@pytest.fixture(scope="module")
def towers_onnx(tmp_path_factory):
    import warnings

    torch.manual_seed(0)
    model = _Towers().eval()
    path = tmp_path_factory.mktemp("fp8") / "towers.onnx"
    args = tuple(torch.from_numpy(v) for v in _data(2, 0).values())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, args, str(path), input_names=["image", "input_ids"], output_names=["logits"],
                          dynamic_shapes={"image": {0: "batch"}, "input_ids": {0: "batch"}}, dynamo=True,
                          external_data=False, verbose=False)
    return path


def _run(path, feeds):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0]


def _cos(a, b):
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return float(((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).mean())


def test_fp8_policy_on_fp8_target_writes_e4m3_qdq_and_simulates(towers_onnx, tmp_path):
    from edgemm.quant.mixed import apply_mixed
    from edgemm.quant.modelopt_qdq import inspect_qdq

    out = tmp_path / "fp8.onnx"
    result = apply_mixed(towers_onnx, out, "default=fp8", _data(32, 1), "tensorrt", target="h100")
    assert result.mode == "fp8" and result.simulated
    stats = inspect_qdq(onnx.load(str(out)))
    assert stats["quantize_linear"] > 0 and set(stats["quantized_dtypes"]) == {"FLOAT8E4M3FN"}
    feeds = _data(16, 2)
    simulated = simulate_fp8(out, feeds)["logits"]
    reference = _run(towers_onnx, feeds)
    assert np.isfinite(simulated).all()
    cos = _cos(reference, simulated)
    assert 0.95 < cos < 1.0   # FP8 changes the numbers, but not the answer


def test_fp8_only_on_the_quantized_branch(towers_onnx, tmp_path):
    from edgemm.quant.mixed import apply_mixed

    result = apply_mixed(towers_onnx, tmp_path / "vision_fp8.onnx", "vision=fp8,text=fp16,fusion=fp32",
                         _data(32, 1), "tensorrt", target="l40s")
    branches = result.recipe["branches"]
    assert branches["vision"]["quantized_nodes"] > 0
    assert branches["text"]["quantized_nodes"] == 0 and branches["fusion"]["quantized_nodes"] == 0
    assert branches["text"]["precision"] == "fp16"
    out = simulate_fp8(result.path, _data(4, 3))["logits"]
    assert out.shape == (4, 32) and np.isfinite(out).all()


@pytest.mark.parametrize("target,backend", [("jetson-orin-nano", "tensorrt"), ("jetson-agx-orin", "tensorrt"),
                                            ("a100", "tensorrt"), ("cpu", "onnxruntime")])
def test_fp8_is_refused_for_targets_without_it(towers_onnx, tmp_path, target, backend):
    from edgemm import targets
    from edgemm.quant.accuracy_search import accuracy_aware
    from edgemm.quant.mixed import apply_mixed

    with pytest.raises(InputError, match="fp8"):
        targets.load(target).validate("fp8")
    with pytest.raises(InputError, match="does not support fp8|fp8 .*does not run"):
        apply_mixed(towers_onnx, tmp_path / "x.onnx", "vision=fp8", _data(8, 1), backend, target=target)
    with pytest.raises(InputError, match="fp8"):
        accuracy_aware(towers_onnx, tmp_path / "y.onnx", _data(8, 1), _data(8, 2), "cosine>=0.99",
                       targets.load(target), mode="fp8", workdir=tmp_path / "w")
    assert not (tmp_path / "x.onnx").exists() and not (tmp_path / "y.onnx").exists()
