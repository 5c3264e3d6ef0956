"""TensorRT backend without TensorRT: options, trtexec command lines for TRT 10 and 11, portable bundles
(build.sh run against a stand-in trtexec that enforces each version's documented flag set), `edgemm build`
refusing cleanly where TensorRT is missing."""

from __future__ import annotations

import importlib.util
import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from edgemm import targets
from edgemm.backends.tensorrt import (TensorRTOptions, options_for_target, package, profile_shapes_from_inputs,
                                     trtexec_command)
from edgemm.backends.tensorrt.package import check_options_for_target
from edgemm.errors import InputError

# trtexec flags edgemm may emit, per TensorRT major, from trtexec's parser (samples/common/sampleOptions.cpp,
# NVIDIA/TensorRT release/10.x and 11.x) and the 10.x -> 11.x trtexec migration page (precision flags removed).
COMMON_FLAGS = {"onnx", "saveEngine", "skipInference", "minShapes", "optShapes", "maxShapes", "memPoolSize",
                "builderOptimizationLevel", "timingCacheFile", "useDLACore", "allowGPUFallback", "sparsity",
                "versionCompatible", "excludeLeanRuntime", "hardwareCompatibilityLevel", "stronglyTyped", "profile", "refit"}
FLAGS = {10: COMMON_FLAGS | {"fp16", "bf16", "int8", "fp8", "best"}, 11: set(COMMON_FLAGS)}

INPUTS = [{"name": "image", "dtype": "float32", "shape": ["batch", 3, 16, 16], "ranges": {"batch": [1, 4, 8]}},
          {"name": "input_ids", "dtype": "int64", "shape": ["batch", "input_ids_dim1"],
           "ranges": {"batch": [1, 4, 8], "input_ids_dim1": [1, 8, 16]}}]


def _flags(cmd):
    return {a[2:].split("=", 1)[0] for a in cmd[1:]}


def _value(cmd, flag):
    return next(a.split("=", 1)[1] for a in cmd if a.startswith(f"--{flag}="))


@pytest.mark.parametrize("major", [10, 11])
def test_strongly_typed_command_uses_only_documented_flags(major):
    opts = options_for_target(targets.load("h100"), "fp8", inputs=INPUTS, opt_level=5, version_compatible=True,
                              hardware_compatibility="same_cc")
    cmd = trtexec_command("model.onnx", "model.engine", opts, major, timing_cache="t.cache")
    assert cmd[0] == "trtexec" and _flags(cmd) <= FLAGS[major]
    assert "--stronglyTyped" in cmd and not {"fp8", "fp16", "int8"} & _flags(cmd)
    assert _value(cmd, "minShapes") == "image:1x3x16x16,input_ids:1x1"
    assert _value(cmd, "optShapes") == "image:4x3x16x16,input_ids:4x8"
    assert _value(cmd, "maxShapes") == "image:8x3x16x16,input_ids:8x16"
    assert _value(cmd, "memPoolSize") == "workspace:8192"     # the h100 profile's budget, MiB
    assert _value(cmd, "builderOptimizationLevel") == "5"
    assert _value(cmd, "hardwareCompatibilityLevel") == "sameComputeCapability"
    assert {"versionCompatible", "excludeLeanRuntime"} <= _flags(cmd)


def test_dla_on_trt10_is_fp16_weak_typing_and_trt11_stays_strongly_typed():
    agx = targets.load("jetson-agx-orin")
    fp16 = options_for_target(agx, "fp16", dla=True)
    ten = trtexec_command("m.onnx", "m.engine", fp16, 10)
    assert {"fp16", "useDLACore", "allowGPUFallback"} <= _flags(ten) <= FLAGS[10]
    assert "stronglyTyped" not in _flags(ten) and "int8" not in _flags(ten)
    int8 = options_for_target(agx, "int8", dla=True)
    eleven = trtexec_command("m.onnx", "m.engine", int8, 11)
    assert "stronglyTyped" in _flags(eleven) and _flags(eleven) <= FLAGS[11]
    assert _value(eleven, "useDLACore") == "0"
    no_fallback = trtexec_command("m.onnx", "m.engine", int8.with_(gpu_fallback=False), 11)
    assert "allowGPUFallback" not in _flags(no_fallback)


def test_dla_pins_dynamic_inputs_to_static_shapes():
    # Old code kept min 1 / max 8 for a DLA build: TensorRT then runs those layers on the GPU silently.
    opts = options_for_target(targets.load("jetson-orin-nx"), "fp16", dla=True, inputs=INPUTS)
    assert opts.profile_shapes["image"] == ((4, 3, 16, 16),) * 3
    assert opts.profile_shapes["input_ids"] == ((4, 8),) * 3
    cmd = trtexec_command("m.onnx", "m.engine", opts, 10)
    assert _value(cmd, "minShapes") == _value(cmd, "optShapes") == _value(cmd, "maxShapes")
    # A hand-edited manifest with a range and a DLA core is refused, not built half on the GPU.
    ranged = dict(opts.to_dict(), profile_shapes={"image": [[1, 3, 16, 16], [4, 3, 16, 16], [8, 3, 16, 16]]})
    with pytest.raises(InputError, match="min/opt/max range, which DLA cannot run"):
        TensorRTOptions.from_dict(ranged)


def test_dla_int8_on_tensorrt_10_refused_before_work():
    # Old code built the Q/DQ INT8 model with --int8 --useDLACore on TensorRT 10.x, which takes implicit
    # quantization only on DLA.
    with pytest.raises(InputError, match="implicit quantization only"):
        check_options_for_target(targets.load("jetson-orin-nx"), TensorRTOptions(precision="int8", dla_core=0))


def test_sparse_weights_flag():
    opts = options_for_target(targets.load("a100"), "int8", sparse_weights=True)
    assert "--sparsity=enable" in trtexec_command("m.onnx", "m.engine", opts, 10)


@pytest.mark.parametrize("major", [10, 11])
def test_refittable_engines_use_the_documented_flag(major):
    opts = options_for_target(targets.load("a100"), "fp16", refittable=True)
    cmd = trtexec_command("m.onnx", "m.engine", opts, major)
    assert "--refit" in cmd and _flags(cmd) <= FLAGS[major]
    with pytest.raises(InputError, match="DLA engines cannot be refitted"):
        TensorRTOptions(precision="fp16", dla_core=0, refittable=True)


def test_options_round_trip_and_refusals():
    opts = options_for_target(targets.load("jetson-orin-nx"), "fp16", dla=1, inputs=INPUTS)
    assert TensorRTOptions.from_dict(json.loads(json.dumps(opts.to_dict()))) == opts
    with pytest.raises(InputError, match="unknown TensorRT option"):
        TensorRTOptions.from_dict({"dla": 0})
    with pytest.raises(InputError, match="outside 0..5"):
        TensorRTOptions(opt_level=7)
    with pytest.raises(InputError, match="DLA runs fp16 or int8"):
        TensorRTOptions(precision="fp32", dla_core=0)
    with pytest.raises(InputError, match="min <= opt <= max"):
        TensorRTOptions(profile_shapes={"x": ((1, 8), (1, 4), (1, 16))})
    with pytest.raises(InputError, match="no min:opt:max range"):
        profile_shapes_from_inputs([{"name": "ids", "dtype": "int64", "shape": [1, "seq"]}])
    assert profile_shapes_from_inputs([{"name": "x", "dtype": "float32", "shape": [1, 3]}]) == {}


@pytest.mark.parametrize("target, precision, kwargs, pattern", [
    ("jetson-orin-nano", "fp8", {}, "does not support fp8"),
    ("jetson-thor", "int8", {"dla_core": 0}, "no DLA cores"),
    ("jetson-agx-orin", "fp16", {"hardware_compatibility": "ampere_plus"}, "not jetson-agx-orin"),
    ("jetson-thor", "fp16", {"hardware_compatibility": "same_cc"}, "not jetson-thor"),
    ("cpu", "fp16", {}, "runs onnxruntime, not TensorRT"),
])
def test_options_refused_for_target(target, precision, kwargs, pattern):
    with pytest.raises(InputError, match=pattern):
        check_options_for_target(targets.load(target), TensorRTOptions(precision=precision, **kwargs))


def test_same_cc_refused_where_a_shipped_tensorrt_lacks_it(tmp_path):
    # SAME_COMPUTE_CAPABILITY arrived in TensorRT 10.9; a custom profile on 10.3 must refuse it.
    text = (Path(targets.__file__).parent / "profiles" / "a100.toml").read_text()
    custom = tmp_path / "a100-old.toml"
    custom.write_text(text.replace('name = "a100"', 'name = "a100-old"').replace('["10.16.1", "11.4.1"]', '["10.3.0"]'))
    with pytest.raises(InputError, match="no same-compute-capability mode"):
        check_options_for_target(targets.load(str(custom)), TensorRTOptions(precision="fp16",
                                                                            hardware_compatibility="same_cc"))


# -- portable bundles -------------------------------------------------------------------------------

FAKE_TRTEXEC = textwrap.dedent('''\
    #!{python}
    """Stand-in for trtexec: prints the version banner, rejects flags its version does not parse."""
    import json, os, sys
    version = int(os.environ["FAKE_TRT_VERSION"])
    allowed = set(json.loads(os.environ["FAKE_TRT_FLAGS"]))
    print(f"&&&& RUNNING TensorRT.trtexec [TensorRT v{{version}}] # trtexec " + " ".join(sys.argv[1:]))
    if sys.argv[1:] == ["--help"]:
        sys.exit(0)
    seen = {{}}
    for arg in sys.argv[1:]:
        name, _, value = arg[2:].partition("=")
        if not arg.startswith("--") or name not in allowed:
            print(f"[E] Unknown option: {{arg}}", file=sys.stderr)
            sys.exit(1)
        seen[name] = value
    if seen.get("hardwareCompatibilityLevel", "none") not in ("none", "ampere+") and version < 100900:
        sys.exit(1)
    assert os.path.isfile(seen["onnx"]), seen["onnx"]
    with open(seen["saveEngine"], "w") as f:
        json.dump(seen, f)
''')


def _fake_trtexec(tmp_path: Path) -> Path:
    path = tmp_path / "trtexec"
    path.write_text(FAKE_TRTEXEC.format(python=sys.executable))
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


@pytest.fixture(scope="module")
def qdq_free_onnx(tmp_path_factory):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 16, 16])
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "input_ids_dim1"])
    y = helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 3, 16, 16])
    graph = helper.make_graph([helper.make_node("Relu", ["image"], ["out"])], "g", [x, ids], [y])
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _run_build_sh(bundle: Path, fake: Path, version: int, out: Path, tmp_path: Path):
    major = version // 10000
    env = dict(os.environ, TRTEXEC=str(fake), FAKE_TRT_VERSION=str(version),
               FAKE_TRT_FLAGS=json.dumps(sorted(FLAGS.get(major, set()))), HOME=str(tmp_path / "home"),
               EDGEMM_TIMING_CACHE_DIR=str(tmp_path / "cache"))
    return subprocess.run(["bash", str(bundle / "build.sh"), str(out)], env=env, capture_output=True, text=True,
                          timeout=60)


def test_portable_package_contents_and_build_sh_on_trt10_and_trt11(qdq_free_onnx, tmp_path):
    target = targets.load("jetson-agx-orin")
    opts = options_for_target(target, "int8", dla=True, inputs=INPUTS)
    stage = tmp_path / "bundle"
    backend = package(qdq_free_onnx, stage, target, opts, build_now=False, bundle_name="demo")
    assert sorted(p.name for p in stage.iterdir()) == ["build.sh", "build_config.json", "model.onnx"]
    assert backend["portable"] is True and backend["engine"] is None and backend["built"] is None
    assert backend["tensorrt_versions"] == ["10.3.0", "11.4.1"] and backend["compute_capability"] == "8.7"
    assert TensorRTOptions.from_dict(backend["options"]) == opts
    config = json.loads((stage / "build_config.json").read_text())
    # DLA INT8 from a Q/DQ model builds on 11.4.1 only: build.sh has no TensorRT 10 command for it.
    assert set(config["trtexec"]) == {"11"} and config["target"] == "jetson-agx-orin"
    assert os.access(stage / "build.sh", os.X_OK)

    fake = _fake_trtexec(tmp_path)
    res = _run_build_sh(stage, fake, 100300, tmp_path / "ten.plan", tmp_path)
    assert res.returncode == 2 and "TensorRT major 10" in res.stderr and not (tmp_path / "ten.plan").exists()
    for version in (110401,):
        out = tmp_path / f"engine-{version}.plan"
        res = _run_build_sh(stage, fake, version, out, tmp_path)
        assert res.returncode == 0, res.stderr + res.stdout
        seen = json.loads(out.read_text())
        assert seen["useDLACore"] == "0" and seen["maxShapes"] == "image:4x3x16x16,input_ids:4x8"
        assert "stronglyTyped" in seen and "int8" not in seen
        # One timing cache for trtexec and the Python builder: same folder, same name for this GPU + TensorRT.
        from edgemm.backends.tensorrt.builder import timing_cache_path

        assert seen["timingCacheFile"] == str(timing_cache_path("8.7", "11.4.1.7", root=tmp_path / "cache"))
    # The bundle folder itself is untouched: the engine went to OUT.
    assert sorted(p.name for p in stage.iterdir()) == ["build.sh", "build_config.json", "model.onnx"]
    res = _run_build_sh(stage, fake, 90000, tmp_path / "x.plan", tmp_path)
    assert res.returncode == 2 and "TensorRT major 9" in res.stderr


def _write_manifest(bundle: Path, backend: dict, extra_files: dict[str, str] | None = None) -> dict:
    from edgemm.runtime.manifest import sha256_file, write_json_atomic

    files = {p.name: sha256_file(p) for p in sorted(bundle.iterdir()) if p.is_file() and p.name != "manifest.json"}
    files.update(extra_files or {})
    manifest = {"format": "edgemm-bundle", "format_version": 1, "name": bundle.name,
                "inputs": [{"name": "image", "dtype": "float32", "shape": ["batch", 3, 16, 16]}],
                "outputs": [{"name": "out", "dtype": "float32", "shape": ["batch", 3, 16, 16]}],
                "precision": {"mode": "fp16"}, "target": {"name": "l4"}, "backend": backend, "files": files}
    write_json_atomic(bundle / "manifest.json", manifest)
    return manifest


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_edgemm_build_without_tensorrt_says_what_is_missing(qdq_free_onnx, tmp_path, cli):
    target = targets.load("l4")
    bundle = tmp_path / "portable"
    backend = package(qdq_free_onnx, bundle, target, options_for_target(target, "fp16", inputs=INPUTS[:1]),
                      bundle_name="portable")
    assert backend["portable"] is True      # no TensorRT here: never builds
    _write_manifest(bundle, backend)
    res = cli("build", bundle)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "TensorRT Python package not found" in lines[0]
    assert sorted(p.name for p in bundle.iterdir()) == ["build.sh", "build_config.json", "manifest.json",
                                                        "model.onnx"]


def test_edgemm_build_refuses_an_onnxruntime_bundle(tmp_path, cli):
    bundle = tmp_path / "cpu-bundle"
    bundle.mkdir()
    (bundle / "model.onnx").write_bytes(b"not really onnx")
    _write_manifest(bundle, {"name": "onnxruntime", "model": "model.onnx"})
    res = cli("build", bundle)
    assert res.returncode == 2 and "there is no engine to build" in res.stderr


def test_timing_cache_folder_is_shared_with_build_sh(monkeypatch, tmp_path):
    # Old code: the Python builder keyed its cache by GPU name in ~/.cache/edgemm/timing and ignored
    # EDGEMM_TIMING_CACHE_DIR, while build.sh used another name: two caches for one device.
    from edgemm.backends.tensorrt.builder import timing_cache_path, trtexec_version_code

    assert trtexec_version_code("10.3.0.30") == 100300 and trtexec_version_code("11.4.1") == 110401
    monkeypatch.setenv("EDGEMM_TIMING_CACHE_DIR", str(tmp_path / "shared"))
    assert timing_cache_path("8.7", "10.3.0.30") == tmp_path / "shared" / "cc8.7-trt100300.cache"
    monkeypatch.delenv("EDGEMM_TIMING_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert timing_cache_path("9.0", "10.16.1").parent == tmp_path / "xdg" / "edgemm" / "timing"


def test_several_optimization_profiles_in_options_and_trtexec():
    # Old code had one profile only: a batch-1 latency profile and a batch-32 throughput profile could not
    # share an engine.
    latency = {"image": ((1, 3, 16, 16),) * 3}
    throughput = {"image": ((2, 3, 16, 16), (32, 3, 16, 16), (32, 3, 16, 16))}
    opts = TensorRTOptions(precision="fp16", profile_shapes=latency, extra_profiles=(throughput,))
    assert TensorRTOptions.from_dict(json.loads(json.dumps(opts.to_dict()))) == opts
    cmd = trtexec_command("m.onnx", "m.engine", opts, 11)
    tail = cmd[cmd.index("--profile=0"):]
    assert tail[:8] == ["--profile=0", "--minShapes=image:1x3x16x16", "--optShapes=image:1x3x16x16",
                        "--maxShapes=image:1x3x16x16", "--profile=1", "--minShapes=image:2x3x16x16",
                        "--optShapes=image:32x3x16x16", "--maxShapes=image:32x3x16x16"]
    single = trtexec_command("m.onnx", "m.engine", opts.with_(extra_profiles=()), 11)
    assert not any(a.startswith("--profile") for a in single)
    with pytest.raises(InputError, match="same dynamic inputs"):
        TensorRTOptions(profile_shapes=latency, extra_profiles=({"other": latency["image"]},))
    with pytest.raises(InputError, match="one static profile"):
        TensorRTOptions(precision="fp16", dla_core=0, profile_shapes=latency, extra_profiles=(latency,))
