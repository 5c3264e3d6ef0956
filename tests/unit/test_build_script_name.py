"""A TensorRT bundle's build.sh names the bundle its manifest names (not the ONNX file's 'model'), in its
header and in its default engine path (./<name>.engine)."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from edgemm import targets
from edgemm.backends.tensorrt import options_for_target, package

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="build.sh needs bash")

FAKE_TRTEXEC = """#!{python}
import sys
print("&&&& RUNNING TensorRT.trtexec [TensorRT v100300] # trtexec " + " ".join(sys.argv[1:]))
for arg in sys.argv[1:]:
    if arg.startswith("--saveEngine="):
        open(arg.split("=", 1)[1], "w").write("engine")
"""


@pytest.fixture(scope="module")
def relu_onnx(tmp_path_factory):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 16, 16])
    y = helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 3, 16, 16])
    graph = helper.make_graph([helper.make_node("Relu", ["image"], ["out"])], "g", [x], [y])
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _run(bundle: Path, cwd: Path, *args) -> subprocess.CompletedProcess:
    fake = cwd.parent / "trtexec"
    if not fake.exists():
        fake.write_text(FAKE_TRTEXEC.format(python=sys.executable))
        fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    env = dict(os.environ, TRTEXEC=str(fake), HOME=str(cwd.parent / "home"))
    cwd.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["bash", str(bundle / "build.sh"), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60)


def _header_name(script: str) -> str | None:
    """The bundle name build.sh's header gives, or None when it defers to manifest.json."""
    header = script.splitlines()[1]
    m = re.search(r"for bundle '([^']*)'", header)
    return m.group(1) if m else None


def _package(onnx_path, stage, **kw):
    target = targets.load("jetson-orin-nano")
    opts = options_for_target(target, "fp16", inputs=[{"name": "image", "dtype": "float32",
                                                       "shape": ["batch", 3, 16, 16]}])
    return package(onnx_path, stage, target, opts, build_now=False, **kw)


def test_header_and_default_engine_use_the_given_bundle_name(relu_onnx, tmp_path):
    _package(relu_onnx, tmp_path / "b", bundle_name="dual-encoder")
    script = (tmp_path / "b" / "build.sh").read_text()
    assert _header_name(script) == "dual-encoder" and "'model'" not in script
    res = _run(tmp_path / "b", tmp_path / "cwd")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "cwd" / "dual-encoder.engine").is_file()


def test_odd_names_are_quoted_and_give_a_safe_file_name(relu_onnx, tmp_path):
    name = 'my "model" $(touch pwned) `x`\nnext'
    _package(relu_onnx, tmp_path / "b", bundle_name=name)
    res = _run(tmp_path / "b", tmp_path / "cwd")
    assert res.returncode == 0, res.stderr
    assert not (tmp_path / "cwd" / "pwned").exists()
    engines = [p.name for p in (tmp_path / "cwd").iterdir()]
    assert len(engines) == 1 and re.fullmatch(r"[A-Za-z0-9._-]+\.engine", engines[0]), engines


def test_unnamed_build_sh_reads_the_name_from_manifest_json(relu_onnx, tmp_path):
    from edgemm.runtime.manifest import write_json_atomic

    bundle = tmp_path / "b"
    _package(relu_onnx, bundle)   # a caller that does not pass the name
    script = (bundle / "build.sh").read_text()
    assert _header_name(script) is None and "'model'" not in script
    res = _run(bundle, tmp_path / "no-manifest")
    assert res.returncode == 0 and (tmp_path / "no-manifest" / "model.engine").is_file()
    # Nested "name" keys (inputs, target) must not be taken for the bundle's.
    write_json_atomic(bundle / "manifest.json", {
        "format": "edgemm-bundle", "inputs": [{"name": "image"}], "name": "dual-encoder",
        "target": {"name": "jetson-orin-nano"}})
    res = _run(bundle, tmp_path / "cwd")
    assert res.returncode == 0, res.stderr
    assert [p.name for p in (tmp_path / "cwd").iterdir()] == ["dual-encoder.engine"]
    # An explicit output path still wins.
    res = _run(bundle, tmp_path / "cwd", tmp_path / "out.plan")
    assert res.returncode == 0 and (tmp_path / "out.plan").is_file()


def test_compiled_bundle_build_sh_names_the_manifest_bundle(relu_onnx, tmp_path):
    """The compile path: whatever build.sh says (header or at run time) is the manifest's name."""
    from edgemm.pipeline import compile_model
    from edgemm.config import CompileConfig

    bundle = tmp_path / "b2"
    compile_model(CompileConfig(model=str(relu_onnx), output=str(bundle), name="dual-encoder",
                                target="jetson-orin-nano", precision="fp32"), say=lambda m: None)
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["name"] == "dual-encoder"
    script = (bundle / "build.sh").read_text()
    assert _header_name(script) in (None, manifest["name"])
    assert "'model'" not in script
    res = _run(bundle, tmp_path / "cwd")
    assert res.returncode == 0, res.stderr
    assert [p.name for p in (tmp_path / "cwd").iterdir()] == [f"{manifest['name']}.engine"]
