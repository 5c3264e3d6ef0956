"""The hostile-input corpus: broken, tampered and malicious inputs for every file edgemm reads.

Each case is built at test time into its own folder (nothing binary is committed) from the good
artefacts of the tiny test model, and carries what the CLI must say about it: the `edgemm` arguments,
the file the one-line error must name, the field it must name (a prefix; None when the whole file is
at fault), the output that must not appear, and for code-execution payloads a sentinel file that the
payload would create.

    python tests/robustness/make_corpus.py OUT     # build the tiny model, a bundle and the corpus in OUT
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import struct
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np


@dataclass
class Good:
    """The valid artefacts every case starts from (never modified)."""
    torchscript: Path
    pt2: Path
    onnx: Path
    calib: Path
    bundle: Path


@dataclass
class Case:
    name: str
    argv: list[str]                  # arguments after `edgemm`
    file: str                        # the error line must start with "error: <file>: "
    field: str | None                # ... followed by this field (a prefix), when the fault lies in one
    workdir: Path                    # the command's cwd; nothing in it may change
    output: Path | None = None       # must not exist afterwards
    sentinel: Path | None = None     # a code-execution payload would create it
    expect: str = ""                 # why edgemm must refuse it (documentation only)


@dataclass
class Spec:
    name: str
    build: Callable[[Good, Path], Case]
    kind: str                        # model | calib | bundle | run-data


# --------------------------------------------------------------------------------------------- helpers

class _OpenOnUnpickle:
    """A pickle payload: unpickling it calls open(sentinel, "w"), creating the sentinel file."""

    def __init__(self, sentinel: Path):
        self.sentinel = str(sentinel)

    def __reduce__(self):
        return (open, (self.sentinel, "w"))


def evil_pickle(sentinel: Path, protocol: int = 2) -> bytes:
    return pickle.dumps(_OpenOnUnpickle(sentinel), protocol=protocol)


def rewrite_zip(src: Path, dst: Path, edit: Callable[[dict[str, bytes]], None]) -> None:
    """Copy a zip archive, letting ``edit`` change its members (CRCs are recomputed: a forged file)."""
    with zipfile.ZipFile(src) as zin:
        members = {i.filename: zin.read(i.filename) for i in zin.infolist()}
    edit(members)
    with zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for name, data in members.items():
            zout.writestr(name, data)


def member(members: dict[str, bytes], suffix: str) -> str:
    return next(n for n in members if n.endswith(suffix))


def flip_in_member(src: Path, dst: Path, suffix: str) -> str:
    """Flip one byte in the middle of a member's stored data (a transfer error); returns the member."""
    data = bytearray(src.read_bytes())
    with zipfile.ZipFile(src) as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith(suffix) and i.compress_size > 0)
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26: info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len
    data[start + info.compress_size // 2] ^= 0xFF
    dst.write_bytes(bytes(data))
    return info.filename


def truncate(src: Path, dst: Path, fraction: float) -> None:
    data = src.read_bytes()
    cut = min(len(data) - 1, int(len(data) * fraction))
    dst.write_bytes(data[:cut])


def copy_bundle(good: Good, work: Path) -> Path:
    dst = work / "bundle"
    shutil.copytree(good.bundle, dst)
    return dst


def edit_manifest(bundle: Path, edit: Callable[[dict], None]) -> None:
    path = bundle / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest, indent=2))


def rehash(bundle: Path) -> None:
    """Make the manifest's hashes match the files again (a bundle that is consistent but wrong)."""
    def edit(m):
        m["files"] = {rel: hashlib.sha256((bundle / rel).read_bytes()).hexdigest() for rel in m["files"]}
    edit_manifest(bundle, edit)


def good_feeds(good: Good, n: int = 4) -> dict[str, np.ndarray]:
    with np.load(good.calib) as npz:
        return {k: npz[k][:n] for k in npz.files}


def save_npz(path: Path, arrays: dict) -> Path:
    with open(path, "wb") as f:  # np.savez on an open file keeps the exact name
        np.savez(f, **arrays)
    return path


def compile_case(name, work, model, *, file, field, extra=(), sentinel=None, expect=""):
    out = work / "out" / "bundle"
    return Case(name, ["compile", str(model), "-o", str(out), *extra], str(file), field, work, output=out,
                sentinel=sentinel, expect=expect)


def run_case(name, work, bundle, data, *, file, field, expect=""):
    out = work / "outputs.npz"
    return Case(name, ["run", str(bundle), "--data", str(data), "-o", str(out)], str(file), field, work,
                output=out, expect=expect)


# ------------------------------------------------------------------------------------ model files

def _pickle_raw(good, work):
    model, sentinel = work / "model.pt", work / "PWNED"
    model.write_bytes(evil_pickle(sentinel))
    return compile_case("pickle-reduce-raw", work, model, file=model, field=None, sentinel=sentinel,
                        expect="SecurityError: unpickling would run code")


def _pickle_torch_save(good, work):
    import torch

    model, sentinel = work / "model.pt", work / "PWNED"
    torch.save(_OpenOnUnpickle(sentinel), str(model))
    return compile_case("pickle-reduce-torch-save", work, model, file=model, field=None, sentinel=sentinel,
                        expect="SecurityError: torch.save archive of an object whose __reduce__ runs code")


def _pickle_legacy(good, work):
    import torch

    model, sentinel = work / "model.pth", work / "PWNED"
    torch.save(_OpenOnUnpickle(sentinel), str(model), _use_new_zipfile_serialization=False)
    return compile_case("pickle-reduce-legacy-format", work, model, file=model, field=None, sentinel=sentinel,
                        expect="SecurityError: legacy (non-zip) torch.save format")


def _pickle_protocol0(good, work):
    model, sentinel = work / "model.pt", work / "PWNED"
    model.write_bytes(evil_pickle(sentinel, protocol=0))
    return compile_case("pickle-reduce-protocol-0", work, model, file=model, field=None, sentinel=sentinel,
                        expect="SecurityError: text-protocol pickle")


def _torchscript_evil_pickle(good, work):
    model, sentinel = work / "model.pt", work / "PWNED"
    rewrite_zip(good.torchscript, model,
                lambda m: m.__setitem__(member(m, "/data.pkl"), evil_pickle(sentinel)))
    return compile_case("torchscript-data-pkl-reduce", work, model, file=model, field=None, sentinel=sentinel,
                        expect="TorchScript's unpickler resolves no Python globals")


def _pt2_sample_inputs(good, work):
    model, sentinel = work / "model.pt2", work / "PWNED"
    rewrite_zip(good.pt2, model,
                lambda m: m.__setitem__(member(m, "sample_inputs/model.pt"), evil_pickle(sentinel)))
    return compile_case("pt2-pickled-sample-inputs", work, model, file=model, field=None, sentinel=sentinel,
                        expect="SecurityError: torch.export.load falls back to weights_only=False")


def _pt2_pickled_weight(good, work):
    model, sentinel = work / "model.pt2", work / "PWNED"

    def edit(m):
        cfg_name = member(m, "model_weights_config.json")
        cfg = json.loads(m[cfg_name])
        entry = next(iter(cfg["config"].values()))
        entry["use_pickle"] = True
        m[cfg_name.rsplit("/", 1)[0] + "/" + entry["path_name"]] = evil_pickle(sentinel)
        m[cfg_name] = json.dumps(cfg).encode()
    rewrite_zip(good.pt2, model, edit)
    return compile_case("pt2-pickled-weight", work, model, file=model, field=None, sentinel=sentinel,
                        expect="SecurityError: weights marked use_pickle are unpickled with weights_only=False")


def _pt2_json(good, model: Path, edit_doc: Callable[[dict], None]) -> None:
    def edit(m):
        name = member(m, "models/model.json")
        doc = json.loads(m[name])
        edit_doc(doc)
        m[name] = json.dumps(doc).encode()
    rewrite_zip(good.pt2, model, edit)


def _pt2_expr_eval(good, work):
    model, sentinel = work / "model.pt2", work / "PWNED"
    payload = f"__import__('builtins').open({str(sentinel)!r}, 'w') and 1"

    def edit(doc):
        values = doc["graph_module"]["graph"]["tensor_values"]
        first_input = next(v for v in values.values() if v["sizes"] and "as_expr" in v["sizes"][0])
        first_input["sizes"][0] = {"as_expr": {"expr_str": payload, "hint": {"as_int": 2}}}
    _pt2_json(good, model, edit)
    return compile_case("pt2-sympy-expression-eval", work, model, file=model, field=None, sentinel=sentinel,
                        expect="SecurityError: symbolic shapes are parsed with sympify (eval)")


def _pt2_node_target(good, work):
    model = work / "model.pt2"

    def edit(doc):
        doc["graph_module"]["graph"]["nodes"][0]["target"] = "torch.os.system"
    _pt2_json(good, model, edit)
    return compile_case("pt2-node-calls-os-system", work, model, file=model, field=None,
                        expect="SecurityError: node targets resolve by getattr from the torch module")


def _truncated(fmt: str, fraction: float):
    def build(good, work):
        src = {"pt": good.torchscript, "pt2": good.pt2, "onnx": good.onnx}[fmt]
        model = work / f"model.{fmt}"
        truncate(src, model, fraction)
        return compile_case(f"truncated-{fmt}-at-{int(fraction * 100)}pct", work, model, file=model, field=None,
                            expect="InputError: truncated model file")
    return Spec(f"truncated-{fmt}-at-{int(fraction * 100)}pct", build, "model")


def _flipped(fmt: str, suffix: str):
    def build(good, work):
        src = {"pt": good.torchscript, "pt2": good.pt2}[fmt]
        model = work / f"model.{fmt}"
        name = flip_in_member(src, model, suffix)
        return compile_case(_flip_name(fmt, suffix), work, model, file=model, field=name,
                            expect="InputError: member fails its CRC (torch does not check)")
    return Spec(_flip_name(fmt, suffix), build, "model")


def _flip_name(fmt: str, suffix: str) -> str:
    return f"flipped-{fmt}-" + ("code" if suffix == ".py" else suffix.strip("/").replace("/", "-"))


def _onnx_unknown_op(good, work):
    import onnx

    model = work / "model.onnx"
    proto = onnx.load(str(good.onnx))
    proto.graph.node[0].op_type = "NoSuchOp"
    onnx.save(proto, str(model))
    return compile_case("onnx-unknown-op", work, model, file=model, field=None, expect="InputError: checker")


def _onnx_garbage_header(good, work):
    model = work / "model.onnx"
    data = bytearray(good.onnx.read_bytes())
    data[:16] = b"\xff" * 16
    model.write_bytes(bytes(data))
    return compile_case("onnx-garbage-header", work, model, file=model, field=None,
                        expect="InputError: protobuf cannot parse")


def _onnx_external(kind: str):
    def build(good, work):
        import onnx
        from onnx.external_data_helper import convert_model_to_external_data

        folder = work / "model"
        folder.mkdir()
        model = folder / "model.onnx"
        proto = onnx.load(str(good.onnx))
        convert_model_to_external_data(proto, all_tensors_to_one_file=True, location="weights.bin",
                                       size_threshold=0)
        onnx.save(proto, str(model))
        secret = work / "secret.bin"
        os.replace(folder / "weights.bin", secret)   # the data now sits outside the model's folder
        location = {"dotdot": "../secret.bin", "absolute": str(secret), "symlink": "weights.bin",
                    "missing": "weights.bin"}[kind]
        if kind == "symlink":
            os.symlink(secret, folder / "weights.bin")
        proto = onnx.load(str(model), load_external_data=False)
        first = None
        for tensor in proto.graph.initializer:
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = location
                    first = first or tensor.name
        onnx.save(proto, str(model))
        return compile_case(f"onnx-external-data-{kind}", work, model, file=model, field=f"initializer {first!r}",
                            expect=("InputError: external data missing" if kind == "missing"
                                    else "SecurityError: external data escapes the model's folder"))
    return Spec(f"onnx-external-data-{kind}", build, "model")


def _model_is_folder(good, work):
    model = work / "model.pt"
    model.mkdir()
    return compile_case("model-is-a-folder", work, model, file=model, field=None, expect="InputError")


# ------------------------------------------------------------------------------- calibration data

def _calib(name: str, make: Callable[[Good, Path], tuple[Path, str | None]], *, model: str = "onnx",
           flag: str = "--calib", expect: str = "InputError"):
    def build(good, work):
        path, fld = make(good, work)
        src = {"onnx": good.onnx, "pt": good.torchscript}[model]  # ONNX: checked against its specs, no torch
        return compile_case(f"calib-{name}", work, src, file=path, field=fld, extra=(flag, str(path)),
                            expect=expect)
    return Spec(f"calib-{name}", build, "calib")


def _poison(value):
    def make(good, work):
        d = good_feeds(good)
        d["image"] = d["image"].copy()
        d["image"][1, 0, 0, 0] = value
        return save_npz(work / "calib.npz", d), "image"
    return make


def _calib_empty(good, work):
    return save_npz(work / "calib.npz", {}), None


def _calib_zero_samples(good, work):
    d = good_feeds(good)
    d["image"] = d["image"][:0]
    d["input_ids"] = d["input_ids"][:0]
    return save_npz(work / "calib.npz", d), "image"


def _calib_counts(good, work):
    d = good_feeds(good)
    d["input_ids"] = d["input_ids"][:2]
    return save_npz(work / "calib.npz", d), "axis 0"


def _calib_wrong_key(good, work):
    d = good_feeds(good)
    d["pixels"] = d.pop("image")
    return save_npz(work / "calib.npz", d), "image"


def _calib_wrong_dtype(good, work):
    d = good_feeds(good)
    d["input_ids"] = d["input_ids"].astype(np.float32)
    return save_npz(work / "calib.npz", d), "input_ids"


def _calib_wrong_shape(good, work):
    d = good_feeds(good)
    d["image"] = d["image"][:, :, :8, :8].copy()
    return save_npz(work / "calib.npz", d), "image"


def _calib_object(good, work):
    d = good_feeds(good)
    d["image"] = np.array([{"a": 1}] * 4, dtype=object)
    return save_npz(work / "calib.npz", d), "image"   # np.savez pickles object arrays


def _calib_truncated(good, work):
    path = work / "calib.npz"
    truncate(good.calib, path, 0.5)
    return path, None


def _calib_not_npz(good, work):
    path = work / "calib.npz"
    path.write_bytes(evil_pickle(work / "PWNED"))
    return path, None


def _calib_member_not_npy(good, work):
    path = work / "calib.npz"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("image.npy", b"not an array")
        z.writestr("input_ids.npy", b"not an array")
    return path, "image"


def _calib_scalar(good, work):
    return save_npz(work / "calib.npz", {"image": np.float32(1), "input_ids": np.int64(1)}), "image"


def _eval_labels(good, work):
    d = good_feeds(good)
    d["labels"] = np.zeros(3, dtype=np.int64)
    return save_npz(work / "eval.npz", d), "labels"


# ------------------------------------------------------------------------------------------ bundles

def _bundle(name: str, tamper: Callable[[Path, Good, Path], tuple[str, str | None]], expect: str):
    def build(good, work):
        bundle = copy_bundle(good, work)
        file, fld = tamper(bundle, good, work)
        data = save_npz(work / "data.npz", good_feeds(good))
        return run_case(f"bundle-{name}", work, bundle, data, file=file, field=fld, expect=expect)
    return Spec(f"bundle-{name}", build, "bundle")


def _t_external(location: str):
    """The bundle's model with its weights as ONNX external data at ``location``, the manifest's hashes
    made consistent for every hashed file: a model that would read a file the manifest does not hash
    (a report verify rewrites, the manifest itself) or one outside the bundle."""
    def tamper(b, good, work, location=location):
        import onnx
        from onnx.external_data_helper import convert_model_to_external_data

        if location == "ABSOLUTE":
            location = str(work / "outside.bin")
        model = b / "model.onnx"
        proto = onnx.load(str(model))
        convert_model_to_external_data(proto, all_tensors_to_one_file=True, location="weights.bin",
                                       size_threshold=256)
        onnx.save(proto, str(model))
        weights = (b / "weights.bin").read_bytes()
        (b / "weights.bin").unlink()
        target = (b / location) if not os.path.isabs(location) else Path(location)
        if location != "manifest.json":
            target.write_bytes(weights)
        proto = onnx.load(str(model), load_external_data=False)
        for tensor in proto.graph.initializer:
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = location
        onnx.save(proto, str(model))
        rehash(b)
        return str(model), "backend.model"
    return tamper


def _t_flip_model(b, good, work):
    model = b / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01
    model.write_bytes(bytes(data))
    return str(model), "files.model.onnx"


def _t_manifest_dtype(b, good, work):
    edit_manifest(b, lambda m: m["inputs"][0].__setitem__("dtype", "float16"))
    return str(b / "manifest.json"), "inputs[0].dtype"


def _t_manifest_shape(b, good, work):
    edit_manifest(b, lambda m: m["inputs"][0]["shape"].__setitem__(-1, 32))
    return str(b / "manifest.json"), "inputs[0].shape"


def _t_manifest_input_name(b, good, work):
    edit_manifest(b, lambda m: m["inputs"][1].__setitem__("name", "token_ids"))
    return str(b / "manifest.json"), "inputs"


def _t_manifest_hash(b, good, work):
    edit_manifest(b, lambda m: m["files"].__setitem__("model.onnx", "0" * 64))
    return str(b / "model.onnx"), "files.model.onnx"


def _t_manifest_truncated(b, good, work):
    path = b / "manifest.json"
    path.write_text(path.read_text()[:200])
    return str(path), "line "


def _t_manifest_missing_key(b, good, work):
    edit_manifest(b, lambda m: m.pop("backend"))
    return str(b / "manifest.json"), "backend"


def _t_manifest_files_type(b, good, work):
    edit_manifest(b, lambda m: m.__setitem__("files", ["model.onnx"]))
    return str(b / "manifest.json"), "files"


def _t_manifest_ranges_type(b, good, work):
    edit_manifest(b, lambda m: m["inputs"][0].__setitem__("ranges", "batch"))
    return str(b / "manifest.json"), "inputs[0]"


def _t_manifest_deep(b, good, work):
    (b / "manifest.json").write_text("[" * 200_000 + "]" * 200_000)
    return str(b / "manifest.json"), None


def _t_manifest_huge_int(b, good, work):
    text = re.sub(r'"format_version": (\d+)', lambda m: f'"format_version": {m[1]}' + "0" * 6000,
                  (b / "manifest.json").read_text(), count=1)
    assert "0" * 6000 in text, "the manifest's format_version was not found"
    (b / "manifest.json").write_text(text)
    return str(b / "manifest.json"), None


def _t_extra_file(b, good, work):
    (b / "libplugin.so").write_bytes(b"\x7fELF")
    return str(b), "files"


def _t_missing_file(b, good, work):
    (b / "model.onnx").unlink()
    return str(b), "files.model.onnx"


def _t_escape(rel_of: Callable[[Path], str]):
    def tamper(b, good, work):
        outside = work / "outside.onnx"
        shutil.copyfile(b / "model.onnx", outside)
        rel = rel_of(outside)

        def edit(m):
            m["files"][rel] = m["files"].pop("model.onnx")
            m["backend"]["model"] = rel
        edit_manifest(b, edit)
        (b / "model.onnx").unlink()
        return str(b / "manifest.json"), "files"
    return tamper


def _t_symlink(b, good, work):
    outside = work / "outside.onnx"
    shutil.copyfile(b / "model.onnx", outside)
    (b / "model.onnx").unlink()
    os.symlink(outside, b / "model.onnx")
    return str(b / "manifest.json"), "files"


def _t_backend_model_escape(b, good, work):
    shutil.copyfile(b / "model.onnx", work / "outside.onnx")
    edit_manifest(b, lambda m: m["backend"].__setitem__("model", "../outside.onnx"))
    return str(b / "manifest.json"), "backend.model"


def _t_future_format(b, good, work):
    edit_manifest(b, lambda m: m.__setitem__("format_version", 99))
    return str(b / "manifest.json"), "format_version"


def _t_foreign_format(b, good, work):
    edit_manifest(b, lambda m: m.__setitem__("format", "tflite-bundle"))
    return str(b / "manifest.json"), "format"


def _t_unknown_backend(b, good, work):
    edit_manifest(b, lambda m: m["backend"].__setitem__("name", "tflite"))
    return str(b / "manifest.json"), "backend.name"


def _t_tensorrt_no_engine(b, good, work):
    def edit(m):
        m["backend"] = {"name": "tensorrt", "onnx": "model.onnx", "engine": None}
        m["target"] = {"name": "jetson-orin-nano", "kind": "jetson", "backend": "tensorrt",
                       "compute_capability": "8.7"}
    edit_manifest(b, edit)
    return str(b / "manifest.json"), "backend.engine"


def _t_tensorrt_foreign_engine(b, good, work):
    (b / "model.engine").write_bytes(b"ftrt" + os.urandom(256))

    def edit(m):
        m["backend"] = {"name": "tensorrt", "onnx": "model.onnx", "engine": "model.engine",
                        "built": {"tensorrt_version": "99.0.0", "compute_capability": "12.1",
                                  "device": "a future GPU"}}
        m["files"]["model.engine"] = ""
    edit_manifest(b, edit)
    rehash(b)
    # Without TensorRT here the error is about the missing package; with it, about the version.
    return str(b / "manifest.json"), "backend"


def _t_future_opset(b, good, work):
    import onnx

    proto = onnx.load(str(b / "model.onnx"))
    for opset in proto.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = 999
    onnx.save(proto, str(b / "model.onnx"))
    rehash(b)
    return str(b / "model.onnx"), "backend.model"


def _t_not_a_folder(b, good, work):
    shutil.rmtree(b)
    b.write_bytes(b"not a bundle")
    return str(b), None


# ------------------------------------------------------------------------------ data at run time

def _run_data(name: str, make: Callable[[dict], tuple[dict, str | None]]):
    def build(good, work):
        bundle = copy_bundle(good, work)
        arrays, fld = make(good_feeds(good))
        data = save_npz(work / "data.npz", arrays)
        return run_case(f"run-{name}", work, bundle, data, file=data, field=fld, expect="InputError")
    return Spec(f"run-{name}", build, "run-data")


def _d_wrong_name(d):
    d["img"] = d.pop("image")
    return d, "image"


def _d_wrong_dtype(d):
    d["input_ids"] = d["input_ids"].astype(np.int32)
    return d, "input_ids"


def _d_wrong_shape(d):
    d["image"] = np.ascontiguousarray(d["image"][:, :, :, :8])
    return d, "image"


def _d_wrong_rank(d):
    d["image"] = d["image"].reshape(len(d["image"]), -1)
    return d, "image"


def _d_nan(d):
    d["image"][0, 0, 0, 0] = np.nan
    return d, "image"


def _d_batch_mismatch(d):
    d["input_ids"] = d["input_ids"][:1]
    return d, "axis 0"


# ------------------------------------------------ outputs that would overwrite an input (issue 14, class 4)
# The output path is an existing input, so "no output afterwards" cannot be asked: the case's folder must
# be byte-identical (the input data and the bundle unchanged) and nothing new may appear.

def _outputs(name: str, make: Callable[[Good, Path, Path, Path], tuple[list, str, str]]):
    """``make(good, work, bundle, data)`` -> (argv, file, field): a command whose output is (or lies in,
    or is an alias of) one of its inputs, or another of its outputs."""
    def build(good, work):
        bundle = copy_bundle(good, work)
        data = save_npz(work / "data.npz", good_feeds(good))
        argv, file, field = make(good, work, bundle, data)
        return Case(f"out-{name}", [str(a) for a in argv], str(file), field, work, expect="InputError")
    return Spec(f"out-{name}", build, "outputs")


def _run_to(out):
    """run BUNDLE --data data.npz -o OUT, OUT made by ``out(work, bundle, data)``."""
    def make(good, work, bundle, data):
        o = out(work, bundle, data)
        return ["run", bundle, "--data", data, "-o", o], o, "-o"
    return make


def _hardlink(work, bundle, data):
    os.link(data, work / "alias.npz")
    return work / "alias.npz"


def _symlink(work, bundle, data):
    (work / "alias.npz").symlink_to(data)
    return work / "alias.npz"


def _linked_bundle(work, bundle, data):
    (work / "reports").symlink_to(bundle, target_is_directory=True)
    return work / "reports" / "out.npz"


def _data_folder(good, work, bundle, data):
    folder = work / "data"
    folder.mkdir()
    os.replace(data, folder / "part0.npz")
    return ["run", bundle, "--data", folder, "-o", folder / "out.npz"], folder / "out.npz", "-o"


def _verify(flag_value: Callable[[Path, Path, Path], list], file_of: Callable[[Path, Path, Path], Path],
            field: str):
    """verify BUNDLE --data data.npz --save-baseline/--junit/... (the arguments ``flag_value`` makes)."""
    def make(good, work, bundle, data):
        extra = flag_value(work, bundle, data)
        if "--save-baseline" not in extra and "--baseline" not in extra:
            extra = [*extra, "--save-baseline", work / "baselines" / "b.json"]
        return ["verify", bundle, "--data", data, *extra], file_of(work, bundle, data), field
    return make


def _baseline_file(work, bundle, data):
    """A recorded baseline (only its name matters to the checks made before any work)."""
    (work / "b.json").write_text("{}\n")
    return work / "b.json"


OUTPUT_SPECS = [
    _outputs("run-o-is-data", _run_to(lambda w, b, d: d)),
    _outputs("run-o-hardlink-to-data", _run_to(_hardlink)),
    _outputs("run-o-symlink-to-data", _run_to(_symlink)),
    _outputs("run-o-dotdot-alias-of-data", _run_to(lambda w, b, d: w / "bundle" / ".." / d.name)),
    _outputs("run-o-inside-bundle", _run_to(lambda w, b, d: b / "outputs.npz")),
    _outputs("run-o-through-linked-folder-into-bundle", _run_to(_linked_bundle)),
    _outputs("run-o-under-a-file", _run_to(lambda w, b, d: d / "out.npz")),
    _outputs("run-o-inside-data-folder", _data_folder),
    _outputs("verify-save-baseline-golden-is-data",
             _verify(lambda w, b, d: ["--save-baseline", w / "data.json"], lambda w, b, d: w / "data.npz",
                     "--save-baseline")),
    _outputs("verify-save-baseline-is-manifest",
             _verify(lambda w, b, d: ["--save-baseline", b / "manifest.json"], lambda w, b, d: b / "manifest.json",
                     "--save-baseline")),
    _outputs("verify-junit-is-data", _verify(lambda w, b, d: ["--junit", d], lambda w, b, d: d, "--junit")),
    _outputs("verify-markdown-in-bundle",
             _verify(lambda w, b, d: ["--markdown", b / "report.md"], lambda w, b, d: b / "report.md",
                     "--markdown")),
    _outputs("verify-html-is-baseline",
             _verify(lambda w, b, d: ["--baseline", _baseline_file(w, b, d), "--html", w / "b.json"],
                     lambda w, b, d: w / "b.json", "--html")),
    _outputs("verify-junit-is-baseline-golden",
             _verify(lambda w, b, d: ["--baseline", _baseline_file(w, b, d), "--junit", w / "b.npz"],
                     lambda w, b, d: w / "b.npz", "--junit")),
    _outputs("verify-junit-equals-markdown",
             _verify(lambda w, b, d: ["--junit", w / "r.txt", "--markdown", w / "r.txt"],
                     lambda w, b, d: w / "r.txt", "--junit")),
    _outputs("verify-junit-under-a-file",
             _verify(lambda w, b, d: ["--junit", d / "edgemm.xml"], lambda w, b, d: d / "edgemm.xml", "--junit")),
    _outputs("build-timing-cache-is-bundle-model",
             lambda g, w, b, d: (["build", b, "--timing-cache", b / "model.onnx"], b / "model.onnx",
                                 "--timing-cache")),
    _outputs("verify-save-baseline-is-folder",
             _verify(lambda w, b, d: ["--save-baseline", b], lambda w, b, d: b, "--save-baseline")),
]


# ---------------------------------------- resource bombs and wrong verdicts (issue 14, classes 6 and 7)

def _pt2_bomb(name: str, expr: str):
    """A .pt2 whose first symbolic size is an expression that is plain arithmetic but a bomb to evaluate."""
    def build(good, work):
        model = work / "model.pt2"

        def edit(doc):
            values = doc["graph_module"]["graph"]["tensor_values"]
            first_input = next(v for v in values.values() if v["sizes"] and "as_expr" in v["sizes"][0])
            first_input["sizes"][0] = {"as_expr": {"expr_str": expr, "hint": {"as_int": 2}}}
        _pt2_json(good, model, edit)
        return compile_case(f"pt2-bomb-{name}", work, model, file=model, field=None,
                            expect="SecurityError: evaluating the expression would hang or exhaust memory")
    return Spec(f"pt2-bomb-{name}", build, "bombs")


def _forged_npy(declared_shape: tuple, held: int, dtype=np.float32) -> bytes:
    """An .npy member whose header declares ``declared_shape`` but which holds ``held`` bytes of data."""
    import io

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": np.dtype(dtype).str, "fortran_order": False,
                                                  "shape": declared_shape})
    return header.getvalue() + bytes(held)


def _npz_with(path: Path, arrays: dict, forged: dict[str, bytes], compress=zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(path, "w", compress) as zf:
        for key, value in arrays.items():
            buf = __import__("io").BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(value))
            zf.writestr(f"{key}.npy", buf.getvalue())
        for key, raw in forged.items():
            zf.writestr(f"{key}.npy", raw)
    return path


def _calib_forged_header(good, work):
    d = good_feeds(good)
    d.pop("image")
    return _npz_with(work / "calib.npz", d, {"image": _forged_npy((600_000_000,), 4096)}), "image"


def _calib_forged_sizes(good, work):
    """A deflated member whose zip header claims far more than deflate can produce from its bytes."""
    path = _npz_with(work / "calib.npz", good_feeds(good), {}, compress=zipfile.ZIP_DEFLATED)
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("image.npy")
    for offset in (info.header_offset + 22,):  # local header: uncompressed size
        data[offset:offset + 4] = struct.pack("<I", 0xFFFFFFF0)
    pos = 0
    while (pos := data.find(b"PK\x01\x02", pos)) != -1:  # central directory entries: uncompressed size at +24
        name_len = struct.unpack("<H", data[pos + 28:pos + 30])[0]
        if data[pos + 46:pos + 46 + name_len] == b"image.npy":
            data[pos + 24:pos + 28] = struct.pack("<I", 0xFFFFFFF0)
        pos += 4
    path.write_bytes(bytes(data))
    return path, "image"


def _calib_token_id(value: int, *, key: str = "input_ids"):
    def make(good, work):
        d = good_feeds(good, 8)
        d[key] = d[key].copy()
        d[key][3, 2] = value
        return save_npz(work / "calib.npz", d), key
    return make


def _run_forged_header(good, work):
    bundle = copy_bundle(good, work)
    d = good_feeds(good)
    d.pop("image")
    data = _npz_with(work / "data.npz", d, {"image": _forged_npy((1 << 40,), 64)})
    return run_case("run-forged-npy-header", work, bundle, data, file=data, field="image",
                    expect="InputError: declared size checked against what the file holds, before reading")


def _target_toml(name: str, make_text: Callable[[str], str], field: str | None):
    def build(good, work):
        from edgemm.targets import _profiles_dir

        shipped = _profiles_dir().joinpath("jetson-orin-nano.toml").read_text(encoding="utf-8")
        target = work / "target.toml"
        target.write_text(make_text(shipped), encoding="utf-8")
        return compile_case(f"target-{name}", work, good.onnx, file=target, field=field,
                            extra=("--target", str(target)), expect="InputError")
    return Spec(f"target-{name}", build, "bombs")


def _baseline_doc(good: Good) -> dict:
    """A well-formed baseline for the good bundle (what --save-baseline writes), to be broken field by field."""
    manifest = json.loads((good.bundle / "manifest.json").read_text())
    return {"format": "edgemm-baseline", "format_version": 1, "created": "2026-01-01T00:00:00+00:00",
            "context": {"backend": manifest["backend"]["name"], "target": manifest["target"]["name"],
                        "precision": manifest["precision"]["mode"], "bundle": {}, "host": {}},
            "data": {"path": "data.npz", "sha256": None, "samples": 4, "batch_size": 16},
            "outputs": {o["name"]: {"dtype": "<f4", "batch_shapes": [[4, 5]], "sha256": "0" * 64,
                                    "stats": {"mean": 0.0, "std": 1.0, "abs_max": 1.0}, "golden_dtype": None,
                                    "golden_error": 0.0} for o in manifest["outputs"]},
            "golden": {"mode": "none", "sha256": None},
            "task": None,
            "latency": {"anchor": {"name": "ort-gemv-tanh-8-v1", "width": 64}, "percentile": 10, "ratio": 1.0,
                        "bundle_p10_ms": 1.0},
            "reference_parity": {}}


def _baseline(name: str, edit: Callable[[dict], None], field: str | None, *, raw: Callable[[str], str] | None = None):
    """verify --baseline b.json, where b.json is a baseline broken by ``edit`` (or its text by ``raw``)."""
    def build(good, work):
        bundle = copy_bundle(good, work)
        data = save_npz(work / "data.npz", good_feeds(good))
        doc = _baseline_doc(good)
        edit(doc)
        text = json.dumps(doc, indent=2)
        baseline = work / "b.json"
        baseline.write_text(raw(text) if raw else text)
        return Case(f"baseline-{name}", ["verify", str(bundle), "--data", str(data), "--baseline", str(baseline),
                                         "--no-write"], str(baseline), field, work, expect="InputError")
    return Spec(f"baseline-{name}", build, "verdicts")


def _set(path: str, value):
    def edit(doc):
        *parents, last = path.split(".")
        node = doc
        for key in parents:
            node = node[key] if not isinstance(node, list) else node[int(key)]
        node[last] = value
    return edit


def _manifest_section(name: str, edit: Callable[[dict], None], field: str):
    def tamper(b, good, work):
        edit_manifest(b, edit)
        return str(b / "manifest.json"), field
    return _bundle(name, tamper, "BundleError: the section is checked in depth, naming the field")


_BRANCH = {"params_before": 10, "params_after": 5, "flops_before": 10, "flops_after": 5, "ms_before": 1.0,
           "ms_after": 0.5}

DATA_SPECS = [
    _pt2_bomb("power-chain", "Integer(10)**Integer(10)**Integer(8)"),
    _pt2_bomb("pow-huge-exponent", "Pow(Integer(10), Integer(100000000000))"),
    _pt2_bomb("nested-pow", "Pow(Pow(Pow(Pow(Integer(10), Integer(64)), Integer(64)), Integer(64)), Integer(64))"),
    _pt2_bomb("string-repeat", "Add(Symbol('s0', integer=True), 'a'*10000000000)"),
    _pt2_bomb("factorial", "factorial(Integer(100000000))"),
    _pt2_bomb("left-shift", "Integer(1) << Integer(100000000000)"),
    _pt2_bomb("huge-integer", "Integer(" + "9" * 4000 + ")"),
    _calib("forged-npy-header-2gb", _calib_forged_header),
    _calib("forged-zip-sizes", _calib_forged_sizes),
    Spec("run-forged-npy-header", _run_forged_header, "bombs"),
    _target_toml("nested-100k-deep", lambda t: t + "\nx = " + "[" * 100_000 + "]" * 100_000 + "\n", None),
    _target_toml("5000-digit-integer", lambda t: re.sub(r"memory_mb = \d+", "memory_mb = " + "9" * 5000, t), None),
    _target_toml("huge-workspace", lambda t: re.sub(r"workspace_mb = \d+", "workspace_mb = 99999999999999", t),
                 "workspace_mb"),
    _baseline("anchor-width-huge", _set("latency.anchor.width", 10 ** 9), "latency.anchor.width"),
    _baseline("task-value-nan", _set("task", {"metric": "top1", "outputs": ["logits"], "value": 0.0}), None,
              raw=lambda t: t.replace('"value": 0.0', '"value": NaN')),
    _baseline("ratio-infinity", lambda d: None, None, raw=lambda t: t.replace('"ratio": 1.0', '"ratio": Infinity')),
    _baseline("batch-size-string", _set("data.batch_size", "16"), "data.batch_size"),
    _baseline("output-entry-not-object", _set("outputs.logits", ["not", "an", "entry"]), "outputs.logits"),
    _baseline("batch-shapes-nested", _set("outputs.logits.batch_shapes", [[[4], 5]]), "outputs.logits.batch_shapes"),
    _baseline("golden-mode-unknown", _set("golden.mode", "bfloat8"), "golden.mode"),
    _baseline("task-outputs-not-list", _set("task", {"metric": "top1", "outputs": "logits", "value": 1.0}),
              "task.outputs"),
    _baseline("stats-string", _set("outputs.logits.stats", {"abs_max": "1e999"}), "outputs.logits.stats.abs_max"),
    _manifest_section("task-names-no-output", _set("task", {"metric": "top1", "outputs": ["nope"]}), "task.outputs"),
    _manifest_section("task-not-object", _set("task", "top1"), "task"),
    _manifest_section("prune-params-string",
                      _set("prune", {"comparison": {"branches": {"text": dict(_BRANCH, params_before="x")}}}),
                      "prune.comparison.branches.text.params_before"),
    _manifest_section("prune-task-drop-nan",
                      _set("prune", {"comparison": {"task": {"metric": "top1", "samples": 4, "before": 1.0,
                                                             "after": 1.0, "drop": float("nan")}}}),
                      "prune.comparison.task.drop"),
    _calib("token-id-beyond-vocab", _calib_token_id(50)),
    _calib("token-id-far-beyond-vocab-torchscript", _calib_token_id(10 ** 9), model="pt"),
    _calib("token-id-negative", _calib_token_id(-3)),
    _calib("eval-token-id-beyond-vocab", _calib_token_id(1000), flag="--eval"),
]


# ------------------------------------------------------------------------------------------ corpus

SPECS: list[Spec] = [
    Spec("pickle-reduce-raw", _pickle_raw, "model"),
    Spec("pickle-reduce-torch-save", _pickle_torch_save, "model"),
    Spec("pickle-reduce-legacy-format", _pickle_legacy, "model"),
    Spec("pickle-reduce-protocol-0", _pickle_protocol0, "model"),
    Spec("torchscript-data-pkl-reduce", _torchscript_evil_pickle, "model"),
    Spec("pt2-pickled-sample-inputs", _pt2_sample_inputs, "model"),
    Spec("pt2-pickled-weight", _pt2_pickled_weight, "model"),
    Spec("pt2-sympy-expression-eval", _pt2_expr_eval, "model"),
    Spec("pt2-node-calls-os-system", _pt2_node_target, "model"),
    *[_truncated(fmt, f) for fmt in ("pt", "pt2", "onnx") for f in (0.0, 0.01, 0.33, 0.66, 0.99)],
    _flipped("pt", "/data.pkl"), _flipped("pt", "/data/0"), _flipped("pt", ".py"),
    _flipped("pt2", "models/model.json"), _flipped("pt2", "weights/weight_0"),
    _flipped("pt2", "sample_inputs/model.pt"),
    Spec("onnx-unknown-op", _onnx_unknown_op, "model"),
    Spec("onnx-garbage-header", _onnx_garbage_header, "model"),
    *[_onnx_external(k) for k in ("dotdot", "absolute", "symlink", "missing")],
    Spec("model-is-a-folder", _model_is_folder, "model"),
    _calib("nan", _poison(np.nan)),
    _calib("inf", _poison(np.inf)),
    _calib("empty", _calib_empty),
    _calib("zero-samples", _calib_zero_samples),
    _calib("mismatched-sample-counts", _calib_counts),
    _calib("wrong-key", _calib_wrong_key),
    _calib("wrong-dtype", _calib_wrong_dtype),
    _calib("wrong-shape", _calib_wrong_shape),
    _calib("wrong-key-torchscript", _calib_wrong_key, model="pt"),
    _calib("object-array", _calib_object),
    _calib("truncated", _calib_truncated),
    _calib("pickle-not-npz", _calib_not_npz),
    _calib("member-not-npy", _calib_member_not_npy),
    _calib("scalars", _calib_scalar),
    _calib("eval-labels-count", _eval_labels, flag="--eval"),
    _bundle("flipped-byte-in-model", _t_flip_model, "BundleError: sha256 mismatch"),
    _bundle("manifest-edited-dtype", _t_manifest_dtype, "BundleError: manifest disagrees with the model"),
    _bundle("manifest-edited-shape", _t_manifest_shape, "BundleError: manifest disagrees with the model"),
    _bundle("manifest-edited-input-name", _t_manifest_input_name, "BundleError: manifest disagrees with the model"),
    _bundle("manifest-edited-hash", _t_manifest_hash, "BundleError: sha256 mismatch"),
    _bundle("manifest-truncated", _t_manifest_truncated, "BundleError: invalid JSON"),
    _bundle("manifest-missing-key", _t_manifest_missing_key, "BundleError"),
    _bundle("manifest-files-not-a-map", _t_manifest_files_type, "BundleError"),
    _bundle("manifest-ranges-not-a-map", _t_manifest_ranges_type, "BundleError"),
    _bundle("manifest-deeply-nested", _t_manifest_deep, "BundleError: cannot be parsed"),
    _bundle("manifest-huge-integer", _t_manifest_huge_int, "BundleError: cannot be parsed"),
    _bundle("extra-file", _t_extra_file, "BundleError: unexpected file"),
    _bundle("missing-file", _t_missing_file, "BundleError: listed file missing"),
    _bundle("path-escape-dotdot", _t_escape(lambda p: "../outside.onnx"), "BundleError: escapes"),
    _bundle("path-escape-absolute", _t_escape(lambda p: str(p)), "BundleError: escapes"),
    _bundle("path-escape-symlink", _t_symlink, "BundleError: symbolic link"),
    _bundle("backend-model-escape", _t_backend_model_escape, "BundleError: escapes"),
    _bundle("future-format-version", _t_future_format, "BundleError: format_version"),
    _bundle("foreign-format", _t_foreign_format, "BundleError: format"),
    _bundle("unknown-backend", _t_unknown_backend, "BundleError: unknown backend"),
    _bundle("tensorrt-without-engine", _t_tensorrt_no_engine, "BundleError: portable bundle, no engine"),
    _bundle("tensorrt-engine-for-other-version", _t_tensorrt_foreign_engine,
            "DependencyError (no TensorRT here) or BundleError (version mismatch)"),
    _bundle("future-opset", _t_future_opset, "BundleError: ONNX Runtime cannot load it"),
    _bundle("not-a-folder", _t_not_a_folder, "BundleError: not a bundle directory"),
    *[_bundle(f"external-data-in-{name}", _t_external(loc), "BundleError: reads a file the manifest does not hash")
      for name, loc in (("report-json", "report.json"), ("report-md", "report.md"), ("manifest", "manifest.json"),
                        ("parent-folder", "../weights.bin"), ("absolute-path", "ABSOLUTE"))],
    _run_data("wrong-input-name", _d_wrong_name),
    _run_data("wrong-dtype", _d_wrong_dtype),
    _run_data("wrong-shape", _d_wrong_shape),
    _run_data("wrong-rank", _d_wrong_rank),
    _run_data("nan", _d_nan),
    _run_data("batch-mismatch", _d_batch_mismatch),
    *OUTPUT_SPECS,
    *DATA_SPECS,
]

assert len({s.name for s in SPECS}) == len(SPECS), "case names must be unique"


def build_case(spec: Spec, good: Good, root: Path) -> Case:
    work = root / spec.name
    work.mkdir(parents=True)
    case = spec.build(good, work)
    assert case.name == spec.name, (case.name, spec.name)
    return case


def make_good(folder: Path) -> Good:
    """The tiny 2-input test model (TorchScript, .pt2, ONNX), its calibration data and an FP32 bundle."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from edgemm.pipeline import compile_model
    from edgemm.config import CompileConfig
    from tests.fixtures.tiny_models import save_all

    paths = save_all(folder / "tiny")
    bundle = folder / "bundle"
    compile_model(CompileConfig(model=str(paths["torchscript"]), output=str(bundle), calib=str(paths["calib"])),
                  say=lambda m: None)
    return good_from(paths, bundle, folder)


def good_from(paths: dict, bundle: Path, folder: Path) -> Good:
    """``paths`` as written by tests.fixtures.tiny_models.save_all; the ONNX file is the bundle's FP32
    model, copied into ``folder``."""
    onnx_path = Path(folder) / "tiny.onnx"
    if not onnx_path.exists():
        shutil.copyfile(Path(bundle) / "model.onnx", onnx_path)
    return Good(Path(paths["torchscript"]), Path(paths["pt2"]), onnx_path, Path(paths["calib"]), Path(bundle))


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[-1].strip())
        return 2
    root = Path(argv[0])
    root.mkdir(parents=True, exist_ok=False)
    good = make_good(root / "good")
    for spec in SPECS:
        case = build_case(spec, good, root / "cases")
        print(f"{case.name:40s} edgemm {' '.join(case.argv)}")
    print(f"{len(SPECS)} cases in {root / 'cases'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
