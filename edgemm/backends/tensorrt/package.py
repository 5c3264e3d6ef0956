"""Packaging a precision-marked ONNX model for a TensorRT target.

Every TensorRT bundle holds the portable set (model.onnx + build_config.json + build.sh), so it can be
rebuilt when the device's TensorRT changes. When TensorRT and a GPU of the target's compute capability
are present here, the engine (model.engine) is built at once; otherwise the bundle is *portable* and
``edgemm build BUNDLE`` finishes it on the device.
"""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from ...errors import BundleError, DependencyError, InputError
from .options import SAME_CC_MIN_TRT, TensorRTOptions
from .trtexec import build_script, trtexec_command

if TYPE_CHECKING:
    from ...runtime.manifest import BackendInfo, Manifest

__all__ = ["package", "finish_portable_bundle", "adopt_engine", "check_options_for_target", "ONNX_NAME", "ENGINE_NAME",
           "BUILD_CONFIG_NAME", "BUILD_SCRIPT_NAME"]

ONNX_NAME = "model.onnx"
ENGINE_NAME = "model.engine"
BUILD_CONFIG_NAME = "build_config.json"
BUILD_SCRIPT_NAME = "build.sh"
BUILD_CONFIG_FORMAT = "edgemm-tensorrt-build"


def check_options_for_target(target, options: TensorRTOptions) -> None:
    """Refuse options the target's hardware or TensorRT releases cannot honour (one-line InputError)."""
    if target.backend != "tensorrt":
        raise InputError(f"target {target.name} runs {target.backend}, not TensorRT", field="--target",
                         fix="package for a GPU target (edgemm targets)")
    target.validate(options.precision, dla=False if options.dla_core is None else options.dla_core,
                    sparsity="2:4" if options.sparse_weights else None)
    if options.hardware_compatibility != "none" and target.kind == "jetson":
        raise InputError(f"hardware-compatible engines are for discrete Ampere+ GPUs, not {target.name}",
                         field="hardware_compatibility", fix="use hardware_compatibility='none' on Jetson")
    if options.hardware_compatibility == "same_cc":
        old = [v for v in target.tensorrt_versions if tuple(map(int, v.split("."))) < SAME_CC_MIN_TRT]
        if old:
            need = ".".join(map(str, SAME_CC_MIN_TRT))
            raise InputError(f"target {target.name} ships TensorRT {', '.join(old)}, which has no same-compute-"
                             f"capability mode (needs >= {need})", field="hardware_compatibility",
                             fix="use 'none' or 'ampere_plus'")
    # DLA per TensorRT version (which versions have it, INT8 only on 11.4.1) is target.validate's job above.


def build_majors(target, options: TensorRTOptions) -> tuple[int, ...]:
    """The TensorRT majors build.sh gets a command for: all the target's, or for DLA only those whose
    listed version can build it (an AGX Orin DLA INT8 bundle builds on 11.4.1, never on JetPack 6's 10.3)."""
    if options.dla_core is None:
        return target.tensorrt_majors
    return tuple(sorted({int(v.split(".")[0]) for v in target.dla_versions(options.precision)}))


def _copy_onnx(src: Path, dst_dir: Path) -> list[str]:
    """Copy the ONNX file as model.onnx plus any external-data files it references (same relative paths)."""
    import onnx  # compile-side only

    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    model = onnx.load(str(src), load_external_data=False)
    tensors = list(model.graph.initializer) + [
        attr.t for node in model.graph.node for attr in node.attribute if attr.HasField("t")]
    locations = {ExternalDataInfo(t).location for t in tensors if uses_external_data(t)}
    copied = [ONNX_NAME]
    shutil.copyfile(src, dst_dir / ONNX_NAME)
    for loc in sorted(locations):
        rel = Path(loc)
        if rel.is_absolute() or ".." in rel.parts:
            raise InputError(f"external data location {loc!r} escapes the model folder", file=src,
                             fix="re-save the model with relative external data")
        (dst_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src.parent / rel, dst_dir / rel)
        copied.append(rel.as_posix())
    return copied


def _device_matches(target) -> dict | None:
    """The local GPU when TensorRT is importable and the GPU has the target's compute capability."""
    try:
        from ...runtime.tensorrt_session import cuda_device, import_tensorrt, version_tuple
        import_tensorrt()
        dev = cuda_device(0)
    except DependencyError:
        return None
    if version_tuple(dev["compute_capability"]) != version_tuple(target.compute_capability):
        return None
    return dev


def package(onnx_path: Path, stage_dir: Path, target, options: TensorRTOptions, *,
            build_now: bool | None = None, timing_cache: Path | None = None, bundle_name: str | None = None) -> dict:
    """Write the TensorRT part of a bundle into ``stage_dir``; return the manifest's ``backend`` section.

    ``build_now``: None builds the engine when TensorRT and a matching GPU are here; False never builds.
    ``bundle_name``: the manifest's name, which build.sh's header gives and its default engine path
    (./<bundle_name>.engine) uses; None makes build.sh read it from the bundle's manifest.json when run."""
    onnx_path, stage_dir = Path(onnx_path), Path(stage_dir)
    check_options_for_target(target, options)
    if not onnx_path.is_file():
        raise InputError("ONNX file not found", file=onnx_path)
    stage_dir.mkdir(parents=True, exist_ok=True)
    onnx_files = _copy_onnx(onnx_path, stage_dir)

    commands = {}
    for major in build_majors(target, options):
        # The name builder.timing_cache_path gives the Python builder: one cache per GPU and TensorRT version.
        cache = f"${{CACHE_DIR}}/cc{target.compute_capability}-trt${{VERSION}}.cache"
        commands[major] = trtexec_command(ONNX_NAME, "${OUT}", options, major, timing_cache=cache)
    config = {
        "format": BUILD_CONFIG_FORMAT,
        "format_version": 1,
        "onnx": ONNX_NAME,
        "onnx_files": onnx_files,
        "engine": ENGINE_NAME,
        "target": target.name,
        "compute_capability": target.compute_capability,
        "tensorrt_versions": list(target.tensorrt_versions),
        "options": options.to_dict(),
        "trtexec": {str(m): cmd for m, cmd in commands.items()},
    }
    _write_text(stage_dir / BUILD_CONFIG_NAME, json.dumps(config, indent=2) + "\n")
    script = build_script(commands, bundle_name=bundle_name, target_name=target.name, engine_name=ENGINE_NAME)
    _write_text(stage_dir / BUILD_SCRIPT_NAME, script, mode=0o755)

    backend = {
        "name": "tensorrt",
        "portable": True,
        "onnx": ONNX_NAME,
        "engine": None,
        "build_config": BUILD_CONFIG_NAME,
        "build_script": BUILD_SCRIPT_NAME,
        "tensorrt_versions": list(target.tensorrt_versions),
        "compute_capability": target.compute_capability,
        "options": options.to_dict(),
        "built": None,
    }
    if build_now is False:
        return backend
    dev = _device_matches(target)
    if dev is None:
        if build_now:
            raise DependencyError(f"cannot build the engine here: needs TensorRT and a GPU with compute capability "
                                  f"{target.compute_capability} ({target.name})",
                                  fix="compile without building and run `edgemm build` on the device")
        return backend
    from .builder import build_engine

    built = build_engine(stage_dir / ONNX_NAME, stage_dir / ENGINE_NAME, options, timing_cache=timing_cache)
    backend.update(portable=False, engine=ENGINE_NAME, built=built)
    return backend


def _write_text(path: Path, text: str, mode: int | None = None) -> None:
    from ...runtime.atomic import write_text_atomic

    write_text_atomic(path, text, mode=mode)


# -- edgemm build ------------------------------------------------------------------------------------

def _manifest_io():
    """The lead's manifest helpers (edgemm.runtime.manifest)."""
    from ...runtime.manifest import MANIFEST_NAME, load_manifest, sha256_file, write_json_atomic
    return MANIFEST_NAME, load_manifest, sha256_file, write_json_atomic


def _bundle_paths(bundle_dir: Path, manifest: Manifest, source: str) -> tuple[str, Path, str, Path, str | None]:
    """The ONNX file, the engine and the build script named by ``backend``, each checked to stay inside
    the bundle (no absolute path, no "..", no symbolic link): (onnx_rel, onnx_path, engine_rel,
    engine_path, build_script_rel or None when the bundle has no listed build script)."""
    from ...runtime.manifest import UNHASHED, safe_relpath

    backend = manifest.backend
    onnx_rel = backend.onnx or ONNX_NAME
    onnx_path = safe_relpath(bundle_dir, onnx_rel, source=source, field="backend.onnx")
    if onnx_rel not in manifest.files:
        raise BundleError(f"{onnx_rel!r} is not part of the bundle", file=source, field="backend.onnx",
                          fix="recompile the bundle for a TensorRT target")
    engine_rel = backend.engine or ENGINE_NAME
    engine_path = safe_relpath(bundle_dir, engine_rel, source=source, field="backend.engine")
    # The engine must not overwrite another file of the bundle (the ONNX model, the manifest, a report,
    # the build files); rebuilding replaces only the engine the manifest already records.
    protected = (set(manifest.files) - {backend.engine}) | set(UNHASHED) | {
        onnx_rel, backend.get("build_config") or BUILD_CONFIG_NAME, backend.build_script or BUILD_SCRIPT_NAME}
    if engine_rel in protected or engine_path.is_dir():
        raise BundleError(f"engine path {engine_rel!r} names another file of the bundle", file=source,
                          field="backend.engine", fix=f"set backend.engine to {ENGINE_NAME!r}, or recompile")
    if not engine_path.parent.is_dir():
        raise BundleError(f"engine path {engine_rel!r} is in a folder the bundle does not have", file=source,
                          field="backend.engine", fix=f"set backend.engine to {ENGINE_NAME!r}, or recompile")
    script_rel = backend.build_script
    if script_rel is not None:
        safe_relpath(bundle_dir, script_rel, source=source, field="backend.build_script")
        if script_rel not in manifest.files:
            raise BundleError(f"build script {script_rel!r} is not part of the bundle", file=source,
                              field="backend.build_script", fix="recompile the bundle for a TensorRT target")
    elif BUILD_SCRIPT_NAME in manifest.files:
        script_rel = BUILD_SCRIPT_NAME
    return onnx_rel, onnx_path, engine_rel, engine_path, script_rel


def _verified_tensorrt_bundle(bundle_dir: Path, trusted_keys, require_signature, *, what: str,
                              fix: str, split_ok: bool = False) -> tuple[Manifest, str, BackendInfo]:
    """The bundle's signature and files checked (as ``edgemm.runtime.load`` does) before anything reads
    it, and its backend section: (manifest, manifest path for errors, backend). A bundle for another
    backend is refused with ``what`` (why it cannot be used here) and ``fix``."""
    from ...runtime.signing import verify_before_use

    manifest, _ = verify_before_use(bundle_dir, trusted_keys, require_signature)
    source = str(bundle_dir / _manifest_io()[0])
    backend = manifest.backend
    if backend.name != "tensorrt":
        raise BundleError(f"bundle {bundle_dir} runs on {backend.name}, {what}", file=source,
                          field="backend.name", fix=fix)
    if manifest.sections.get("pipeline") is not None and not split_ok:
        # A split bundle has one engine per part: `edgemm build` builds and records them (split_build.py).
        raise BundleError(f"bundle {bundle_dir} is split into parts (one engine each); --from-engine and "
                          "--refit handle single-engine bundles", file=source, field="pipeline",
                          fix=f"run `edgemm build {bundle_dir}` on the device (it builds and records every "
                              "part's engine)")
    return manifest, source, backend


def finish_portable_bundle(bundle_dir: Path, *, timing_cache: Path | None = None, trusted_keys=None,
                           require_signature: bool | None = None) -> Path | list[Path]:
    """Build (or rebuild) the engine of a TensorRT bundle here; record it in the manifest. A split
    bundle gets one engine per part (split_build.py): the list of them, in run order.

    The bundle's signature (with ``trusted_keys``, as for ``edgemm.runtime.load``) and files are verified
    first; the engine goes to a temporary file, is renamed into place, then the manifest (backend.engine,
    backend.built, files) is rewritten atomically (so a signature no longer matches: re-sign after)."""
    bundle_dir = Path(bundle_dir)
    manifest_name, load_manifest, sha256_file, write_json_atomic = _manifest_io()
    manifest, source, backend = _verified_tensorrt_bundle(
        bundle_dir, trusted_keys, require_signature, what="there is no engine to build",
        fix="only TensorRT bundles need `edgemm build`", split_ok=True)
    if manifest.sections.get("pipeline") is not None:   # one engine per part (a list, in run order)
        from .split_build import finish_split_bundle

        return finish_split_bundle(bundle_dir, manifest, source, timing_cache=timing_cache)
    onnx_rel, onnx_path, engine_rel, engine_path, script_rel = _bundle_paths(bundle_dir, manifest, source)
    options = TensorRTOptions.from_dict(backend.options or {}, source=source)

    from ...runtime.tensorrt_session import cuda_device, import_tensorrt, version_tuple

    try:
        trt = import_tensorrt()
        dev = cuda_device(0)
    except DependencyError as exc:
        fix = exc.fix
        if script_rel is not None:
            fix = f"{fix}; or build with trtexec: bash {shlex.quote(str(bundle_dir / script_rel))}"
        raise DependencyError(f"`edgemm build` cannot build here: {exc.detail}", fix=fix) from exc
    want = backend.get("compute_capability")
    if want and options.hardware_compatibility != "ampere_plus" and \
            version_tuple(dev["compute_capability"]) != version_tuple(want):
        target = manifest.target.name or "its target"
        raise InputError(f"bundle {bundle_dir} is for compute capability {want} ({target}) but this GPU is "
                         f"{dev['name']} (compute capability {dev['compute_capability']})", file=source,
                         field="target", fix="run `edgemm build` on the target device, or recompile for this GPU")

    from .builder import build_engine

    # build_engine writes the engine atomically (a locked temp file, renamed into place only when whole)
    built = build_engine(onnx_path, engine_path, options, timing_cache=timing_cache)
    built["tensorrt_version"] = built.get("tensorrt_version") or trt.__version__
    document = manifest.to_dict()   # the manifest as read (its version and unknown sections kept)
    document["backend"].update(portable=False, engine=engine_rel, built=built)
    document["files"][engine_rel] = sha256_file(engine_path)
    write_json_atomic(bundle_dir / manifest_name, document)
    return engine_path


# -- edgemm build --from-engine ---------------------------------------------------------------------

def _smoke_feeds(manifest: Manifest, options: TensorRTOptions) -> dict:
    """Zeros of each input's opt shape (symbolic dims without a profile: 1)."""
    import numpy as np

    feeds = {}
    for spec in manifest.inputs:
        shape = options.profile_shapes.get(spec["name"], (None, None, None))[1]
        if shape is None:
            shape = tuple(d if isinstance(d, int) else 1 for d in spec["shape"])
        feeds[spec["name"]] = np.zeros(shape, dtype=np.dtype(spec["dtype"]))
    return feeds


def adopt_engine(bundle_dir: Path, engine_file: Path, *, trusted_keys=None, require_signature: bool | None = None,
                 runs: int = 10) -> dict:
    """Record an engine built on this device by the bundle's build.sh (trtexec) as the bundle's engine.

    The plan is deserialized by this machine's TensorRT, which loads only plans of its own version and
    device (the check `trtexec --getPlanVersionOnly` would report, done by the loader itself); then a
    smoke run with zero inputs is timed through edgemm's runtime from a scratch copy, and only then are
    the engine and the manifest (version, GPU, DLA cores, sha256) written into the bundle, atomically.
    ``engine_file`` is read once and never modified. Returns the ``backend.built`` record."""
    import hashlib
    import tempfile
    import time

    from ...runtime.atomic import write_bytes_atomic
    from ...runtime.manifest import Manifest
    from ...runtime.tensorrt_session import (TensorRTSession, _Capture, cuda_device, import_tensorrt, plan_version,
                                             same_version, select_device)

    bundle_dir, engine_file = Path(bundle_dir), Path(engine_file)
    manifest_name, _load, _sha, write_json_atomic = _manifest_io()
    manifest, source, backend = _verified_tensorrt_bundle(
        bundle_dir, trusted_keys, require_signature, what="it takes no TensorRT engine",
        fix="adopt engines into TensorRT bundles only")
    _onnx_rel, _onnx_path, engine_rel, engine_path, _script = _bundle_paths(bundle_dir, manifest, source)
    if not engine_file.is_file():
        raise InputError("no such engine file", file=engine_file, field="--from-engine",
                         fix="pass the file build.sh wrote (its last line names it)")
    options = TensorRTOptions.from_dict(backend.options or {}, source=source)
    data = engine_file.read_bytes()
    trt = import_tensorrt()
    header = plan_version(data)
    if header is not None and not same_version(header, trt.__version__):
        # Read from the plan header before anything deserializes it (trtexec --getPlanVersionOnly does the same).
        raise InputError(f"engine was built with TensorRT {header}, this machine's Python package is TensorRT "
                         f"{trt.__version__}", file=engine_file, field="--from-engine",
                         fix=f"build it with the trtexec of TensorRT {trt.__version__}, or run `edgemm build {bundle_dir}`")
    dev = cuda_device(0)
    select_device(0)
    log = _Capture(trt)
    runtime = trt.Runtime(log.logger)
    runtime.engine_host_code_allowed = False
    if options.dla_core is not None:
        runtime.DLA_core = int(options.dla_core)
    if runtime.deserialize_cuda_engine(data) is None:
        raise InputError(f"TensorRT {trt.__version__} on {dev['name']} cannot load this engine: {log.last_error}",
                         file=engine_file, field="--from-engine",
                         fix=f"rebuild it here with `bash {bundle_dir / BUILD_SCRIPT_NAME}` (same TensorRT as "
                             f"the Python package), or run `edgemm build {bundle_dir}`")
    digest = hashlib.sha256(data).hexdigest()
    built = {"tensorrt_version": trt.__version__, "compute_capability": dev["compute_capability"],
             "gpu": dev["name"], "integrated": bool(dev.get("integrated")),
             "dla_cores": int(getattr(runtime, "num_DLA_cores", 0)), "adopted_from": engine_file.name,
             "builder": "trtexec", "plan_version": header, "engine_bytes": len(data), "engine_sha256": digest}
    trial = manifest.to_dict()
    trial["backend"].update(portable=False, engine=engine_rel, built=built)
    trial["files"][engine_rel] = digest
    with tempfile.TemporaryDirectory(prefix=".edgemm-adopt-", dir=bundle_dir.parent) as tmp:
        scratch = Path(tmp) / engine_rel
        scratch.parent.mkdir(parents=True, exist_ok=True)
        scratch.write_bytes(data)
        session = TensorRTSession(Path(tmp), Manifest.from_dict(trial, source=scratch.parent / manifest_name))
        feeds = _smoke_feeds(manifest, options)
        try:
            session.run(feeds)   # the first call allocates; time the next ones
            started = time.perf_counter()
            for _ in range(max(1, runs)):
                session.run(feeds)
            built["smoke_ms"] = round((time.perf_counter() - started) * 1000 / max(1, runs), 3)
        finally:
            session.close()
    write_bytes_atomic(engine_path, data, fsync=True)
    write_json_atomic(bundle_dir / manifest_name, trial)
    return built
