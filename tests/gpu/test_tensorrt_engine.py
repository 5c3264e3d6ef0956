"""End to end on a machine with TensorRT, cuda-python and an NVIDIA GPU: build an engine from a tiny
ONNX model (directly and through a portable bundle + `edgemm build`), load it with the runtime, compare
against numpy, replay CUDA graphs, run from several threads. Skipped elsewhere."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.tensorrt, pytest.mark.gpu]

trt = pytest.importorskip("tensorrt", reason="TensorRT Python package not installed")
pytest.importorskip("cuda", reason="cuda-python not installed")
onnx = pytest.importorskip("onnx", reason="onnx is needed to write the test model")

from edgemm.errors import DependencyError  # noqa: E402
from edgemm.runtime.tensorrt_session import cuda_device  # noqa: E402

try:
    DEVICE = cuda_device(0)
except DependencyError as exc:  # pragma: no cover - depends on the machine
    pytest.skip(f"no usable GPU: {exc}", allow_module_level=True)

from edgemm import runtime, targets  # noqa: E402
from edgemm.backends.tensorrt import options_for_target, package  # noqa: E402
from edgemm.backends.tensorrt.package import finish_portable_bundle  # noqa: E402
from edgemm.runtime.manifest import sha256_file, write_json_atomic  # noqa: E402

RNG = np.random.default_rng(0)
W = RNG.standard_normal((64, 32)).astype(np.float32)
B = RNG.standard_normal(32).astype(np.float32)
INPUTS = [{"name": "x", "dtype": "float32", "shape": ["batch", 64], "ranges": {"batch": [1, 4, 16]}}]
OUTPUTS = [{"name": "y", "dtype": "float32", "shape": ["batch", 32]}]


def _reference(x):
    return np.maximum(x @ W + B, 0)


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory):
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 32])
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Add", ["h", "B"], ["a"]),
             helper.make_node("Relu", ["a"], ["y"])]
    graph = helper.make_graph(nodes, "g", [x], [y], [numpy_helper.from_array(W, "W"), numpy_helper.from_array(B, "B")])
    path = tmp_path_factory.mktemp("gpu") / "mlp.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.fixture(scope="module")
def local_target(tmp_path_factory):
    """A profile for this very GPU, so the builder agrees to build here."""
    version = ".".join((trt.__version__.split(".") + ["0", "0"])[:3])   # MAJOR.MINOR.PATCH, as profiles need
    cc = DEVICE["compute_capability"]
    fp8 = tuple(map(int, cc.split("."))) >= targets.FP8_MIN_CC
    precisions = json.dumps(["fp32", "fp16", "int8"] + (["fp8"] if fp8 else []))
    text = (f'name = "local"\ndescription = {json.dumps(DEVICE["name"])}\nkind = "datacenter"\n'
            f'backend = "tensorrt"\ncompute_capability = "{cc}"\nprecisions = {precisions}\n'
            f'default_precision = "fp16"\ndla_cores = 0\nmemory_mb = 16384\nworkspace_mb = 1024\n'
            f'sparse_tensor_cores = true\ntensorrt_versions = ["{version}"]\n')
    path = tmp_path_factory.mktemp("target") / "local.toml"
    path.write_text(text)
    return targets.load(str(path))


def _finish_manifest(bundle: Path, backend: dict) -> None:
    files = {p.name: sha256_file(p) for p in bundle.iterdir() if p.is_file() and p.name != "manifest.json"}
    write_json_atomic(bundle / "manifest.json", {
        "format": "edgemm-bundle", "format_version": 1, "name": bundle.name, "inputs": INPUTS, "outputs": OUTPUTS,
        "precision": {"mode": "fp32"}, "target": {"name": "local"}, "backend": backend, "files": files})


def test_build_now_load_and_run(onnx_model, local_target, tmp_path):
    bundle = tmp_path / "built"
    opts = options_for_target(local_target, "fp32", inputs=INPUTS)
    backend = package(onnx_model, bundle, local_target, opts, timing_cache=tmp_path / "t.cache")
    assert backend["portable"] is False and backend["engine"] == "model.engine"
    assert backend["built"]["tensorrt_version"] == trt.__version__
    assert (tmp_path / "t.cache").stat().st_size > 0
    _finish_manifest(bundle, backend)
    loaded = runtime.load(bundle)
    for batch in (1, 3, 16):
        x = RNG.standard_normal((batch, 64)).astype(np.float32)
        np.testing.assert_allclose(loaded.run({"x": x})["y"], _reference(x), rtol=1e-3, atol=1e-3)


def test_portable_bundle_finished_by_edgemm_build(onnx_model, local_target, tmp_path):
    bundle = tmp_path / "portable"
    backend = package(onnx_model, bundle, local_target, options_for_target(local_target, "fp32", inputs=INPUTS),
                      build_now=False)
    _finish_manifest(bundle, backend)
    engine = finish_portable_bundle(bundle, timing_cache=tmp_path / "t.cache")
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["backend"]["engine"] == engine.name and manifest["files"][engine.name] == sha256_file(engine)
    x = RNG.standard_normal((2, 64)).astype(np.float32)
    np.testing.assert_allclose(runtime.load(bundle).run({"x": x})["y"], _reference(x), rtol=1e-3, atol=1e-3)


def test_cuda_graph_replay_and_threads(onnx_model, local_target, tmp_path):
    bundle = tmp_path / "graph"
    opts = options_for_target(local_target, "fp32", inputs=INPUTS, cuda_graph=True)
    _finish_manifest(bundle, package(onnx_model, bundle, local_target, opts))
    loaded = runtime.load(bundle)
    x = RNG.standard_normal((4, 64)).astype(np.float32)
    first = loaded.run({"x": x})["y"]
    again = loaded.run({"x": x})["y"]           # replayed graph
    other = loaded.run({"x": x * 2})["y"]       # same shapes, new data through the same buffers
    np.testing.assert_allclose(first, _reference(x), rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(again, first, rtol=0, atol=0)
    np.testing.assert_allclose(other, _reference(x * 2), rtol=1e-3, atol=1e-3)

    errors = []

    def worker(seed):
        rng = np.random.default_rng(seed)
        for _ in range(10):
            xi = rng.standard_normal((int(rng.integers(1, 16)), 64)).astype(np.float32)
            try:
                np.testing.assert_allclose(loaded.run({"x": xi})["y"], _reference(xi), rtol=1e-3, atol=1e-3)
            except Exception as exc:  # noqa: BLE001 - collected and asserted below
                errors.append(exc)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
