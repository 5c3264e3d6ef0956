"""edgemm/backends/registry.py: backends looked up by name; nothing outside a backend compares names."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from edgemm import targets
from edgemm.backends import registry
from edgemm.backends.base import Backend
from edgemm.errors import InputError

EDGEMM = Path(__file__).resolve().parents[2] / "edgemm"


def test_shipped_backends_by_name():
    ort, trt = registry.get("onnxruntime"), registry.get("tensorrt")
    assert (ort.name, ort.device, ort.thread_count, ort.sparse_kernels) == ("onnxruntime", "cpu", True, False)
    assert (trt.name, trt.device, trt.thread_count, trt.sparse_kernels) == ("tensorrt", "gpu", False, True)
    assert registry.get("onnxruntime") is ort  # one instance per name
    assert ort.runtime_threads({"intra_op_threads": 1}) == 1
    assert ort.runtime_threads({"intra_op_threads": True}) is None
    assert trt.runtime_threads({"intra_op_threads": 1}) is None


def test_unknown_backend_is_one_line_input_error():
    with pytest.raises(InputError, match=r"unknown backend 'nope' \(known: onnxruntime, openvino, tensorrt"):
        registry.get("nope")


class _Toy(Backend):
    name = "toy-npu"
    title = "Toy NPU"
    device = "gpu"


def test_target_profile_takes_a_registered_backend(tmp_path):
    profile = tmp_path / "toy.toml"
    profile.write_text('name = "toy"\ndescription = "a toy NPU"\nkind = "datacenter"\nbackend = "toy-npu"\n'
                       'precisions = ["fp32"]\ndefault_precision = "fp32"\ndla_cores = 0\n'
                       'sparse_tensor_cores = false\n', encoding="utf-8")
    with pytest.raises(InputError, match="'toy-npu' is not one of"):
        targets.load(str(profile))
    registry.register(_Toy())
    try:
        assert targets.load(str(profile)).backend == "toy-npu"
        # The device kind comes from the backend, not from a list of names.
        profile.write_text(profile.read_text().replace('kind = "datacenter"', 'kind = "cpu"'), encoding="utf-8")
        with pytest.raises(InputError, match="toy-npu runs on gpu targets"):
            targets.load(str(profile))
    finally:
        registry.unregister("toy-npu")


def _branching_pattern() -> re.Pattern:
    names = "|".join(map(re.escape, registry.BACKENDS))
    # a shipped backend's name compared, or any backend name compared with a literal (a backend to come)
    return re.compile(rf"""(==|!=|\bin\b)\s*\(?\s*["']({names})["']|["']({names})["']\s*(==|!=)"""
                      rf"""|\bbackend(\.name|_name)?\s*(==|!=|\bin\b)\s*[(\[{{]?\s*["']""")


def test_no_backend_name_branches_outside_the_backends():
    """Callers ask the registry for the backend object (Polygraphy's backend/<name>/ layout); a new
    backend then needs no edit elsewhere."""
    pattern = _branching_pattern()
    offenders = []
    for path in sorted(EDGEMM.rglob("*.py")):
        rel = path.relative_to(EDGEMM).as_posix()
        if rel.startswith("backends/") or re.fullmatch(r"runtime/\w+_session\.py", rel):
            continue
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{rel}:{i}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_serving_asks_the_backend_how_triton_serves_it():
    """Triton's platform, the files a native model holds, its instance kinds and whether its requests may be
    merged are the backend's answers (edgemm/serving/ reads them through the registry)."""
    ort, trt = registry.get("onnxruntime"), registry.get("tensorrt")
    files = {"parts/text.onnx": "0" * 64, "parts/text.onnx.data": "1" * 64, "parts/vision.onnx": "2" * 64}
    assert ort.triton_files({"model": "parts/text.onnx"}, files, part=True) == {
        "parts/text.onnx": "text.onnx", "parts/text.onnx.data": "text.onnx.data"}
    assert ort.triton_files({"model": "model.onnx"}, {"model.onnx": "0" * 64}, part=False) == {"model.onnx": "model.onnx"}
    assert trt.triton_files({"engine": "model.engine"}, {"model.engine": "0" * 64}, part=False) == {
        "model.engine": "model.plan"}
    assert (ort.triton_kinds, trt.triton_kinds) == (("cpu", "gpu"), ("gpu",))
    assert trt.serving_refusal({"portable": True})[1] == "backend.engine" and trt.serving_refusal({"engine": "e"}) is None
    dynamic = {"m.onnx": b"..DynamicQuantizeLinear..", "f.onnx": b"MatMul"}
    assert "one scale per batch" in ort.rows_mix(["f.onnx", "m.onnx"], dynamic.__getitem__)
    assert ort.rows_mix(["f.onnx"], dynamic.__getitem__) is None
    assert trt.rows_mix(["m.onnx"], dynamic.__getitem__) is None
    assert (ort.triton_profiles({}), trt.triton_profiles({"options": {"profiles": [{}, {}]}})) == (0, 2)


def test_no_target_name_branches_outside_the_targets():
    """Targets are data (targets/profiles/*.toml): code reads a profile's fields (kind, dla_cores,
    precisions, ...) and its backend, never which target it is by name, so a new profile needs no code."""
    names = "|".join(map(re.escape, sorted(p.stem for p in (EDGEMM / "targets" / "profiles").glob("*.toml"))))
    pattern = re.compile(rf"""\b(target|target_name|profile)(\.name)?\s*(==|!=|\bin\b)\s*[(\[{{]?\s*["']"""
                         rf"""|(==|!=)\s*["']({names})["']|["']({names})["']\s*(==|!=)""")
    offenders = [f"{path.relative_to(EDGEMM).as_posix()}:{i}: {line.strip()}"
                 for path in sorted(EDGEMM.rglob("*.py")) if not path.relative_to(EDGEMM).as_posix().startswith("targets/")
                 for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if pattern.search(line)]
    assert pattern.search('if cfg.target == "jetson-orin-nano":') and pattern.search('if profile.name in ("cpu",):')
    assert not offenders, "\n".join(offenders)
