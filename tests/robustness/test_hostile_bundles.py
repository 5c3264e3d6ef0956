"""Hostile bundles from a QA pass: ONNX external data read from the current directory, a model swapped
between verification and loading, `edgemm build` and `edgemm inspect` following manifest paths out of
the bundle, a symlinked manifest, report files that cannot be replaced, and ONNX Runtime's own log
line printed before edgemm's one-line error."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import types
from pathlib import Path

import numpy as np
import pytest

from edgemm import runtime
from edgemm.errors import BundleError, DependencyError
from edgemm.runtime.manifest import sha256_file
from tests.fixtures.tiny_models import VOCAB, make_data
from tests.robustness.helpers import error_lines, run_edgemm, tree_snapshot

onnx = pytest.importorskip("onnx")


# -- helpers -------------------------------------------------------------------------------------------

def _copy(bundle: Path, tmp_path: Path, name: str = "bundle") -> Path:
    dst = tmp_path / name
    shutil.copytree(bundle, dst)
    return dst


def _edit_manifest(bundle: Path, edit) -> None:
    path = bundle / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest, indent=2))


def _save_npz(path: Path, arrays: dict) -> Path:
    np.savez(path, **arrays)
    return path


def _temp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp") or ".tmp-" in p.name)


def _one_error_line(res) -> str:
    assert "Traceback" not in res.stderr + res.stdout, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("error: ") and "\x1b[" not in lines[0], lines[0]
    return lines[0]


EXT_VALUES = np.arange(1, 17, dtype=np.float32)


def _add_external_initializer(bundle: Path, location: str) -> None:
    """Give the bundle's model an initializer stored as external data at ``location`` (16 float32),
    exposed as output ``ext_out``; the manifest lists the new output and the model's new sha256, so the
    bundle is hash-consistent and only the external data decides what runs."""
    from onnx import TensorProto, helper, numpy_helper

    model_path = bundle / "model.onnx"
    model = onnx.load(str(model_path))
    tensor = numpy_helper.from_array(np.zeros(16, np.float32), "ext_w")
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "64")):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    model.graph.initializer.append(tensor)
    model.graph.node.append(helper.make_node("Identity", ["ext_w"], ["ext_out"]))
    model.graph.output.append(helper.make_tensor_value_info("ext_out", TensorProto.FLOAT, [16]))
    onnx.save(model, str(model_path))

    def edit(m):
        m["outputs"].append({"name": "ext_out", "dtype": "float32", "shape": [16]})
        m["files"]["model.onnx"] = sha256_file(model_path)
    _edit_manifest(bundle, edit)


# -- 1. ONNX external data resolves inside the bundle, never in the current directory ---------------------

def test_external_data_only_in_the_current_directory_is_not_read(tiny_bundle, tmp_path, monkeypatch):
    bundle = _copy(tiny_bundle, tmp_path)
    _add_external_initializer(bundle, "SECRET.bin")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (EXT_VALUES * 1000).tofile(cwd / "SECRET.bin")   # the "secret" a hostile bundle tries to read
    monkeypatch.chdir(cwd)
    with pytest.raises(BundleError) as info:
        runtime.load(bundle)
    msg = str(info.value)
    assert "\n" not in msg and "external data" in msg.lower() and "backend.model" in msg


def test_edgemm_run_does_not_leak_external_data_from_the_cwd(tiny_bundle, tmp_path):
    bundle = _copy(tiny_bundle, tmp_path)
    _add_external_initializer(bundle, "SECRET.bin")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (EXT_VALUES * 1000).tofile(cwd / "SECRET.bin")
    data = _save_npz(tmp_path / "in.npz", make_data(2))
    out = tmp_path / "out.npz"
    res = run_edgemm(["run", bundle, "--data", data, "-o", out], cwd=cwd)
    assert res.returncode == 2, res.stderr
    line = _one_error_line(res)
    assert "model.onnx" in line and "External data" in line
    assert not out.exists()


def test_listed_external_data_in_the_bundle_is_used_not_the_cwd_copy(tiny_bundle, tmp_path, monkeypatch):
    bundle = _copy(tiny_bundle, tmp_path)
    _add_external_initializer(bundle, "weights.bin")
    EXT_VALUES.tofile(bundle / "weights.bin")
    _edit_manifest(bundle, lambda m: m["files"].__setitem__("weights.bin", sha256_file(bundle / "weights.bin")))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (EXT_VALUES * -1).tofile(cwd / "weights.bin")   # a decoy with the same name
    monkeypatch.chdir(cwd)
    out = runtime.load(bundle).run(make_data(2))
    np.testing.assert_array_equal(out["ext_out"], EXT_VALUES)
    # The external file is hashed like any other: edit it and the bundle is refused.
    (EXT_VALUES * 2).tofile(bundle / "weights.bin")
    with pytest.raises(BundleError, match="weights.bin.*does not match its sha256"):
        runtime.load(bundle)


def test_onnxruntime_too_old_for_the_folder_option_refuses_external_data(tiny_bundle, tmp_path, monkeypatch):
    """Before 1.21, ORT ignores the external-data folder option (and would read the CWD's file)."""
    import onnxruntime

    bundle = _copy(tiny_bundle, tmp_path)
    _add_external_initializer(bundle, "weights.bin")
    EXT_VALUES.tofile(bundle / "weights.bin")
    _edit_manifest(bundle, lambda m: m["files"].__setitem__("weights.bin", sha256_file(bundle / "weights.bin")))
    monkeypatch.setattr(onnxruntime, "__version__", "1.20.1")
    with pytest.raises(BundleError, match="external data.*upgrade onnxruntime to 1.21"):
        runtime.load(bundle)
    runtime.load(tiny_bundle).run(make_data(1))   # models without external data still load


def test_unlisted_external_data_in_the_bundle_is_refused(tiny_bundle, tmp_path):
    bundle = _copy(tiny_bundle, tmp_path)
    _add_external_initializer(bundle, "weights.bin")
    EXT_VALUES.tofile(bundle / "weights.bin")
    with pytest.raises(BundleError, match="unexpected file 'weights.bin'"):
        runtime.load(bundle)


# -- 2. the model ONNX Runtime parses is the model that was hashed ------------------------------------

def _other_valid_model(bundle: Path) -> bytes:
    model = onnx.load(str(bundle / "model.onnx"))
    model.doc_string = "swapped after verification"
    return model.SerializeToString()


def test_model_swapped_after_verification_is_refused(tiny_bundle, tmp_path, monkeypatch):
    bundle = _copy(tiny_bundle, tmp_path)
    swapped = _other_valid_model(bundle)
    real = runtime.load_manifest

    def verify_then_swap(path, *, verify=True):
        manifest = real(path, verify=verify)
        (bundle / "model.onnx").write_bytes(swapped)   # after verify_files hashed the original
        return manifest

    monkeypatch.setattr(runtime, "load_manifest", verify_then_swap)
    with pytest.raises(BundleError, match="'model.onnx' does not match its sha256"):
        runtime.load(bundle)


def test_model_in_an_unhashed_bundle_file_is_refused(tiny_bundle, tmp_path):
    """report.json is allowed in a bundle without a hash; it must not be loadable as the model."""
    bundle = _copy(tiny_bundle, tmp_path)
    (bundle / "report.json").write_bytes(_other_valid_model(bundle))
    _edit_manifest(bundle, lambda m: m["backend"].__setitem__("model", "report.json"))
    with pytest.raises(BundleError, match="backend.model: model 'report.json' has no sha256"):
        runtime.load(bundle)


# -- 3. `edgemm build` keeps the engine (and the suggested build script) inside the bundle ------------

TRT_INPUTS = [{"name": "image", "dtype": "float32", "shape": ["batch", 3, 16, 16], "ranges": {"batch": [1, 4, 8]}}]


@pytest.fixture
def portable_bundle(tmp_path):
    """A portable TensorRT bundle for the L4 (compute capability 8.9), no engine yet."""
    from onnx import TensorProto, helper

    from edgemm import targets
    from edgemm.backends.tensorrt import options_for_target, package
    from edgemm.runtime.manifest import write_json_atomic

    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 16, 16])
    y = helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 3, 16, 16])
    graph = helper.make_graph([helper.make_node("Relu", ["image"], ["out"])], "g", [x], [y])
    src = tmp_path / "src.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(src))
    target = targets.load("l4")
    bundle = tmp_path / "portable"
    backend = package(src, bundle, target, options_for_target(target, "fp16", inputs=TRT_INPUTS), build_now=False)
    files = {p.name: sha256_file(p) for p in sorted(bundle.iterdir()) if p.is_file()}
    write_json_atomic(bundle / "manifest.json", {
        "format": "edgemm-bundle", "format_version": 1, "name": "portable",
        "inputs": [{"name": "image", "dtype": "float32", "shape": ["batch", 3, 16, 16]}],
        "outputs": [{"name": "out", "dtype": "float32", "shape": ["batch", 3, 16, 16]}],
        "precision": {"mode": "fp16"}, "target": {"name": "l4"}, "backend": backend, "files": files})
    return bundle


@pytest.fixture
def stub_tensorrt(monkeypatch):
    """TensorRT and an L4 GPU stubbed out; build_engine writes a fake engine. Returns the engine paths built."""
    import edgemm.backends.tensorrt.builder as builder
    import edgemm.runtime.tensorrt_session as trt_session

    monkeypatch.setattr(trt_session, "import_tensorrt", lambda: types.SimpleNamespace(__version__="10.3.0"))
    monkeypatch.setattr(trt_session, "cuda_device",
                        lambda index=0: {"index": 0, "name": "stub L4", "compute_capability": "8.9"})
    built = []

    def fake_build_engine(onnx_path, out, options, timing_cache=None):
        built.append(Path(out))
        Path(out).write_bytes(b"ENGINE-BYTES")
        return {"compute_capability": "8.9"}

    monkeypatch.setattr(builder, "build_engine", fake_build_engine)
    return built


def test_build_writes_the_engine_into_the_bundle(portable_bundle, stub_tensorrt):
    from edgemm.backends.tensorrt.package import finish_portable_bundle
    from edgemm.runtime.manifest import load_manifest

    for _ in range(2):   # build, then rebuild over the recorded engine
        engine = finish_portable_bundle(portable_bundle)
        assert engine == portable_bundle / "model.engine" and engine.read_bytes() == b"ENGINE-BYTES"
        manifest = load_manifest(portable_bundle, verify=True)
        assert manifest["backend"]["engine"] == "model.engine"
        assert manifest["files"]["model.engine"] == hashlib.sha256(b"ENGINE-BYTES").hexdigest()
    assert _temp_files(portable_bundle) == []


@pytest.mark.parametrize("engine", ["ABSOLUTE", "../victim.txt", "sub/../../victim.txt", "model.onnx", "build.sh",
                                    "build_config.json", "manifest.json", "report.json"])
def test_build_refuses_an_engine_path_outside_the_bundle_or_over_its_files(portable_bundle, stub_tensorrt,
                                                                           tmp_path, engine):
    from edgemm.backends.tensorrt.package import finish_portable_bundle

    victim = tmp_path / "victim.txt"
    victim.write_text("precious user data\n")
    if engine == "ABSOLUTE":
        engine = str(victim)
        # The folders the old temp-file name needed inside the bundle (so the old code reached the write).
        (portable_bundle / str(victim.parent).lstrip("/")).mkdir(parents=True)
    _edit_manifest(portable_bundle, lambda m: m["backend"].__setitem__("engine", engine))
    before = tree_snapshot(portable_bundle)
    with pytest.raises(BundleError) as info:
        finish_portable_bundle(portable_bundle)
    assert "backend.engine" in str(info.value)
    assert victim.read_text() == "precious user data\n"
    assert stub_tensorrt == []   # refused before any build
    assert tree_snapshot(portable_bundle) == before


@pytest.mark.parametrize("script", ["../../../tmp/evil.sh", "/tmp/evil.sh", "report.md"])
def test_build_refuses_a_build_script_outside_the_bundle(portable_bundle, monkeypatch, script):
    import edgemm.runtime.tensorrt_session as trt_session
    from edgemm.backends.tensorrt.package import finish_portable_bundle

    def no_tensorrt():
        raise DependencyError("TensorRT Python package not found (tensorrt)", fix="install TensorRT")

    monkeypatch.setattr(trt_session, "import_tensorrt", no_tensorrt)
    (portable_bundle / "report.md").write_text("echo not a build script\n")
    _edit_manifest(portable_bundle, lambda m: m["backend"].__setitem__("build_script", script))
    with pytest.raises(BundleError) as info:
        finish_portable_bundle(portable_bundle)
    assert "backend.build_script" in str(info.value) and "bash" not in str(info.value)


def test_build_without_tensorrt_suggests_the_bundles_own_script(tmp_path, monkeypatch, portable_bundle):
    import edgemm.runtime.tensorrt_session as trt_session
    from edgemm.backends.tensorrt.package import finish_portable_bundle

    def no_tensorrt():
        raise DependencyError("TensorRT Python package not found (tensorrt)", fix="install TensorRT")

    monkeypatch.setattr(trt_session, "import_tensorrt", no_tensorrt)
    spaced = tmp_path / "my bundles" / "portable"
    spaced.parent.mkdir()
    shutil.move(portable_bundle, spaced)
    with pytest.raises(DependencyError) as info:
        finish_portable_bundle(spaced)
    assert f"bash '{spaced / 'build.sh'}'" in str(info.value)


# -- 4. `edgemm inspect` reads only hashed files of the bundle; malformed manifests are one line ------

@pytest.fixture
def outside_files(tmp_path, tiny_bundle):
    valid = tmp_path / "outside.onnx"
    shutil.copyfile(tiny_bundle / "model.onnx", valid)
    junk = tmp_path / "passwd"
    junk.write_text("root:x:0:0:root:/root:/bin/bash\n")
    return valid, junk


INSPECT_EDITS = {
    "model-absolute": (lambda m, o: m["backend"].__setitem__("model", str(o[0])), "backend.model", "escapes"),
    "model-relative-out": (lambda m, o: m["backend"].__setitem__("model", "../outside.onnx"), "backend.model",
                           "escapes"),
    "model-not-onnx-outside": (lambda m, o: m["backend"].__setitem__("model", str(o[1])), "backend.model",
                               "escapes"),
    "onnx-key-absolute": (lambda m, o: (m["backend"].__setitem__("model", ""),
                                        m["backend"].__setitem__("onnx", str(o[1]))), "backend.onnx", "escapes"),
    "model-unhashed-report": (lambda m, o: m["backend"].__setitem__("model", "report.json"), "backend.model",
                              "not a file of the bundle"),
    "inputs-list-of-null": (lambda m, o: m.__setitem__("inputs", [None]), "inputs[0]", "malformed"),
    "outputs-shape-string": (lambda m, o: m["outputs"][0].__setitem__("shape", "batch,5"), "outputs[0]",
                             "malformed"),
    "recipe-null": (lambda m, o: m["precision"].__setitem__("recipe", None), "precision.recipe", "must be an object"),
    "recipe-string": (lambda m, o: m["precision"].__setitem__("recipe", "dynamic"), "precision.recipe",
                      "must be an object"),
}


@pytest.mark.parametrize("case", sorted(INSPECT_EDITS))
def test_inspect_refuses_hostile_or_malformed_manifests(tiny_bundle, tmp_path, outside_files, case):
    from edgemm.cli.inspect import inspect_bundle

    edit, field, what = INSPECT_EDITS[case]
    bundle = _copy(tiny_bundle, tmp_path)
    (bundle / "report.json").write_text("{}")
    _edit_manifest(bundle, lambda m: edit(m, outside_files))
    with pytest.raises(BundleError) as info:
        inspect_bundle(bundle)
    msg = str(info.value)
    assert f": {field}: " in msg and what in msg and "\n" not in msg


def test_inspect_cli_refuses_a_model_path_outside_the_bundle(tiny_bundle, tmp_path, outside_files):
    for name, model in (("valid-outside", outside_files[0]), ("junk-outside", outside_files[1])):
        bundle = _copy(tiny_bundle, tmp_path, name)
        _edit_manifest(bundle, lambda m, model=model: m["backend"].__setitem__("model", str(model)))
        res = run_edgemm(["inspect", bundle], cwd=tmp_path)
        assert res.returncode == 2, (res.returncode, res.stderr)
        assert "backend.model" in _one_error_line(res)


def test_inspect_still_shows_a_good_bundle(tiny_bundle):
    from edgemm.cli.inspect import inspect_bundle

    info = inspect_bundle(tiny_bundle)
    assert info["ops"] and info["recipe"] and [i["name"] for i in info["inputs"]] == ["image", "input_ids"]


# -- 5. manifest and report files -----------------------------------------------------------------------

def test_symlinked_manifest_is_refused(tiny_bundle, tmp_path):
    bundle = _copy(tiny_bundle, tmp_path)
    elsewhere = tmp_path / "elsewhere.json"
    os.replace(bundle / "manifest.json", elsewhere)
    os.symlink(elsewhere, bundle / "manifest.json")
    with pytest.raises(BundleError, match="manifest.json: is a symbolic link"):
        runtime.load(bundle)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_fifo_manifest_is_refused_without_blocking(tiny_bundle, tmp_path):
    bundle = _copy(tiny_bundle, tmp_path)
    (bundle / "manifest.json").unlink()
    os.mkfifo(bundle / "manifest.json")
    with pytest.raises(BundleError, match="manifest.json: is not a regular file"):
        runtime.load(bundle)


def _report():
    return {"passed": True, "failures": [], "outputs": {}, "bundle": {"precision": "fp32"}}


@pytest.mark.parametrize("writer", ["verify", "baseline"])
def test_report_writer_refuses_a_folder_in_a_reports_place(tiny_bundle, tmp_path, writer):
    from edgemm.parity import gate, verify

    write_reports = verify.write_reports if writer == "verify" else gate.write_gate_reports
    bundle = _copy(tiny_bundle, tmp_path)
    (bundle / "report.md").unlink(missing_ok=True)
    (bundle / "report.md").mkdir()
    before = tree_snapshot(bundle)
    with pytest.raises(BundleError, match="report.md: is a folder"):
        write_reports(bundle, _report())
    assert tree_snapshot(bundle) == before   # nothing written half: report.json untouched, no temp file


def test_report_writer_replaces_a_symlink_instead_of_writing_through_it(tiny_bundle, tmp_path):
    from edgemm.parity.verify import write_reports

    bundle = _copy(tiny_bundle, tmp_path)
    outside = tmp_path / "outside.txt"
    outside.write_text("not yours\n")
    (bundle / "report.json").unlink(missing_ok=True)
    os.symlink(outside, bundle / "report.json")
    write_reports(bundle, _report())
    assert outside.read_text() == "not yours\n"
    assert not (bundle / "report.json").is_symlink() and json.loads((bundle / "report.json").read_text())["passed"]
    assert oct((bundle / "report.json").stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    assert _temp_files(bundle) == []


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_report_writer_removes_its_temp_file_on_failure(tiny_bundle, tmp_path, monkeypatch):
    import edgemm.runtime.manifest as manifest_mod
    from edgemm.parity.verify import write_reports

    bundle = _copy(tiny_bundle, tmp_path)

    def disk_full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(manifest_mod.os, "replace", disk_full)
    with pytest.raises(BundleError, match="report.json: cannot write the report"):
        write_reports(bundle, _report())
    monkeypatch.undo()
    assert _temp_files(bundle) == []


def test_verify_cli_with_a_folder_as_report_fails_in_one_line_and_leaves_no_temp(tiny_bundle, tiny, tmp_path):
    bundle = _copy(tiny_bundle, tmp_path)
    (bundle / "report.md").unlink(missing_ok=True)
    (bundle / "report.md").mkdir()
    data = _save_npz(tmp_path / "eval.npz", make_data(4))
    before = tree_snapshot(bundle)
    res = run_edgemm(["verify", bundle, "--reference", tiny["torchscript"], "--data", data], cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    assert "report.md: is a folder" in _one_error_line(res)
    assert tree_snapshot(bundle) == before


# -- 6. ONNX Runtime's own log lines stay off stderr ---------------------------------------------------

def test_run_error_from_onnxruntime_is_a_single_stderr_line(tiny_bundle, tmp_path):
    # A bundle without a calibration profile (compiled before it existed) does not know its embedding's
    # rows, so an id past them reaches ONNX Runtime, whose Gather fails (with a profile, edgemm refuses it
    # first, naming the input: test_user_data_mismatch).
    bundle = shutil.copytree(tiny_bundle, tmp_path / "no-profile")
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest.pop("calibration_profile")
    manifest["requires"] = [r for r in manifest.get("requires", []) if r != "calibration_profile"]
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    feeds = make_data(2)
    feeds["input_ids"][0, 0] = VOCAB + 1000   # out of the embedding's range: ORT's Gather fails
    data = _save_npz(tmp_path / "oob.npz", feeds)
    out = tmp_path / "out.npz"
    res = run_edgemm(["run", bundle, "--data", data, "-o", out], cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    line = _one_error_line(res)
    assert "ONNX Runtime failed on these inputs" in line and "onnxruntime:" not in line
    assert error_lines(res.stderr) == [line] and not out.exists()
