"""TensorRTSession refuses, in one line and before any deserialization: portable bundles, tampered
engines, missing TensorRT / cuda-python, and engines built for another TensorRT or GPU."""

from __future__ import annotations

import hashlib
import sys
import types

import pytest

from edgemm.errors import BundleError, DependencyError
from edgemm.runtime.tensorrt_session import TensorRTSession

ENGINE = b"pretend-serialized-engine"


def _manifest(engine: str | None = "model.engine", built=None, digest=None, options=None) -> dict:
    files = {"model.onnx": "0" * 64}
    if engine:
        files[engine] = digest or hashlib.sha256(ENGINE).hexdigest()
    return {
        "format": "edgemm-bundle", "format_version": 1, "name": "b",
        "inputs": [{"name": "x", "dtype": "float32", "shape": [1, 4]}],
        "outputs": [{"name": "y", "dtype": "float32", "shape": [1, 4]}],
        "precision": {"mode": "fp16"}, "target": {"name": "jetson-orin-nano"},
        "backend": {"name": "tensorrt", "portable": engine is None, "onnx": "model.onnx", "engine": engine,
                    "compute_capability": "8.7", "options": options or {},
                    "built": built if built is not None else (
                        None if engine is None else {"tensorrt_version": "10.3.0", "compute_capability": "8.7",
                                                     "gpu": "Orin"})},
        "files": files,
    }


@pytest.fixture
def bundle(tmp_path):
    (tmp_path / "model.engine").write_bytes(ENGINE)
    return tmp_path


def _one_line(exc) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


def test_portable_bundle_is_refused_with_the_build_command(tmp_path):
    with pytest.raises(BundleError) as err:
        TensorRTSession(tmp_path, _manifest(engine=None))
    assert f"bundle {tmp_path} is a portable TensorRT bundle with no engine; run `edgemm build {tmp_path}` " \
           "on the device" in _one_line(err)


def test_missing_tensorrt_is_a_dependency_error(bundle, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)   # import tensorrt -> ImportError
    with pytest.raises(DependencyError) as err:
        TensorRTSession(bundle, _manifest())
    assert "TensorRT Python package not found" in _one_line(err)


def test_missing_cuda_python_is_a_dependency_error(bundle, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.3.0"))
    for name in ("cuda", "cuda.bindings", "cuda.bindings.runtime", "cuda.cudart"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(DependencyError) as err:
        TensorRTSession(bundle, _manifest())
    assert "cuda-python not found" in _one_line(err)


def test_tampered_engine_is_refused_before_tensorrt_is_touched(bundle, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    (bundle / "model.engine").write_bytes(ENGINE + b"!")
    with pytest.raises(BundleError) as err:
        TensorRTSession(bundle, _manifest())
    assert "does not match its sha256" in _one_line(err)


def test_engine_path_escaping_the_bundle_is_refused(bundle):
    manifest = _manifest(engine="../model.engine")
    with pytest.raises(BundleError, match="escapes the bundle"):
        TensorRTSession(bundle, manifest)


def test_engine_without_build_record_is_refused(bundle):
    with pytest.raises(BundleError, match="does not record the TensorRT version"):
        TensorRTSession(bundle, _manifest(built={}))


class _Err:
    cudaSuccess = "ok"


def _stub_stack(monkeypatch, trt_version: str, cc: tuple[int, int], gpus: int = 1, name: bytes = b"Orin"):
    """Stand-ins for tensorrt and cuda-python that record whether an engine was ever deserialized."""
    calls = []

    class Runtime:
        def __init__(self, logger):
            calls.append("Runtime")

        def deserialize_cuda_engine(self, data):
            calls.append("deserialize")
            return None

    class ILogger:
        class Severity:
            INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

        def __init__(self):
            pass

    trt = types.SimpleNamespace(__version__=trt_version, Runtime=Runtime, ILogger=ILogger)
    props = types.SimpleNamespace(name=name + b"\0\0", major=cc[0], minor=cc[1])
    runtime = types.SimpleNamespace(
        cudaError_t=_Err,
        cudaGetDeviceCount=lambda: ("ok", gpus),
        cudaGetDeviceProperties=lambda i: ("ok", props),
        cudaSetDevice=lambda i: ("ok",),
    )
    bindings = types.SimpleNamespace(runtime=runtime)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "cuda", types.SimpleNamespace(bindings=bindings))
    monkeypatch.setitem(sys.modules, "cuda.bindings", bindings)
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", runtime)
    return calls


def test_other_tensorrt_version_is_refused_before_deserializing(bundle, monkeypatch):
    calls = _stub_stack(monkeypatch, "10.4.0.26", (8, 7))
    with pytest.raises(BundleError) as err:
        TensorRTSession(bundle, _manifest())
    text = _one_line(err)
    assert "built with TensorRT 10.3.0 but this machine has TensorRT 10.4.0.26" in text
    assert f"edgemm build {bundle}" in text
    assert calls == []


def test_other_compute_capability_is_refused_before_deserializing(bundle, monkeypatch):
    calls = _stub_stack(monkeypatch, "10.3.0", (9, 0), name=b"Stub GPU")
    with pytest.raises(BundleError) as err:
        TensorRTSession(bundle, _manifest())
    assert "compute capability 8.7" in _one_line(err) and "Stub GPU (compute capability 9.0)" in str(err.value)
    assert calls == []
    # Hardware-compatible (Ampere+) engines may move between GPUs: the check passes, TensorRT decides.
    with pytest.raises(BundleError, match="could not deserialize"):
        TensorRTSession(bundle, _manifest(options={"hardware_compatibility": "ampere_plus"}))
    assert calls == ["Runtime", "deserialize"]


def test_no_gpu_is_a_dependency_error(bundle, monkeypatch):
    _stub_stack(monkeypatch, "10.3.0", (8, 7), gpus=0)
    with pytest.raises(DependencyError) as err:
        TensorRTSession(bundle, _manifest())
    assert "no CUDA GPU is visible" in _one_line(err)


def test_matching_engine_is_deserialized_without_host_code(bundle, monkeypatch):
    seen = {}
    calls = _stub_stack(monkeypatch, "10.3.0", (8, 7))

    class Runtime:
        def __init__(self, logger):
            calls.append("Runtime")

        def __setattr__(self, key, value):
            seen[key] = value

        def deserialize_cuda_engine(self, data):
            seen["data"] = data
            return None

    sys.modules["tensorrt"].Runtime = Runtime
    with pytest.raises(BundleError, match="could not deserialize"):
        TensorRTSession(bundle, _manifest())
    assert seen["engine_host_code_allowed"] is False and seen["data"] == ENGINE


def test_runtime_load_of_a_portable_bundle_gives_one_line(tmp_path):
    from edgemm.runtime.manifest import sha256_file, write_json_atomic

    (tmp_path / "model.onnx").write_bytes(b"onnx")
    manifest = _manifest(engine=None)
    manifest["files"] = {"model.onnx": sha256_file(tmp_path / "model.onnx")}
    write_json_atomic(tmp_path / "manifest.json", manifest)
    from edgemm import runtime

    with pytest.raises(BundleError) as err:
        runtime.load(tmp_path)
    assert "portable TensorRT bundle with no engine" in _one_line(err)


def test_cuda_python_is_pinned_to_one_cuda_major_per_extra():
    # Old pyproject: cuda-python>=12.0, so a JetPack 6 (CUDA 12.6) install got cuda-python 13, which needs
    # driver 580+. What this cannot prove: that pip resolves these on a device (it reads the pins only).
    import re
    from pathlib import Path

    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    extras = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    for name, major in (("tensorrt-cu12", 12), ("tensorrt-cu13", 13), ("jetson-cu12", 12), ("jetson-cu13", 13)):
        pins = [r for r in extras[name] if r.startswith("cuda-python")]
        assert pins == [f"cuda-python>={major}{'.6' if major == 12 else ''},<{major + 1}"], (name, pins)
        assert all(re.match(rf"tensorrt-cu{major}\b", r) for r in extras[name] if r.startswith("tensorrt"))
    assert extras["tensorrt"] == ["edgemm[tensorrt-cu12]"]
