"""build_engine against a stand-in TensorRT and cuda-python (no TensorRT or GPU here).

What the stand-ins cannot prove: that real TensorRT accepts these calls, places these layers on the DLA,
or builds a working engine. They only show what edgemm asks TensorRT for, in which order, and what it
refuses before asking (tests/gpu/run_on_device.sh runs the real thing on a device)."""

from __future__ import annotations

import hashlib
import json
import sys
import types

import pytest

from edgemm.backends.tensorrt import TensorRTOptions
from edgemm.backends.tensorrt.builder import build_engine
from edgemm.errors import DependencyError, InputError

PLAN = b"stand-in serialized plan"


class _Ok:
    cudaSuccess = "ok"


def _stub(monkeypatch, version: str, *, dla_cores: int = 2, dla_layers=("conv",), all_layers=("conv", "topk"),
          device_count: int = 2):
    """tensorrt + cuda.bindings.runtime stand-ins recording every call that matters."""
    calls: list = []

    class Layer:
        def __init__(self, name):
            self.name = name

    class Network:
        num_inputs = 0
        num_layers = len(all_layers)

        def get_layer(self, i):
            return Layer(all_layers[i])

    class Config:
        DLA_core = -1

        def __init__(self):
            self.flags = []

        def set_memory_pool_limit(self, *a):
            pass

        def set_flag(self, flag):
            calls.append(("set_flag", flag))

        def can_run_on_DLA(self, layer):
            return layer.name in dla_layers

        def create_timing_cache(self, data):
            return object()

        def set_timing_cache(self, cache, ignore):
            return True

        def get_timing_cache(self):
            return types.SimpleNamespace(serialize=lambda: b"cache")

        def __setattr__(self, key, value):
            calls.append(("config", key, value))
            object.__setattr__(self, key, value)

    class Builder:
        num_DLA_cores = dla_cores

        def __init__(self, logger):
            calls.append("Builder")

        def create_network(self, flags):
            return Network()

        def create_builder_config(self):
            return Config()

        def build_serialized_network(self, network, config):
            calls.append("build")
            return bytearray(PLAN)   # buffer protocol, as IHostMemory

    class OnnxParser:
        def __init__(self, network, logger):
            calls.append("OnnxParser")

        def set_flag(self, flag):
            calls.append(("parser flag", flag))

        def set_builder_config(self, config):
            calls.append(("parser config", config.DLA_core))

        def parse_from_file(self, path):
            calls.append("parse")
            return True

    class ILogger:
        class Severity:
            INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

        def __init__(self):
            pass

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            calls.append("inspect")
            info = {"Layers": [{"Name": "{ForeignNode[conv]}", "LayerType": "ForeignNode"},
                               {"Name": "topk", "LayerType": "TopK"}]}
            return types.SimpleNamespace(create_engine_inspector=lambda: types.SimpleNamespace(
                get_engine_information=lambda fmt: json.dumps(info)))

    enum = types.SimpleNamespace
    trt = types.SimpleNamespace(
        __version__=version, Builder=Builder, OnnxParser=OnnxParser, ILogger=ILogger, Runtime=Runtime,
        NetworkDefinitionCreationFlag=enum(STRONGLY_TYPED=0),
        BuilderFlag=enum(FP16="FP16", INT8="INT8", GPU_FALLBACK="GPU_FALLBACK", REFIT="REFIT"),
        MemoryPoolType=enum(WORKSPACE="WORKSPACE"), DeviceType=enum(DLA="DLA", GPU="GPU"),
        ProfilingVerbosity=enum(DETAILED="DETAILED"), LayerInformationFormat=enum(JSON="JSON"),
        OnnxParserFlag=enum(REPORT_CAPABILITY_DLA="REPORT_CAPABILITY_DLA"))
    props = types.SimpleNamespace(name=b"Orin\0", major=8, minor=7, integrated=1)

    def set_device(i):
        calls.append(("cudaSetDevice", i))
        return ("ok",)

    cudart = types.SimpleNamespace(cudaError_t=_Ok, cudaGetDeviceCount=lambda: ("ok", device_count),
                                   cudaGetDeviceProperties=lambda i: ("ok", props), cudaSetDevice=set_device)
    bindings = types.SimpleNamespace(runtime=cudart)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "cuda", types.SimpleNamespace(bindings=bindings))
    monkeypatch.setitem(sys.modules, "cuda.bindings", bindings)
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", cudart)
    return calls


@pytest.fixture
def onnx_file(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"stand-in onnx")
    return path


@pytest.mark.parametrize("version", ["10.3.0.30", "10.8.0", "11.4.0"])
def test_dla_int8_refused_before_parsing_where_tensorrt_cannot_build_it(monkeypatch, onnx_file, tmp_path, version):
    # Old code parsed and built a Q/DQ INT8 DLA engine on 10.x (implicit quantization only there) and tried
    # DLA on releases that have none. Cannot prove: what real TensorRT would have done with it.
    calls = _stub(monkeypatch, version)
    opts = TensorRTOptions(precision="int8", dla_core=0)
    with pytest.raises((InputError, DependencyError)) as err:
        build_engine(onnx_file, tmp_path / "e.plan", opts, timing_cache=tmp_path / "t.cache")
    assert "parse" not in calls and "build" not in calls
    assert "\n" not in str(err.value)
    if version.startswith("10.3"):
        assert "implicit quantization only" in str(err.value)
    else:
        assert "has no DLA support" in str(err.value)


def test_dla_build_reports_per_layer_placement_and_selects_the_device(monkeypatch, onnx_file, tmp_path):
    # Cannot prove: that can_run_on_DLA / the inspector JSON of a real engine look like the stand-in's.
    calls = _stub(monkeypatch, "11.4.1.5")
    built = build_engine(onnx_file, tmp_path / "e.plan", TensorRTOptions(precision="int8", dla_core=1),
                         timing_cache=tmp_path / "t.cache", device=1)
    assert ("cudaSetDevice", 1) in calls and calls.index(("cudaSetDevice", 1)) < calls.index("Builder")
    placement = built["dla_placement"]
    assert placement["dla_core"] == 1 and placement["layers"] == 2 and placement["gpu_layers"] == ["topk"]
    assert placement["engine_layers"] == [("{ForeignNode[conv]}", "ForeignNode"), ("topk", "TopK")]
    assert ("config", "profiling_verbosity", "DETAILED") in calls
    # the parser validates nodes for DLA with the DLA core already set on the config it is given
    assert calls.index(("parser flag", "REPORT_CAPABILITY_DLA")) < calls.index("parse")
    assert ("parser config", 1) in calls
    assert built["tensorrt_version"] == "11.4.1.5" and built["dla_cores"] == 2 and built["integrated"] is True


def test_dla_without_gpu_fallback_refuses_layers_the_dla_cannot_run(monkeypatch, onnx_file, tmp_path):
    calls = _stub(monkeypatch, "10.3.0")
    with pytest.raises(InputError, match="1 layer\\(s\\) cannot run on DLA \\(first: 'topk'\\)"):
        build_engine(onnx_file, tmp_path / "e.plan", TensorRTOptions(precision="fp16", dla_core=0, gpu_fallback=False),
                     timing_cache=tmp_path / "t.cache")
    assert "build" not in calls


def test_engine_written_from_the_plan_buffer_with_its_digest(monkeypatch, onnx_file, tmp_path):
    # Cannot prove: the absence of a host copy inside real TensorRT; shows the file is the plan's bytes and
    # its sha256 is computed from the same buffer.
    _stub(monkeypatch, "10.3.0")
    built = build_engine(onnx_file, tmp_path / "e.plan", TensorRTOptions(precision="fp16"),
                         timing_cache=tmp_path / "t.cache")
    assert (tmp_path / "e.plan").read_bytes() == PLAN
    assert built["engine_sha256"] == hashlib.sha256(PLAN).hexdigest() and built["engine_bytes"] == len(PLAN)
    assert (tmp_path / "t.cache").read_bytes() == b"cache"


def test_builder_adds_one_optimization_profile_per_declared_profile(tmp_path):
    # Cannot prove: that TensorRT accepts these shapes; shows profile i is added i-th with its own ranges.
    from edgemm.backends.tensorrt.builder import _add_profile

    added = []

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, lo, opt, hi):
            self.shapes[name] = (lo, opt, hi)

    network = types.SimpleNamespace(num_inputs=2, get_input=lambda i: [
        types.SimpleNamespace(name="x", shape=(-1, 4)), types.SimpleNamespace(name="k", shape=(1, 4))][i])
    builder = types.SimpleNamespace(create_optimization_profile=Profile)
    config = types.SimpleNamespace(add_optimization_profile=added.append)
    opts = TensorRTOptions(profile_shapes={"x": ((1, 4),) * 3},
                           extra_profiles=({"x": ((2, 4), (32, 4), (32, 4))},))
    _add_profile(None, builder, network, config, opts, tmp_path / "m.onnx")
    assert [p.shapes for p in added] == [{"x": ((1, 4),) * 3}, {"x": ((2, 4), (32, 4), (32, 4))}]


def test_refittable_build_sets_the_refit_flag(monkeypatch, onnx_file, tmp_path):
    calls = _stub(monkeypatch, "10.3.0")
    build_engine(onnx_file, tmp_path / "e.plan", TensorRTOptions(precision="fp16", refittable=True),
                 timing_cache=tmp_path / "t.cache")
    assert ("set_flag", "REFIT") in calls
