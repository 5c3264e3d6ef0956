"""ONNX Runtime backend session (CPU by default)."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path, PurePosixPath

import numpy as np

from ..errors import BundleError, DependencyError, InputError
from .manifest import MANIFEST_NAME, Manifest, safe_relpath

# ONNX Runtime's type strings -> the numpy dtype names manifests use
_ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
               "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int8)": "int8", "tensor(uint8)": "uint8",
               "tensor(bool)": "bool"}


# ORT session option: the folder external-data locations of a model loaded from bytes are relative to.
# Added by onnxruntime PR #23557 (1.21); older versions ignore the key and resolve against the CWD.
EXTERNAL_DATA_FOLDER_KEY = "session.model_external_initializers_file_folder_path"
EXTERNAL_DATA_FOLDER_MIN_ORT = (1, 21)


def _check_external_data_support(ort_version: str, model_bytes: bytes, model_path: Path) -> None:
    """On an onnxruntime too old to honour EXTERNAL_DATA_FOLDER_KEY, refuse models that may reference
    external data. Every external-data reference carries the key string "location" in the protobuf
    (a string field cannot be split), so its absence proves there is none; its presence (rarely, a
    tensor name) is refused rather than risk ORT reading a file outside the bundle."""
    version = tuple(int("".join(c for c in part if c.isdigit()) or 0) for part in ort_version.split(".")[:2])
    if version < EXTERNAL_DATA_FOLDER_MIN_ORT and b"location" in model_bytes:
        need = ".".join(map(str, EXTERNAL_DATA_FOLDER_MIN_ORT))
        raise BundleError(f"the model may use ONNX external data, which onnxruntime {ort_version} would look for "
                          f"outside the bundle", file=model_path, field="backend.model",
                          fix=f"upgrade onnxruntime to {need} or newer")


def _read_verified(bundle_dir: Path, manifest: Manifest, model_rel: str, model_path: Path,
                   field: str = "backend.model") -> bytes:
    """A bundle file's bytes, checked against the manifest's sha256 (load() verified the files already,
    but a file could have been swapped since: hash exactly what ONNX Runtime will parse)."""
    what = "model" if field == "backend.model" else "file"
    digest = manifest.files.get(model_rel)
    if not isinstance(digest, str):
        raise BundleError(f"{what} {model_rel!r} has no sha256 in the manifest", file=bundle_dir / MANIFEST_NAME,
                          field=field, fix="recompile the bundle")
    try:
        data = model_path.read_bytes()
    except OSError as exc:
        raise BundleError(f"{what} {model_rel!r} cannot be read ({exc.strerror or exc})", file=model_path,
                          field=field, fix="check the file's permissions, or recopy the bundle") from exc
    if hashlib.sha256(data).hexdigest() != digest:
        raise BundleError(f"{model_rel!r} does not match its sha256 in the manifest (modified or corrupted)",
                          file=model_path, field=f"files.{model_rel}", fix="recopy or recompile the bundle")
    return data


def _external_data_in_memory(bundle_dir: Path, manifest: Manifest, model_rel: str, model_bytes: bytes,
                             source: Path) -> dict[str, bytes]:
    """The only external data ONNX Runtime may use: the bundle's other hashed files beside (or below)
    the model, each read once and checked against its sha256, keyed by the location a model would
    name it by. ONNX Runtime gets these bytes from memory and never opens a bundle file itself, so an
    unhashed file (report.json, which verify rewrites) cannot be read, and a file swapped after the
    check cannot be used. A model with no external-data reference (the key "location" appears in the
    protobuf of every one) needs none of it."""
    if b"location" not in model_bytes:
        return {}
    model_dir = PurePosixPath(model_rel).parent
    files = {}
    for rel in manifest.files:
        pure = PurePosixPath(rel)
        if rel == model_rel or (model_dir.parts and pure.parts[:len(model_dir.parts)] != model_dir.parts):
            continue
        path = safe_relpath(bundle_dir, rel, source=str(source))
        files[pure.relative_to(model_dir).as_posix()] = _read_verified(bundle_dir, manifest, rel, path,
                                                                       field=f"files.{rel}")
    return files


class OrtSession:
    backend = "onnxruntime"

    def __init__(self, bundle_dir: Path, manifest: Manifest, *, providers: list[str] | None = None,
                 intra_op_threads: int = 0):
        try:
            import onnxruntime as ort
        except ImportError as exc:  # pragma: no cover - onnxruntime is a core dependency
            raise DependencyError("onnxruntime is not installed", fix="pip install onnxruntime") from exc
        source = bundle_dir / MANIFEST_NAME
        manifest = Manifest.of(manifest, source=source)
        model_rel = manifest.backend.model
        if not isinstance(model_rel, str):
            raise BundleError("missing model file name", file=source, field="backend.model",
                              fix="recompile the bundle")
        model_path = safe_relpath(bundle_dir, model_rel, source=str(source), field="backend.model")
        model_bytes = _read_verified(bundle_dir, manifest, model_rel, model_path)
        _check_external_data_support(ort.__version__, model_bytes, model_path)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # ORT logs failures to stderr itself (coloured, multi-line) before raising; edgemm reports the
        # raised error in its own one line, so ORT stays quiet unless edgemm runs verbose.
        opts.log_severity_level = 2 if logging.getLogger("edgemm").isEnabledFor(logging.INFO) else 4
        threads = intra_op_threads or _recorded_threads(manifest, bundle_dir)
        if threads:
            opts.intra_op_num_threads = threads
        # Idle worker threads would otherwise spin for a while after each call, stealing the cores from
        # whatever runs next (the app's own pre-processing, or the reference in a side-by-side timing).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # External data comes from memory only (checked bytes, see _external_data_in_memory). A model
        # handed over as bytes has no folder, so ORT would resolve any other location against the CWD:
        # point it under the model file itself, a regular file, where no path can lead to a file.
        external = _external_data_in_memory(bundle_dir, manifest, model_rel, model_bytes, source)
        if external:
            opts.add_external_initializers_from_files_in_memory(
                list(external), [memoryview(b) for b in external.values()], [len(b) for b in external.values()])
        opts.add_session_config_entry(EXTERNAL_DATA_FOLDER_KEY, str(Path(model_path).resolve()))
        try:
            # The very bytes that were hashed above (no window between check and use).
            self._session = ort.InferenceSession(model_bytes, opts,
                                                 providers=providers or ["CPUExecutionProvider"],
                                                 disabled_optimizers=_disabled_optimizers(manifest, bundle_dir))
        except Exception as exc:  # ORT raises bare RuntimeError-like types for invalid graphs
            text = str(exc).replace(str(Path(model_path).resolve()) + os.sep, "")
            if "external data" in text.lower():
                raise BundleError(f"the model reads external data that is not a hashed file of the bundle "
                                  f"({text})", file=model_path, field="backend.model",
                                  fix="a bundle's external data must be files listed (with their sha256) in "
                                      "its manifest; recompile the bundle") from exc
            raise BundleError(f"ONNX Runtime cannot load the model: {text}", file=model_path,
                              field="backend.model", fix="recompile the bundle, or upgrade onnxruntime") from exc
        self._output_names = manifest.output_names
        _check_io_matches(self._session, manifest, bundle_dir / MANIFEST_NAME)

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        # InferenceSession.run is documented thread-safe: one session serves all threads.
        try:
            return self._session.run(self._output_names, feeds)
        except Exception as exc:  # feeds passed the manifest's checks, but the graph refuses them
            raise InputError(f"ONNX Runtime failed on these inputs: {exc}", field="feeds",
                             fix="check the input shapes and values against `edgemm inspect BUNDLE`") from exc


def _check_io_matches(session, manifest: Manifest, source: Path) -> None:
    """The manifest is not hashed, so an edited one could describe other inputs than the model takes;
    check names, dtypes, ranks and static dims against the model itself."""
    model_inputs = {i.name: i for i in session.get_inputs()}
    listed = manifest.input_names
    if set(listed) != set(model_inputs):
        raise BundleError(f"the manifest lists inputs ({', '.join(listed)}) but the model takes "
                          f"({', '.join(model_inputs)})", file=source, field="inputs", fix="recompile the bundle")
    for i, d in enumerate(manifest.inputs):
        _check_tensor(d, model_inputs[d["name"]], source, f"inputs[{i}]")
    model_outputs = {o.name: o for o in session.get_outputs()}
    for i, d in enumerate(manifest.outputs):
        if d["name"] not in model_outputs:
            raise BundleError(f"the model has no output {d['name']!r}", file=source, field=f"outputs[{i}]",
                              fix="recompile the bundle")
        _check_tensor(d, model_outputs[d["name"]], source, f"outputs[{i}]")


def _check_tensor(spec: dict, arg, source: Path, field: str) -> None:
    want = _ORT_DTYPES.get(arg.type)
    if want is not None and spec["dtype"] != want:
        raise BundleError(f"dtype {spec['dtype']} in the manifest but {want} in the model", file=source,
                          field=f"{field}.dtype", fix="recompile the bundle")
    shape = arg.shape
    if shape is None:
        return
    if len(shape) != len(spec["shape"]):
        raise BundleError(f"rank {len(spec['shape'])} in the manifest but {len(shape)} in the model", file=source,
                          field=f"{field}.shape", fix="recompile the bundle")
    for axis, (listed, actual) in enumerate(zip(spec["shape"], shape)):
        if isinstance(listed, int) and isinstance(actual, int) and listed != actual:
            raise BundleError(f"axis {axis} is {listed} in the manifest but {actual} in the model", file=source,
                              field=f"{field}.shape", fix="recompile the bundle")


def _recorded_threads(manifest: Manifest, bundle_dir: Path) -> int:
    """The thread count the compile measured as faster (0: ORT's default); the caller's choice wins."""
    value = manifest.backend.get("intra_op_threads", 0)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 1024:
        raise BundleError(f"must be an integer from 0 to 1024, not {value!r}", file=bundle_dir / MANIFEST_NAME,
                          field="backend.intra_op_threads", fix="recompile the bundle, or set it to 0")
    return value


def _disabled_optimizers(manifest: Manifest, bundle_dir: Path) -> list[str] | None:
    """Graph optimizers the compile measured as slower for this model (e.g. ORT 1.32's CPU
    SkipLayerNormFusion on INT8 encoders): the runtime must ship what was timed."""
    names = manifest.backend.disabled_optimizers   # a list on load (manifest.BACKEND_FIELD_TYPES)
    if names is None:
        return None
    if not all(isinstance(n, str) for n in names):
        raise BundleError("must be a list of optimizer names", file=bundle_dir / MANIFEST_NAME,
                          field="backend.disabled_optimizers", fix="recompile the bundle")
    return list(names) or None
