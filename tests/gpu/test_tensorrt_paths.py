"""Every TensorRT path through the CLI on a machine with TensorRT, cuda-python and an NVIDIA GPU:
FP16 / INT8 / FP8 engines of the tiny fused model (accuracy against the FP32 CPU bundle), DLA where the
device and TensorRT have it, CUDA graphs, threads on device 1 where there is one, a portable bundle
finished by `edgemm build`, build.sh with the device's trtexec and its engine adopted by
`edgemm build --from-engine`, two optimization profiles, refit. Skipped elsewhere.

NOT RUN BY US: written without access to such a machine (see tests/gpu/run_on_device.sh)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.tensorrt, pytest.mark.gpu]

trt = pytest.importorskip("tensorrt", reason="TensorRT Python package not installed")
pytest.importorskip("cuda", reason="cuda-python not installed")

from edgemm.errors import DependencyError  # noqa: E402
from edgemm.runtime.tensorrt_session import cuda_device, import_cudart  # noqa: E402

try:
    DEVICE = cuda_device(0)
except DependencyError as exc:  # pragma: no cover - depends on the machine
    pytest.skip(f"no usable GPU: {exc}", allow_module_level=True)

from edgemm import runtime, targets  # noqa: E402

VERSION = ".".join((trt.__version__.split(".") + ["0", "0"])[:3])
CC = tuple(map(int, DEVICE["compute_capability"].split(".")))


def _dla_cores() -> int:
    logger = trt.Logger(trt.Logger.ERROR)
    return int(trt.Builder(logger).num_DLA_cores)


def _gpu_count() -> int:
    err, count = import_cudart().cudaGetDeviceCount()
    return int(count)


@pytest.fixture(scope="module")
def local_target(tmp_path_factory) -> Path:
    """A profile for this very device (Jetson when the GPU is integrated), so compile builds here."""
    precisions = ["fp32", "fp16", "int8"] + (["fp8"] if CC >= targets.FP8_MIN_CC else [])
    jetson = bool(DEVICE.get("integrated"))
    text = (f'name = "local"\ndescription = {json.dumps(DEVICE["name"])}\n'
            f'kind = "{"jetson" if jetson else "datacenter"}"\nbackend = "tensorrt"\n'
            f'compute_capability = "{DEVICE["compute_capability"]}"\nprecisions = {json.dumps(precisions)}\n'
            f'default_precision = "fp16"\ndla_cores = {_dla_cores() if jetson else 0}\nmemory_mb = 16384\n'
            f'workspace_mb = 1024\nsparse_tensor_cores = {"true" if CC >= (8, 0) else "false"}\n'
            f'tensorrt_versions = ["{VERSION}"]\n' + ('jetpack = "local"\n' if jetson else ""))
    path = tmp_path_factory.mktemp("target") / "local.toml"
    path.write_text(text)
    return path


def _compile(cli, tiny, out: Path, target: Path, *flags) -> Path:
    res = cli("compile", tiny["pt2"], "--target", target, "--calib", tiny["calib"], "-o", out, "--force", *flags,
              timeout=1800)
    assert res.returncode == 0, res.stderr
    return out


def _cosine(a, b) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12))


def _eval_feeds(tiny) -> dict:
    data = np.load(tiny["eval"])
    return {k: data[k][:8] for k in ("image", "input_ids")}


@pytest.mark.parametrize("precision, min_cosine", [("fp16", 0.999), ("int8", 0.98), ("fp8", 0.98)])
def test_engine_per_precision_matches_the_fp32_cpu_bundle(cli, tiny, tiny_bundle, local_target, tmp_path,
                                                          precision, min_cosine):
    if precision == "fp8" and CC < targets.FP8_MIN_CC:
        pytest.skip(f"FP8 needs compute capability >= 8.9, this GPU is {DEVICE['compute_capability']}")
    bundle = _compile(cli, tiny, tmp_path / precision, local_target, f"--{precision}")
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["backend"]["engine"] and manifest["backend"]["built"]["tensorrt_version"] == trt.__version__
    feeds = _eval_feeds(tiny)
    want = runtime.load(tiny_bundle).run(feeds)
    got = runtime.load(bundle).run(feeds)
    for name in want:
        assert _cosine(want[name], got[name]) >= min_cosine, name


def test_cuda_graphs_replay_and_match_direct_execution(cli, tiny, local_target, tmp_path):
    bundle = _compile(cli, tiny, tmp_path / "fp16", local_target, "--fp16")
    feeds = _eval_feeds(tiny)
    direct = runtime.load(bundle, cuda_graph=False).run(feeds)
    graphed = runtime.load(bundle, cuda_graph=True)
    for _ in range(3):
        out = graphed.run(feeds)
    for name in direct:
        np.testing.assert_allclose(out[name], direct[name], rtol=1e-3, atol=1e-3)


def test_dla_engine_where_the_device_has_one(cli, tiny, local_target, tmp_path):
    if not DEVICE.get("integrated") or _dla_cores() == 0:
        pytest.skip("no DLA on this device")
    if not targets.dla_supported(trt.__version__):
        pytest.skip(f"TensorRT {trt.__version__} has no DLA")
    precision = "int8" if targets.dla_precision_supported(trt.__version__, "int8") else "fp16"
    # --dla pins the dynamic batch to its opt value (1): DLA runs static shapes only.
    bundle = _compile(cli, tiny, tmp_path / "dla", local_target, f"--{precision}", "--dla")
    placement = json.loads((bundle / "manifest.json").read_text())["backend"]["built"]["dla_placement"]
    print(f"DLA placement ({precision}): {len(placement['gpu_layers'])} of {placement['layers']} layers on the GPU")
    out = runtime.load(bundle).run({k: v[:1] for k, v in _eval_feeds(tiny).items()})
    assert all(np.isfinite(v).all() for v in out.values())


def test_threads_on_device_1(cli, tiny, local_target, tmp_path):
    if _gpu_count() < 2:
        pytest.skip("one GPU only")
    if cuda_device(1)["name"] != DEVICE["name"]:
        pytest.skip("device 1 is another GPU model (engines are per GPU model)")
    bundle = _compile(cli, tiny, tmp_path / "fp16", local_target, "--fp16")
    loaded = runtime.load(bundle, device=1)
    feeds = _eval_feeds(tiny)
    want = loaded.run(feeds)
    errors = []

    def work():
        try:
            for _ in range(5):
                got = loaded.run(feeds)
                for name in want:
                    np.testing.assert_allclose(got[name], want[name], rtol=1e-3, atol=1e-3)
        except Exception as exc:  # noqa: BLE001 - asserted below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


def _mlp(tmp_path: Path, weight: float = 1.0) -> Path:
    """x[batch, 64] @ W[64, 32] with W = weight everywhere: easy to check, weights easy to swap."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    w = np.full((64, 32), weight, np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 32])],
                              [numpy_helper.from_array(w, "W")])
    path = tmp_path / f"mlp-{weight}.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


MLP_INPUTS = [{"name": "x", "dtype": "float32", "shape": ["batch", 64], "ranges": {"batch": [1, 4, 16]}}]


def _mlp_bundle(tmp_path: Path, build_now: bool, **overrides) -> Path:
    from edgemm.backends.tensorrt import options_for_target, package
    from edgemm.runtime.manifest import sha256_file, write_json_atomic

    profile = tmp_path / "local.toml"
    profile.write_text(f'name = "local"\ndescription = "x"\nkind = "datacenter"\nbackend = "tensorrt"\n'
                       f'compute_capability = "{DEVICE["compute_capability"]}"\nprecisions = ["fp32", "fp16"]\n'
                       f'default_precision = "fp32"\ndla_cores = 0\nmemory_mb = 16384\nworkspace_mb = 1024\n'
                       f'sparse_tensor_cores = false\ntensorrt_versions = ["{VERSION}"]\n')
    target = targets.load(str(profile))
    bundle = tmp_path / "bundle"
    backend = package(_mlp(tmp_path), bundle, target, options_for_target(target, "fp32", inputs=MLP_INPUTS,
                                                                          **overrides),
                      build_now=build_now, bundle_name="mlp", timing_cache=tmp_path / "t.cache")
    files = {p.name: sha256_file(p) for p in bundle.iterdir() if p.is_file()}
    write_json_atomic(bundle / "manifest.json", {
        "format": "edgemm-bundle", "format_version": 1, "name": "mlp", "inputs": MLP_INPUTS,
        "outputs": [{"name": "y", "dtype": "float32", "shape": ["batch", 32]}], "precision": {"mode": "fp32"},
        "target": {"name": "local"}, "backend": backend, "files": files})
    return bundle


def _trtexec() -> str:
    trtexec = shutil.which("trtexec") or "/usr/src/tensorrt/bin/trtexec"
    if not os.access(trtexec, os.X_OK):
        pytest.skip("trtexec not found")
    return trtexec


def test_build_sh_engine_adopted_by_edgemm_build(tmp_path, cli):
    trtexec = _trtexec()
    bundle = _mlp_bundle(tmp_path, build_now=False)
    engine = tmp_path / "mlp.engine"
    res = subprocess.run(["bash", str(bundle / "build.sh"), str(engine)], env=dict(os.environ, TRTEXEC=trtexec),
                         capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, res.stderr[-2000:]
    res = cli("build", bundle, "--from-engine", engine)
    assert res.returncode == 0, res.stderr
    x = np.ones((3, 64), np.float32)
    np.testing.assert_allclose(runtime.load(bundle).run({"x": x})["y"], np.full((3, 32), 64.0), rtol=1e-3)


def test_two_optimization_profiles_both_serve_calls(tmp_path):
    latency = {"x": ((1, 64),) * 3}
    throughput = {"x": ((2, 64), (16, 64), (16, 64))}
    bundle = _mlp_bundle(tmp_path, build_now=True, profile_shapes=latency, extra_profiles=(throughput,))
    from edgemm.backends.tensorrt import TensorRTOptions

    manifest = json.loads((bundle / "manifest.json").read_text())
    assert len(TensorRTOptions.from_dict(manifest["backend"]["options"]).profiles) == 2
    loaded = runtime.load(bundle)
    for batch in (1, 12, 1, 16):
        x = np.ones((batch, 64), np.float32)
        np.testing.assert_allclose(loaded.run({"x": x})["y"], np.full((batch, 32), 64.0), rtol=1e-3)


def test_refit_swaps_the_weights(tmp_path, cli):
    bundle = _mlp_bundle(tmp_path, build_now=True, refittable=True)
    res = cli("build", bundle, "--refit", _mlp(tmp_path, weight=2.0))
    assert res.returncode == 0, res.stderr
    x = np.ones((2, 64), np.float32)
    np.testing.assert_allclose(runtime.load(bundle).run({"x": x})["y"], np.full((2, 32), 128.0), rtol=1e-3)
