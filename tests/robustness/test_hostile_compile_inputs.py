"""Hostile or careless inputs to `edgemm compile` / `edgemm run` found by a QA pass: an -o that --force
would have deleted (the user's data, the inputs themselves, the current folder), two compiles racing
to one -o, FIFOs where a file is expected (hung forever), external data longer than its file, a folder
at `run -o`, --config values of the wrong type, and torch warnings breaking the one-line error."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from edgemm.bundle import STAGING_PREFIX, BundleWriter
from edgemm.config import CompileConfig
from edgemm.errors import EdgemmError, InputError
from tests.robustness.helpers import cli_env, error_lines, manifest_body, run_edgemm, tree_snapshot


def _one_line_error(res, rc=2) -> str:
    assert res.returncode == rc, (res.returncode, res.stdout[-2000:], res.stderr[-2000:])
    assert "Traceback" not in res.stderr and "internal error" not in res.stderr, res.stderr
    lines = error_lines(res.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    return lines[0]


def _user_folder(root: Path) -> Path:
    """A folder of the user's own files, not a bundle."""
    folder = root / "userdir"
    (folder / "deep").mkdir(parents=True)
    (folder / "notes.txt").write_text("my notes\n")
    (folder / "deep" / "data.bin").write_bytes(b"\x00\x01" * 100)
    return folder


def _fake_bundle(folder: Path, name: str = "old") -> Path:
    """An edgemm bundle as far as --force is concerned: manifest with the format marker, listed files."""
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(name.encode())
    (folder / "report.md").write_text("report\n")
    (folder / "manifest.json").write_text(json.dumps({"format": "edgemm-bundle", "format_version": 1,
                                                      "name": name, "files": {"model.onnx": "0" * 64}}))
    return folder


def _stage_bundle(writer: BundleWriter, name: str) -> None:
    (writer.stage / "model.onnx").write_bytes(name.encode())
    writer.write_manifest(manifest_body(name))


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(STAGING_PREFIX))


# -- 1. --force deletes only bundles (or empty folders) ----------------------------------------------

def test_force_never_deletes_a_folder_that_is_not_a_bundle(tmp_path):
    user = _user_folder(tmp_path)
    before = tree_snapshot(user)
    with pytest.raises(InputError, match="not an edgemm bundle") as info:
        with BundleWriter(user, force=True) as writer:
            _stage_bundle(writer, "new")
            writer.commit()
    assert "-o" in str(info.value) and "delete it yourself" in str(info.value)
    assert tree_snapshot(user) == before
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("manifest", [
    b"not json at all",
    json.dumps({"format": "something-else", "files": {}}).encode(),
    json.dumps(["edgemm-bundle"]).encode(),
    b"[" * 100_000,
])
def test_force_never_deletes_a_folder_with_a_foreign_manifest(tmp_path, manifest):
    user = _user_folder(tmp_path)
    (user / "manifest.json").write_bytes(manifest)
    _force_is_refused(user, "not an edgemm bundle")


def test_force_never_deletes_user_files_kept_inside_a_bundle(tmp_path):
    bundle = _fake_bundle(tmp_path / "bundle")
    (bundle / "my-notes.txt").write_text("keep me\n")
    _force_is_refused(bundle, "my-notes.txt")


def _force_is_refused(folder, match):
    before = tree_snapshot(folder)
    with pytest.raises(InputError, match=match):
        with BundleWriter(folder, force=True):
            pass
    assert tree_snapshot(folder) == before


def test_force_still_replaces_a_bundle_and_an_empty_folder(tmp_path):
    bundle = _fake_bundle(tmp_path / "bundle")
    (bundle / ".report.md.tmp-12345").write_text("a killed verify's leftover\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    for dest in (bundle, empty):
        with BundleWriter(dest, force=True) as writer:
            _stage_bundle(writer, "new")
            writer.commit()
        assert (dest / "model.onnx").read_bytes() == b"new"
        assert sorted(p.name for p in dest.iterdir()) == ["manifest.json", "model.onnx"]
    assert _leftovers(tmp_path) == []


def test_force_refuses_a_symlink_to_a_folder(tmp_path):
    user = _user_folder(tmp_path)
    link = tmp_path / "link"
    link.symlink_to(user, target_is_directory=True)
    before = tree_snapshot(user)
    with pytest.raises(InputError, match="symbolic link"):
        with BundleWriter(link, force=True):
            pass
    assert link.is_symlink() and tree_snapshot(user) == before


@pytest.mark.parametrize("where", [".", "..", "sub/..", ""])
def test_output_may_not_be_the_current_folder_or_a_parent(tmp_path, monkeypatch, where):
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    (work / "model.onnx").write_bytes(b"model")
    monkeypatch.chdir(work)
    before = tree_snapshot(tmp_path)
    for force in (False, True):
        with pytest.raises(InputError, match="current folder") as info:
            CompileConfig(model="model.onnx", output=where, force=force).validate()
        assert "-o" in str(info.value)
        with pytest.raises(InputError, match="current folder"):
            with BundleWriter(Path(where), force=force):
                pass
    assert tree_snapshot(tmp_path) == before


@pytest.mark.parametrize("flag, rel", [("MODEL", "ex/model.onnx"), ("--calib", "ex/calib.npz"),
                                       ("--eval", "ex/data/eval.npz"), ("--weights", "ex/w.safetensors")])
@pytest.mark.parametrize("output", ["ex", "{input}", "."])
def test_output_may_not_be_or_hold_an_input(tmp_path, monkeypatch, flag, rel, output):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"user data")
    (tmp_path / "ex" / "manifest.json").write_text(json.dumps({"format": "edgemm-bundle", "files": {}}))
    output = output.format(input=rel)
    kwargs = {"model": "model.onnx", "--calib": None, "--eval": None, "--weights": None}
    kwargs.update({flag: rel})
    cfg = CompileConfig(model=kwargs["model"] if flag != "MODEL" else rel, calib=kwargs["--calib"],
                        eval=kwargs["--eval"], weights=kwargs["--weights"], output=output, force=True)
    before = tree_snapshot(tmp_path)
    with pytest.raises(InputError) as info:
        cfg.validate()
    if output != ".":
        assert flag in str(info.value) and rel in str(info.value)
    with pytest.raises(InputError):
        with BundleWriter(Path(output), force=True, protect={flag: rel}):
            pass
    assert tree_snapshot(tmp_path) == before


def test_cli_force_keeps_the_source_model_and_data_in_the_output_folder(good, tmp_path):
    """QA: `edgemm compile ex2/model.onnx --int8 --calib ex2/calib.npz -o ex2 --force` deleted both."""
    ex2 = tmp_path / "ex2"
    ex2.mkdir()
    shutil.copyfile(good.onnx, ex2 / "model.onnx")
    shutil.copyfile(good.calib, ex2 / "calib.npz")
    user = _user_folder(tmp_path)
    before = tree_snapshot(tmp_path)
    res = run_edgemm(["compile", "ex2/model.onnx", "--int8", "--calib", "ex2/calib.npz", "-o", "ex2", "--force"],
                     cwd=tmp_path, tmpdir=None)
    line = _one_line_error(res)
    assert "ex2" in line and "-o" in line and "MODEL" in line
    for args in (["-o", "userdir", "--force"], ["-o", ".", "--force"], ["-o", "..", "--force"], ["-o", "."]):
        line = _one_line_error(run_edgemm(["compile", "ex2/model.onnx", "--fp32", *args], cwd=tmp_path))
        assert "-o" in line and ("not an edgemm bundle" in line or "current folder" in line), line
    assert tree_snapshot(tmp_path) == before
    assert (user / "notes.txt").read_text() == "my notes\n"


# -- 2. two compiles racing to one -o ---------------------------------------------------------------

@pytest.mark.parametrize("appeared", ["bundle", "empty folder", "file"])
def test_commit_without_force_never_replaces_what_appeared_meanwhile(tmp_path, appeared):
    dest = tmp_path / "out"
    with pytest.raises(InputError, match="appeared while compiling") as info:
        with BundleWriter(dest) as first:
            _stage_bundle(first, "first")
            if appeared == "bundle":  # a second compile, started later, commits first
                with BundleWriter(dest) as second:
                    _stage_bundle(second, "second")
                    second.commit()
            elif appeared == "empty folder":  # rename(2) would silently replace an empty folder
                dest.mkdir()
            else:
                dest.write_text("someone's file\n")
            before = tree_snapshot(tmp_path / "out") if dest.is_dir() else dest.read_text()
            first.commit()
    assert "-o" in str(info.value)
    assert (tree_snapshot(dest) if dest.is_dir() else dest.read_text()) == before
    if appeared == "bundle":
        assert json.loads((dest / "manifest.json").read_text())["name"] == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # staging and work folders gone


def test_commit_with_force_rechecks_what_it_replaces(tmp_path):
    dest = _fake_bundle(tmp_path / "out")
    with pytest.raises(InputError, match="not an edgemm bundle"):
        with BundleWriter(dest, force=True) as writer:
            _stage_bundle(writer, "new")
            shutil.rmtree(dest)  # swapped for the user's data while compiling
            _user_folder(tmp_path).rename(dest)
            writer.commit()
    assert (dest / "notes.txt").read_text() == "my notes\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# -- 3. FIFOs and other non-regular files -----------------------------------------------------------

@pytest.fixture
def fifos(tmp_path):
    def make(name: str) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        os.mkfifo(path)
        return path

    return make


_PROBE = """
import json, sys
from pathlib import Path
from edgemm.errors import InputError
call, arg, role = sys.argv[1], sys.argv[2], sys.argv[3]
try:
    if call == "model":
        from edgemm.frontends import load_model
        load_model(arg)
    elif call == "data":
        from edgemm.data import load_dataset
        load_dataset(Path(arg), role=role)
    elif call == "weights":
        from edgemm.frontends.factory import load_state_dict
        load_state_dict(Path(arg))
    else:
        from edgemm.config import CompileConfig
        CompileConfig.from_file(Path(arg))
except InputError as exc:
    print(json.dumps({"type": type(exc).__name__, "message": str(exc)}))
else:
    print(json.dumps({"type": None}))
"""


def _refused(call: str, path: Path, role: str = "--calib") -> str:
    """Load ``path`` the way edgemm does, in a subprocess (a load blocked in open() on a FIFO may hold
    the GIL, so a thread cannot time it out); return the InputError's message. Fails if it blocks."""
    try:
        res = subprocess.run([sys.executable, "-c", _PROBE, call, str(path), role], cwd=path.parent,
                             env=cli_env(), capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"loading {path} ({call}) still blocked after 60 s")
    assert res.returncode == 0, res.stderr[-2000:]
    result = json.loads(res.stdout.strip().splitlines()[-1])
    assert result["type"] is not None, f"{path} was accepted"
    return result["message"]


@pytest.mark.parametrize("name", ["fifo.pt", "fifo.pt2", "fifo.onnx", "fifo.jit"])
def test_model_fifo_is_refused_not_waited_on(fifos, name):
    path = fifos(name)
    message = _refused("model", path)
    assert "named pipe" in message and str(path) in message, message


def test_data_fifo_is_refused_not_waited_on(fifos, tmp_path):
    message = _refused("data", fifos("fifo.npz"), role="--calib")
    assert "named pipe" in message and "--calib" in message, message
    folder = tmp_path / "calib"
    folder.mkdir()
    np.savez(folder / "a.npz", x=np.zeros((2, 3), np.float32))
    inner = fifos("calib/b.npz")
    message = _refused("data", folder, role="--data")
    assert str(inner) in message and "named pipe" in message, message


def test_weights_and_config_fifos_are_refused_not_waited_on(fifos):
    for name in ("w.pt", "w.safetensors"):
        message = _refused("weights", fifos(name))
        assert "--weights" in message and "named pipe" in message, message
    message = _refused("config", fifos("cfg.json"))
    assert "--config" in message and "named pipe" in message, message


def test_character_device_is_refused(tmp_path):
    from edgemm.data import load_dataset
    from edgemm.paths import require_regular_file

    with pytest.raises(InputError, match="character device"):
        require_regular_file("/dev/null", field="MODEL")
    with pytest.raises(InputError, match="character device"):
        load_dataset("/dev/zero")
    assert require_regular_file(tmp_path, allow_dir=True) == tmp_path


def test_cli_fifos_give_one_line(good, fifos, tmp_path):
    model = fifos("fifo.pt2")
    calib = fifos("fifo.npz")
    line = _one_line_error(run_edgemm(["compile", model, "-o", tmp_path / "b1"], cwd=tmp_path, timeout=120))
    assert "named pipe" in line and "fifo.pt2" in line
    line = _one_line_error(run_edgemm(["compile", good.onnx, "--int8", "--calib", calib, "-o", tmp_path / "b2"],
                                      cwd=tmp_path, timeout=120))
    assert "named pipe" in line and "--calib" in line
    line = _one_line_error(run_edgemm(["run", good.bundle, "--data", calib, "-o", tmp_path / "o.npz"],
                                      cwd=tmp_path, timeout=120))
    assert "named pipe" in line and "--data" in line
    assert not any((tmp_path / n).exists() for n in ("b1", "b2", "o.npz"))


# -- 4. internal errors that are input errors -------------------------------------------------------

def _onnx_with_external_data(folder: Path, length: int, offset: int = 0) -> Path:
    import onnx
    from onnx import TensorProto, helper

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "w.bin").write_bytes(np.arange(16, dtype=np.float32).tobytes())  # 64 bytes
    w = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[16], data_location=TensorProto.EXTERNAL)
    for key, value in (("location", "w.bin"), ("offset", str(offset)), ("length", str(length))):
        entry = w.external_data.add()
        entry.key, entry.value = key, value
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 16])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = folder / "model.onnx"
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("length, offset", [(10 ** 15, 0), (64, 8), (4, 100)])
def test_external_data_beyond_its_file_is_an_input_error(tmp_path, length, offset):
    from edgemm.onnx_io import copy_inline
    from edgemm.frontends import load_model

    path = _onnx_with_external_data(tmp_path / "m", length, offset)
    with pytest.raises(InputError, match="beyond the end") as info:
        load_model(str(path))
    assert "initializer 'w'" in str(info.value)
    with pytest.raises(InputError, match="external data") as info:  # the compiler's own copy, as a backstop
        copy_inline(path, tmp_path / "copy.onnx")
    assert str(path) in str(info.value) and not (tmp_path / "copy.onnx").exists()


def test_cli_external_data_beyond_its_file(tmp_path):
    path = _onnx_with_external_data(tmp_path / "m", 10 ** 15)
    line = _one_line_error(run_edgemm(["compile", path, "--fp32", "-o", tmp_path / "b"], cwd=tmp_path, timeout=120))
    assert "initializer 'w'" in line and "beyond the end" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_external_data_still_loads_when_it_fits(tmp_path):
    from edgemm.onnx_io import copy_inline
    from edgemm.frontends import load_model

    path = _onnx_with_external_data(tmp_path / "m", 64)
    assert load_model(str(path)).input_names == ["x"]
    copy_inline(path, tmp_path / "copy.onnx")
    assert (tmp_path / "copy.onnx").stat().st_size > 64


def test_cli_run_output_that_is_a_folder(good, tmp_path):
    out = tmp_path / "out.npz"
    out.mkdir()
    (out / "keep.txt").write_text("mine\n")
    before = tree_snapshot(tmp_path)
    for target in (out, tmp_path / "plain-folder"):
        target.mkdir(exist_ok=True)
        line = _one_line_error(run_edgemm(["run", good.bundle, "--data", good.calib, "-o", target], cwd=tmp_path))
        assert "-o" in line and str(target) in line
    (tmp_path / "plain-folder").rmdir()
    assert tree_snapshot(tmp_path) == before  # no .out.tmp-PID.npz left behind
    res = run_edgemm(["run", good.bundle, "--data", good.calib, "-o", tmp_path / "new" / "o.npz"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["o.npz"]


# -- 4/5. --config files: parsing and types ---------------------------------------------------------

MODEL = "/tmp/nowhere/model.onnx"


@pytest.mark.parametrize("text, key", [
    ('{"model": ' + "[" * 100_000 + "]" * 100_000 + "}", None),          # RecursionError
    ('{"model": "x", "max_batch": ' + "9" * 5000 + "}", None),            # int beyond the digit limit
    (json.dumps({"model": MODEL, "dynamic": None}), "dynamic"),
    (json.dumps({"model": MODEL, "max_batch": "64"}), "max_batch"),
    (json.dumps({"model": ["x"]}), "model"),
    (json.dumps({"model": MODEL, "target": None}), "target"),
    (json.dumps({"model": MODEL, "force": "no"}), "force"),
    (json.dumps({"model": MODEL, "force": 1}), "force"),
    (json.dumps({"model": MODEL, "opt_level": 99}), "opt_level"),
    (json.dumps({"model": MODEL, "opt_level": True}), "opt_level"),
    (json.dumps({"model": MODEL, "calib_samples": 1.5}), "calib_samples"),
    (json.dumps({"model": MODEL, "branch": {"a": 1}}), "branch"),
    (json.dumps({"model": MODEL, "inputs": ["x:1x4:float32", 3]}), "inputs"),
    (json.dumps({"model": MODEL, "inputs": "x:1x4:float32"}), "inputs"),
    (json.dumps({"model": MODEL, "precision": 5}), "precision"),
    (json.dumps({"model": MODEL, "min_cosine": "0.9"}), "min_cosine"),
    (json.dumps({"model": MODEL, "workspace_mb": 1.5}), "workspace_mb"),
    (json.dumps({"model": MODEL, "max_batch": -1}), "max_batch"),
    (json.dumps({"model": MODEL, "hardware_compatibility": "all"}), "hardware_compatibility"),
])
def test_config_values_are_type_and_range_checked(tmp_path, text, key):
    path = tmp_path / "cfg.json"
    path.write_text(text)
    with pytest.raises(InputError) as info:
        CompileConfig.from_file(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    if key is not None:
        assert message.startswith(f"{path}: {key}: "), message


def test_config_accepts_what_dump_config_writes_and_json_numbers(tmp_path):
    path = tmp_path / "cfg.json"
    cfg = CompileConfig(model=MODEL, calib="c.npz", precision="int8", min_cosine=0.99, workspace_mb=512,
                        inputs=["x:1x4:float32"], force=True, opt_level=0)
    path.write_text(json.dumps(cfg.to_dict()))
    assert CompileConfig.from_file(path) == cfg
    path.write_text(json.dumps({"model": MODEL, "recover_lr": 1, "min_cosine": 1, "name": None,
                                "dynamic": [], "opt_level": 5}))
    loaded = CompileConfig.from_file(path)
    assert loaded.recover_lr == 1 and loaded.min_cosine == 1 and loaded.opt_level == 5


def test_cli_config_force_string_does_not_replace_a_bundle(good, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(good.bundle, out)
    before = tree_snapshot(out)
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"model": str(good.onnx), "output": str(out), "force": "no"}))
    line = _one_line_error(run_edgemm(["compile", "--config", cfg], cwd=tmp_path))
    assert str(cfg) in line and "force" in line
    assert tree_snapshot(out) == before


# -- 6. torch's warnings stay off stderr ------------------------------------------------------------

class _Payload:
    def __reduce__(self):
        return (print, ("would run",))


def test_weights_loading_keeps_torch_warnings_off_the_console(tmp_path):
    from edgemm.frontends.factory import load_state_dict

    raw = tmp_path / "evil_raw.pt"
    raw.write_bytes(pickle.dumps(_Payload(), protocol=4))  # torch warns "Detected pickle protocol 4"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(EdgemmError):
            load_state_dict(raw)
    assert [str(w.message) for w in caught] == []


def test_cli_weights_errors_are_one_line(tiny, tmp_path):
    raw = tmp_path / "evil_raw.pt"
    raw.write_bytes(pickle.dumps(_Payload(), protocol=4))
    renamed = tmp_path / "st_as.pt"
    shutil.copyfile(tiny["safetensors"], renamed)
    for weights, expect in ((raw, "would run code"), (renamed, "rename it")):
        res = run_edgemm(["compile", "tests.fixtures.tiny_models:build_tiny", "--weights", weights,
                          "--calib", tiny["calib"], "-o", tmp_path / "b"], cwd=Path(__file__).resolve().parents[2])
        line = _one_line_error(res)
        assert expect in line and str(weights) in line
        assert [l for l in res.stderr.splitlines() if l.strip()] == [line]  # nothing else on stderr
    assert not (tmp_path / "b").exists()
