"""Property-based fuzzing (hypothesis) of the two parsers every untrusted input goes through: the bundle
manifest (edgemm.runtime.load) and calibration/evaluation data (edgemm.data.load_dataset). Whatever the
input, they either succeed with a consistent result or raise an EdgemmError; nothing else escapes."""

from __future__ import annotations

import copy
import hashlib
import io
import itertools
import json
import shutil

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from edgemm import runtime
from edgemm.data import load_dataset
from edgemm.errors import EdgemmError
from edgemm.iospec import TensorSpec
from tests.fixtures.tiny_models import make_data
from tests.hypothesis_profiles import examples

# Derandomized in CI, random and larger with EDGEMM_HYPOTHESIS=explore: tests/hypothesis_profiles.py.
FUZZ = settings(max_examples=examples(150))
_counter = itertools.count()

json_scalars = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | st.text(max_size=12)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)


# The draws index into the manifest's layout, so it must be the same on every run and host for derandomized
# runs to draw the same examples: the bundle is compiled here without thread tuning (a timing that adds
# keys and notes) and records a fixed host (the ISA list differs between machines).
FIXED_HOST = {"cpu": {"machine": "x86_64", "model": "AMD EPYC", "isa": ["avx512_vnni", "avx2", "fma"],
                      "int8_isa": ["avx2", "avx512_vnni"], "vnni": True, "bf16": False, "amx": False}}


@pytest.fixture(scope="module")
def fuzz_bundles(tiny, tmp_path_factory):
    """Two valid bundles to mutate: the ONNX Runtime one, and the same made into a TensorRT bundle with
    a (hash-consistent, fake) engine, whose checks run before TensorRT is imported."""
    from edgemm.config import CompileConfig
    from edgemm.pipeline import compile_model

    root = tmp_path_factory.mktemp("fuzz")
    ort_dir, trt_dir = root / "ort", root / "trt"
    compile_model(CompileConfig(model=str(tiny["torchscript"]), output=str(ort_dir), calib=str(tiny["calib"]),
                                tune_threads=False), say=lambda m: None)
    manifest = json.loads((ort_dir / "manifest.json").read_text())
    manifest.update(host=FIXED_HOST, created="2026-01-01T00:00:00+00:00")
    (ort_dir / "manifest.json").write_text(json.dumps(manifest))
    shutil.copytree(ort_dir, trt_dir)
    engine = b"not really an engine"
    (trt_dir / "model.engine").write_bytes(engine)
    trt = json.loads((ort_dir / "manifest.json").read_text())
    trt["backend"] = {"name": "tensorrt", "onnx": "model.onnx", "engine": "model.engine",
                      "built": {"tensorrt_version": "10.3.0", "compute_capability": "8.7"}, "options": {}}
    trt["files"]["model.engine"] = hashlib.sha256(engine).hexdigest()
    return {"onnxruntime": (ort_dir, json.loads((ort_dir / "manifest.json").read_text())),
            "tensorrt": (trt_dir, trt)}


@pytest.fixture(scope="module")
def fuzz_bundle(fuzz_bundles):
    return fuzz_bundles["onnxruntime"][0]


READ_SECTIONS = ("format", "format_version", "inputs", "outputs", "backend", "files")


def _paths(value, prefix=()):
    """Every path (tuple of keys/indices) inside a JSON value."""
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, prefix + (i,))


def _load_and_run(bundle_dir):
    try:
        bundle = runtime.load(bundle_dir)
    except EdgemmError:
        return
    try:
        bundle.run(make_data(2, seed=1))
    except EdgemmError:
        pass


@pytest.mark.parametrize("backend", ["onnxruntime", "tensorrt"])
@settings(FUZZ, max_examples=examples(300))
@given(data=st.data())
def test_mutated_manifests(fuzz_bundles, backend, data):
    """Replace or delete any value of a valid manifest (hashes stay valid: the model is untouched)."""
    bundle_dir, manifest = fuzz_bundles[backend]
    mutated = copy.deepcopy(manifest)
    for _ in range(data.draw(st.integers(1, 3))):
        paths = [p for p in _paths(mutated) if p]
        # Most draws go to what the runtime acts on, each section equally likely however large it is.
        sections = sorted({p[0] for p in paths if p[0] in READ_SECTIONS})
        if sections and data.draw(st.integers(0, 3)):
            section = data.draw(st.sampled_from(sections))
            paths = [p for p in paths if p[0] == section]
        path = data.draw(st.sampled_from(paths))
        parent = mutated
        for key in path[:-1]:
            parent = parent[key]
        if data.draw(st.booleans()) and isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent[path[-1]] = data.draw(json_values)
    (bundle_dir / "manifest.json").write_text(json.dumps(mutated))
    _load_and_run(bundle_dir)


@FUZZ
@given(value=json_values)
def test_arbitrary_json_manifests(fuzz_bundle, value):
    (fuzz_bundle / "manifest.json").write_text(json.dumps(value))
    with pytest.raises(EdgemmError):
        runtime.load(fuzz_bundle)


@FUZZ
@given(raw=st.binary(max_size=300) | st.text(max_size=300).map(lambda t: t.encode("utf-8", "surrogatepass")))
def test_arbitrary_bytes_manifests(fuzz_bundle, raw):
    (fuzz_bundle / "manifest.json").write_bytes(raw)
    with pytest.raises(EdgemmError):
        runtime.load(fuzz_bundle)


DTYPES = ["float32", "float16", "float64", "int64", "int32", "int8", "uint8", "uint16", "bool", "complex64",
          "<U3", "|S2", "datetime64[s]"]
SPECS = [TensorSpec("image", "float32", ("batch", 3, 16, 16)), TensorSpec("input_ids", "int64", ("batch", 8))]


def _arrays(draw_dtype):
    return hnp.arrays(dtype=draw_dtype, shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=4))


npz_contents = st.dictionaries(
    st.sampled_from(["image", "input_ids", "labels", "text", "a/b", "x" * 40]) | st.text(min_size=1, max_size=6),
    st.sampled_from(DTYPES).flatmap(lambda d: _arrays(np.dtype(d))), max_size=4)


def _check_consistent(ds, specs):
    counts = {v.shape[0] for v in ds.arrays.values()}
    assert len(counts) == 1 and counts.pop() >= 1
    for value in ds.arrays.values():
        assert value.dtype.kind in "fiub"
        if value.dtype.kind == "f":
            assert np.isfinite(value).all()
    if specs is not None:
        assert sorted(ds.arrays) == sorted(s.name for s in specs)


@FUZZ
@given(contents=npz_contents, with_specs=st.booleans())
def test_fuzzed_npz_contents(tmp_path_factory, contents, with_specs):
    path = tmp_path_factory.getbasetemp() / f"fuzz-{next(_counter)}.npz"
    with open(path, "wb") as f:
        np.savez(f, **contents)    # object arrays get pickled: load_dataset must refuse those
    specs = SPECS if with_specs else None
    try:
        ds = load_dataset(path, specs=specs)
    except EdgemmError:
        return
    _check_consistent(ds, specs)


@FUZZ
@given(first=npz_contents, second=npz_contents)
def test_fuzzed_npz_folders(tmp_path_factory, first, second):
    folder = tmp_path_factory.getbasetemp() / f"fuzz-dir-{next(_counter)}"
    folder.mkdir()
    for name, contents in (("a.npz", first), ("b.npz", second)):
        with open(folder / name, "wb") as f:
            np.savez(f, **contents)
    try:
        ds = load_dataset(folder)
    except EdgemmError:
        return
    _check_consistent(ds, None)


@pytest.fixture(scope="module")
def npz_bytes(tiny):
    """The calibration file as written by numpy.savez (stored) and numpy.savez_compressed (deflated)."""
    buffer = io.BytesIO()
    with np.load(tiny["calib"]) as npz:
        np.savez_compressed(buffer, **{k: npz[k][:8] for k in npz.files})
    return {"stored": tiny["calib"].read_bytes(), "compressed": buffer.getvalue()}


@FUZZ
@given(edits=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=6),
       cut=st.none() | st.floats(0, 1), kind=st.sampled_from(["stored", "compressed"]))
def test_fuzzed_npz_bytes(npz_bytes, tmp_path_factory, edits, cut, kind):
    data = bytearray(npz_bytes[kind])
    for where, value in edits:
        data[int(where * len(data))] = value
    if cut is not None:
        data = data[:int(cut * len(data))]
    path = tmp_path_factory.getbasetemp() / f"fuzz-bytes-{next(_counter)}.npz"
    path.write_bytes(bytes(data))
    try:
        ds = load_dataset(path)
    except EdgemmError:
        return
    _check_consistent(ds, None)
