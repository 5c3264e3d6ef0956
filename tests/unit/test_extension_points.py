"""The README's "Where things live" table is true (issue #15 acceptance): a copy of edgemm gets a toy
backend, a toy target and a toy precision mode by editing ONLY the files the table names for them, and
a compile with that copy builds, verifies and runs a bundle through all three. docs/architecture.md walks
through the same steps."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[2]
ROWS = ("a quantization / precision mode", "a target device", "a backend runtime")

TOY_BACKEND = '''
"""A toy backend: ONNX Runtime on CPU under another name, with its own bundle layout and session."""

import shutil

from ..base import Backend


class ToyBackend(Backend):
    name = "toy"
    title = "Toy CPU"
    device = "cpu"
    python_package = "onnxruntime"
    quantizes_as = "onnxruntime"  # it runs the same graphs: ORT's precision builds

    def package(self, model_path, stage, target, request):
        shutil.copyfile(model_path, stage / "toy.onnx")
        return {"name": self.name, "model": "toy.onnx"}

    def parity_runner(self, stage, manifest):
        from ... import runtime

        return runtime.load(stage).run, None

    def open_session(self, path, manifest, **options):
        from ...runtime.toy_session import ToySession

        return ToySession(path, manifest, **options)
'''
TOY_SESSION = '''
from .ort_session import OrtSession


class ToySession(OrtSession):
    backend = "toy"
'''
TOY_TARGET = '''
name = "toy-cpu"
description = "a toy CPU device"
kind = "cpu"
backend = "toy"
precisions = ["fp32", "fp16w"]
default_precision = "fp32"
dla_cores = 0
sparse_tensor_cores = false
'''
TOY_MODE = '''
"""fp16w: FP32 graph whose weights are rounded to FP16 values (a toy precision mode)."""

import numpy as np
import onnx
from onnx import numpy_helper


def round_weights(fp32_onnx, out, req):
    from . import PrecisionResult

    model = onnx.load(str(fp32_onnx))
    for t in model.graph.initializer:
        a = numpy_helper.to_array(t)
        if a.dtype == np.float32:
            t.CopyFrom(numpy_helper.from_array(a.astype(np.float16).astype(np.float32), t.name))
    onnx.save(model, str(out))
    return PrecisionResult(out, "fp16w", {"name": "fp16w"})
'''


def _copy_package(dst: Path) -> Path:
    shutil.copytree(ROOT / "edgemm", dst / "edgemm", ignore=shutil.ignore_patterns("__pycache__"))
    return dst / "edgemm"


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text(encoding="utf-8")
    assert old in text, f"{path}: {old!r} not found (the table names this place)"
    path.write_text(text.replace(old, new, 1), encoding="utf-8")


def _add_toys(pkg: Path) -> None:
    (pkg / "backends" / "toy").mkdir()
    (pkg / "backends" / "toy" / "__init__.py").write_text("", encoding="utf-8")
    (pkg / "backends" / "toy" / "backend.py").write_text(TOY_BACKEND, encoding="utf-8")
    _edit(pkg / "backends" / "registry.py", "BACKENDS: dict[str, str] = {\n",
          'BACKENDS: dict[str, str] = {\n    "toy": "toy.backend:ToyBackend",\n')
    (pkg / "runtime" / "toy_session.py").write_text(TOY_SESSION, encoding="utf-8")
    (pkg / "targets" / "profiles" / "toy-cpu.toml").write_text(TOY_TARGET, encoding="utf-8")
    _edit(pkg / "precision.py", '    PrecisionSpec("bf16",',
          '    PrecisionSpec("fp16w", 0.999, 0.98, 1.0, 0.02, label="FP16-rounded weights"),\n'
          '    PrecisionSpec("bf16",')
    (pkg / "quant" / "fp16w.py").write_text(TOY_MODE, encoding="utf-8")
    _edit(pkg / "quant" / "__init__.py", "RECIPES: dict[tuple[str, str], Callable[[Path, Path, PrecisionRequest], "
                                          "PrecisionResult]] = {\n",
          "RECIPES: dict[tuple[str, str], Callable[[Path, Path, PrecisionRequest], PrecisionResult]] = {\n"
          '    ("onnxruntime", "fp16w"): lambda *a: __import__("edgemm.quant.fp16w", fromlist=["x"])'
          '.round_weights(*a),\n')


def _changed_files(before: Path, after: Path) -> set[str]:
    def tree(root):
        return {p.relative_to(root.parent).as_posix(): p.read_bytes() for p in root.rglob("*")
                if p.is_file() and "__pycache__" not in p.parts}
    old, new = tree(before), tree(after)
    return {k for k in old.keys() | new.keys() if old.get(k) != new.get(k)}


def _table_patterns() -> list[re.Pattern]:
    """The files README's "Where things live" rows name for a backend, a target and a precision mode."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    table = readme.split("## Where things live", 1)[1].split("\n## ", 1)[0]
    patterns = []
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 2 and cells[0].startswith(ROWS):
            for path in re.findall(r"`([^`]+)`", cells[1]):
                path = path.split(":")[0]
                regex = re.escape(path).replace(re.escape("<name>"), r"[\w-]+").replace(re.escape("<mode>"), r"\w+")
                patterns.append(re.compile(regex + (".*" if path.endswith("/") else "")))
    return patterns


def _onnx_model(path: Path) -> np.ndarray:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 4)).astype(np.float32) + np.float32(1 / 3)  # not FP16-exact
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["logits"])], "toy",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])],
                              [numpy_helper.from_array(w, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return w


RUN = textwrap.dedent('''
    import json, sys
    import numpy as np
    from edgemm import runtime
    from edgemm.config import CompileConfig
    from edgemm.pipeline import compile_model

    result = compile_model(CompileConfig(model=sys.argv[1], target="toy-cpu", precision="fp16w",
                                         output=sys.argv[2], tune_threads=False), say=lambda s: None)
    bundle = runtime.load(sys.argv[2])
    x = np.ones((2, 16), dtype=np.float32)
    print(json.dumps({"backend": result.manifest["backend"], "mode": result.manifest["precision"]["mode"],
                      "session": type(bundle._session).__name__, "passed": result.report["passed"],
                      "out": bundle.run({"x": x})["logits"].tolist()}))
''')


def test_readme_table_names_every_file_a_toy_backend_target_and_precision_need(tmp_path):
    pristine = _copy_package(tmp_path / "pristine")
    pkg = _copy_package(tmp_path / "src")
    _add_toys(pkg)
    changed = _changed_files(pristine, pkg)
    patterns = _table_patterns()
    assert patterns, "README's table lost its backend / target / precision rows"
    outside = sorted(f for f in changed if not any(p.fullmatch(f) for p in patterns))
    assert outside == [], f"the toys needed files the README table does not name: {outside}"

    w = _onnx_model(tmp_path / "toy.onnx")
    env = {"PYTHONPATH": str(tmp_path / "src"), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", RUN, str(tmp_path / "toy.onnx"), str(tmp_path / "bundle")],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["backend"] == {"name": "toy", "model": "toy.onnx"}
    assert got["mode"] == "fp16w" and got["session"] == "ToySession" and got["passed"] is True
    rounded = w.astype(np.float16).astype(np.float32)
    assert np.allclose(got["out"], np.ones((2, 16), np.float32) @ rounded, rtol=1e-6)
    stored = numpy_helper.to_array(onnx.load(str(tmp_path / "bundle" / "toy.onnx")).graph.initializer[0])
    assert np.array_equal(stored, rounded) and not np.array_equal(stored, w)


def test_the_real_package_has_no_toy():
    """The walkthrough edits a copy: nothing of it leaks into edgemm itself."""
    from edgemm.backends import registry

    assert "toy" not in registry.names()
    with pytest.raises(Exception):
        registry.get("toy")
