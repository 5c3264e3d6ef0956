"""One precision pipeline (quant/plan.py): uniform, per-branch and accuracy-search planners only decide a
QuantPlan; the backend's one quantizer builds it (ONNX Runtime CPU INT8 here)."""

import collections

import numpy as np
import onnx
import pytest

from edgemm.errors import InputError
from edgemm.quant import cpu_int8
from edgemm.quant.ort_int8 import OrtInt8Quantizer
from edgemm.quant.plan import QUANTIZERS, QuantPlan, quantizer_for

torch = pytest.importorskip("torch")

from .test_cpu_int8 import TinyFused, make_data  # noqa: E402


@pytest.fixture(scope="module")
def fp32_onnx(tmp_path_factory):
    torch.manual_seed(0)
    example = make_data(2, seed=0)
    path = tmp_path_factory.mktemp("plan") / "tiny.onnx"
    batch = torch.export.Dim("batch", min=1, max=64)
    torch.onnx.export(TinyFused().eval(), (torch.from_numpy(example["input_ids"]), torch.from_numpy(example["image"])),
                      str(path), dynamo=True, input_names=["input_ids", "image"],
                      output_names=["text_embeds", "logits", "lengths"],
                      dynamic_shapes=({0: batch}, {0: batch}), external_data=False, verbose=False)
    return path


@pytest.fixture
def recorded_builds(monkeypatch):
    """Every plan the ORT quantizer builds, in order."""
    plans = []
    build = OrtInt8Quantizer.build

    def spy(self, out, plan):
        plans.append(plan)
        return build(self, out, plan)

    monkeypatch.setattr(OrtInt8Quantizer, "build", spy)
    return plans


def _quantized_ops(path):
    ops = collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)
    return {k: v for k, v in ops.items() if k in ("MatMulInteger", "QLinearConv", "QLinearMatMul", "QuantizeLinear",
                                                  "DynamicQuantizeLinear")}


def test_every_planner_builds_through_the_one_ort_quantizer(fp32_onnx, tmp_path, recorded_builds):
    from edgemm.quant.accuracy_search import accuracy_aware
    from edgemm.quant.mixed import apply_mixed

    calib, held = make_data(16, seed=1), make_data(16, seed=2)
    # uniform, with --exclude: the plan keeps exactly the Conv out
    facts = cpu_int8.apply_recipe(cpu_int8.ALL_RECIPES["dynamic_per_channel"], fp32_onnx, tmp_path / "u.onnx", calib,
                                  exclude=["op:Conv"])
    uniform = recorded_builds[-1]
    assert uniform.precision == "int8" and list(uniform.exclude) == facts["excluded_nodes"]
    assert [n for n in uniform.exclude] and "QLinearConv" not in _quantized_ops(tmp_path / "u.onnx")

    # per branch: vision (the conv) int8, the text branch's units are the plan's exclusions
    result = apply_mixed(fp32_onnx, tmp_path / "m.onnx", "vision=int8,default=fp32", calib, "onnxruntime",
                         workdir=tmp_path / "mw")
    per_branch = recorded_builds[-1]
    assert result.recipe["branches"]["vision"]["quantized_nodes"] == 1
    assert len(per_branch.exclude) == result.recipe["kept_fp32_nodes"] > 0
    ops = _quantized_ops(tmp_path / "m.onnx")
    assert ops.get("QLinearConv") == 1 and "MatMulInteger" not in ops

    # accuracy search: candidates and the result are plans of the same quantizer
    before = len(recorded_builds)
    result = accuracy_aware(fp32_onnx, tmp_path / "a.onnx", calib, held, "cosine>=0.5", "onnxruntime",
                            workdir=tmp_path / "aw", timing_iterations=2)
    assert len(recorded_builds) - before >= 2                      # all-INT8 candidate + the result
    assert list(recorded_builds[-1].exclude) == result.recipe["exclude_nodes"]
    assert result.recipe["backend"]["excluded_nodes"] == result.recipe["exclude_nodes"]


def test_cached_ranges_equal_fresh_calibration(fp32_onnx, tmp_path):
    """The quantizer calibrates once per graph and op set and reuses the ranges for every plan; ORT's
    calibration must therefore not depend on nodes_to_exclude (else a cached plan would differ)."""
    recipe = cpu_int8.ALL_RECIPES["static_u8s8_per_channel"]
    calib = make_data(8, seed=3)
    warm = OrtInt8Quantizer(fp32_onnx, calib, tmp_path / "warm")
    keep = tuple(warm.units[:2])
    warm.build(tmp_path / "all.onnx", QuantPlan("int8", (), params=recipe.params))          # fills the cache
    assert list((tmp_path / "warm").glob("ranges_*.json"))
    warm.build(tmp_path / "cached.onnx", QuantPlan("int8", keep, params=recipe.params))
    fresh = OrtInt8Quantizer(fp32_onnx, calib, tmp_path / "fresh")
    fresh.build(tmp_path / "fresh.onnx", QuantPlan("int8", keep, params=recipe.params))
    a, b = onnx.load(str(tmp_path / "cached.onnx")), onnx.load(str(tmp_path / "fresh.onnx"))
    inits = lambda m: {t.name: onnx.numpy_helper.to_array(t).tobytes() for t in m.graph.initializer}  # noqa: E731
    assert inits(a) == inits(b)
    assert [n.op_type for n in a.graph.node] == [n.op_type for n in b.graph.node]
    # and new calibration feeds drop the cache
    warm.calib_feeds = warm.feeds[:1]
    assert not list((tmp_path / "warm").glob("ranges_*.json"))


def test_a_plan_that_quantizes_nothing_is_the_fp32_graph(fp32_onnx, tmp_path):
    q = OrtInt8Quantizer(fp32_onnx, make_data(4, seed=4), tmp_path / "w")
    q.recipe = cpu_int8.ALL_RECIPES["dynamic_per_channel"]
    q.build(tmp_path / "none.onnx", QuantPlan(None, params=q.recipe.params))
    assert _quantized_ops(tmp_path / "none.onnx") == {}
    q.build(tmp_path / "all_kept.onnx", q.plan(q.units))
    assert _quantized_ops(tmp_path / "all_kept.onnx") == {}


def test_quantizers_are_looked_up_by_backend():
    from edgemm.quant.qdq import QdqQuantizer

    assert quantizer_for("onnxruntime") is OrtInt8Quantizer and quantizer_for("tensorrt") is QdqQuantizer
    for cls in (OrtInt8Quantizer, QdqQuantizer):
        assert cls.backend in QUANTIZERS and set(cls.modes) <= {"int8", "fp8"}
    with pytest.raises(InputError, match="no quantizer for backend 'tflite'"):
        quantizer_for("tflite")
    plan = QuantPlan("int8", ("b", "a", "b"))
    assert plan.exclude == ("a", "b") and plan.excluding(["c"]).exclude == ("a", "b", "c")
