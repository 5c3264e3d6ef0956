"""`edgemm build BUNDLE --refit NEW.onnx`: swap the weights of a refittable engine without rebuilding.

The engine (built with ``refittable``: BuilderFlag.REFIT / trtexec --refit) is deserialized from its
hash-verified bytes, refitted from the new ONNX file with trt.Refitter + trt.OnnxParserRefitter, and
serialized again (NVIDIA/TensorRT samples/python/sample_weight_stripping/refit_engine_and_infer.py uses
the same three calls). The new ONNX must be the same network (same layers, names and precision
markings: Q/DQ scales are weights too); TensorRT refuses anything else. Engine, ONNX and manifest are
each written atomically, the manifest last."""

from __future__ import annotations

import hashlib
from pathlib import Path

from ...errors import BundleError, EdgemmError, InputError
from .options import TensorRTOptions
from .package import _bundle_paths, _manifest_io

__all__ = ["refit_bundle"]


def refit_bundle(bundle_dir: Path, new_onnx: Path, *, trusted_keys=None, require_signature: bool | None = None) -> dict:
    from ...runtime.atomic import write_bytes_atomic
    from ...runtime.signing import verify_before_use
    from ...runtime.tensorrt_session import _Capture, import_tensorrt, select_device

    bundle_dir, new_onnx = Path(bundle_dir), Path(new_onnx)
    manifest_name, _load, _sha, write_json_atomic = _manifest_io()
    manifest, _ = verify_before_use(bundle_dir, trusted_keys, require_signature)
    source = str(bundle_dir / manifest_name)
    backend = manifest.backend
    if backend.name != "tensorrt" or not backend.engine:
        raise BundleError(f"bundle {bundle_dir} has no TensorRT engine to refit", file=source, field="backend.engine",
                          fix=f"build it first with `edgemm build {bundle_dir}`")
    options = TensorRTOptions.from_dict(backend.options or {}, source=source)
    if not options.refittable:
        raise BundleError("the engine was not built refittable", file=source, field="backend.options.refittable",
                          fix="recompile with refittable=True, or rebuild with the new weights")
    if not new_onnx.is_file():
        raise InputError("no such ONNX file", file=new_onnx, field="--refit", fix="pass the re-exported model")
    onnx_rel, onnx_path, engine_rel, engine_path, _script = _bundle_paths(bundle_dir, manifest, source)
    data = engine_path.read_bytes()
    if hashlib.sha256(data).hexdigest() != manifest.files.get(engine_rel):
        raise BundleError(f"engine {engine_rel!r} does not match its sha256 in the manifest", file=engine_path,
                          fix="recopy the bundle, or rebuild it with `edgemm build`")
    trt = import_tensorrt()
    built = dict(backend.built or {})
    if str(built.get("tensorrt_version")) != trt.__version__:
        raise BundleError(f"engine was built with TensorRT {built.get('tensorrt_version')}, this machine has "
                          f"{trt.__version__}", file=source, field="backend.built.tensorrt_version",
                          fix=f"rebuild with the new weights: `edgemm build {bundle_dir}`")
    select_device(0)
    log = _Capture(trt)
    runtime = trt.Runtime(log.logger)
    runtime.engine_host_code_allowed = False
    engine = runtime.deserialize_cuda_engine(data)
    if engine is None:
        raise BundleError(f"TensorRT could not deserialize the engine: {log.last_error}", file=engine_path,
                          fix=f"rebuild it with `edgemm build {bundle_dir}`")
    refitter = trt.Refitter(engine, log.logger)
    parser = trt.OnnxParserRefitter(refitter, log.logger)
    if not parser.refit_from_file(str(new_onnx)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(getattr(parser, "num_errors", 0))) or log.last_error
        raise InputError(f"TensorRT cannot take weights from this model: {errors}", file=new_onnx, field="--refit",
                         fix="export the same network (same layers and precision) with the new weights")
    if not refitter.refit_cuda_engine():
        missing = list(refitter.get_missing_weights() or [])[:5]
        raise EdgemmError(f"TensorRT could not refit the engine: {log.last_error}"
                          + (f" (missing weights: {', '.join(map(str, missing))})" if missing else ""),
                          file=new_onnx, fix="export the same network with the new weights")
    view = memoryview(engine.serialize())   # IHostMemory, written as is
    onnx_bytes = new_onnx.read_bytes()
    write_bytes_atomic(engine_path, view, fsync=True)
    write_bytes_atomic(onnx_path, onnx_bytes, fsync=True)   # a later rebuild uses the new weights too
    document = manifest.to_dict()   # the manifest as read (its version and unknown sections kept)
    document["files"][engine_rel] = hashlib.sha256(view).hexdigest()
    document["files"][onnx_rel] = hashlib.sha256(onnx_bytes).hexdigest()
    built["refitted_from_sha256"] = document["files"][onnx_rel]
    document["backend"]["built"] = built
    write_json_atomic(bundle_dir / manifest_name, document)
    return built
