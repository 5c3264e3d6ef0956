"""``edgemm build`` of a split TensorRT bundle: one engine per part, each with the part's own options
(its precision and placement: a DLA part builds for its DLA core), recorded in the part's entry of the
manifest's ``pipeline`` section (``backend.engine``, ``backend.built``) and hashed in ``files``.

Two steps, so the manifest logic is testable without TensorRT: ``build_parts`` builds every engine into a
temporary file beside its final path (needs TensorRT and the target GPU); ``record_part_engines`` moves
them into place and rewrites the manifest once, atomically. A part that fails to build leaves the bundle
as it was (no engine moved, the manifest untouched)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

from ...errors import BundleError, DependencyError, InputError
from .options import TensorRTOptions

ENGINE_FILE = "model.engine"   # parts/<part>/model.engine, beside the part's model.onnx and build.sh
BUILDING_SUFFIX = ".building"


def part_engine_paths(bundle_dir: Path, manifest, source: str) -> dict[str, tuple[dict, str, Path, Path]]:
    """part -> (its pipeline entry, engine path relative to the bundle, engine path, its ONNX path); every
    path checked to stay inside the bundle and not to overwrite another file of it."""
    from ...runtime.manifest import UNHASHED, safe_relpath

    out = {}
    entries = manifest.section("pipeline")["parts"]
    for i, entry in enumerate(entries):
        backend, field = entry["backend"], f"pipeline.parts[{i}].backend"
        onnx_rel = backend.get("onnx")
        if not isinstance(onnx_rel, str) or onnx_rel not in manifest.files:
            raise BundleError(f"part {entry['name']} names no ONNX file of the bundle", file=source,
                              field=f"{field}.onnx", fix="recompile the bundle for a TensorRT target")
        onnx_path = safe_relpath(bundle_dir, onnx_rel, source=source, field=f"{field}.onnx")
        engine_rel = backend.get("engine") or f"{Path(onnx_rel).parent.as_posix()}/{ENGINE_FILE}"
        engine_path = safe_relpath(bundle_dir, engine_rel, source=source, field=f"{field}.engine")
        protected = (set(manifest.files) - {backend.get("engine")}) | set(UNHASHED) | {
            e["backend"].get("engine") for e in entries if e is not entry} - {None}
        if engine_rel in protected or engine_path.is_dir() or not engine_path.parent.is_dir():
            raise BundleError(f"engine path {engine_rel!r} of part {entry['name']} names another file of the "
                              "bundle, or a folder it does not have", file=source, field=f"{field}.engine",
                              fix="recompile the bundle")
        out[entry["name"]] = (entry, engine_rel, engine_path, onnx_path)
    return out


def build_parts(bundle_dir: Path, manifest, source: str, *, timing_cache: Path | None = None) -> dict[str, dict]:
    """Build every part's engine here into ``<engine>.building``; part -> its ``backend.built`` record."""
    from ...runtime.tensorrt_session import cuda_device, import_tensorrt, version_tuple

    paths = part_engine_paths(bundle_dir, manifest, source)
    try:
        trt = import_tensorrt()
        dev = cuda_device(0)
    except DependencyError as exc:
        raise DependencyError(f"`edgemm build` cannot build here: {exc.detail}",
                              fix=f"{exc.fix}; or build every part with trtexec: bash {bundle_dir / 'build.sh'}") from exc
    from .builder import build_engine

    built, pending = {}, []
    try:
        for part, (entry, _rel, engine_path, onnx_path) in paths.items():
            backend = entry["backend"]
            options = TensorRTOptions.from_dict(backend.get("options") or {}, source=source)
            want = backend.get("compute_capability")
            if want and options.hardware_compatibility != "ampere_plus" and \
                    version_tuple(dev["compute_capability"]) != version_tuple(want):
                raise InputError(f"part {part} is for compute capability {want} but this GPU is {dev['name']} "
                                 f"(compute capability {dev['compute_capability']})", file=source, field="target",
                                 fix="run `edgemm build` on the target device, or recompile for this GPU")
            temp = engine_path.with_name(engine_path.name + BUILDING_SUFFIX)
            pending.append(temp)
            record = build_engine(onnx_path, temp, options, timing_cache=timing_cache)
            record["tensorrt_version"] = record.get("tensorrt_version") or trt.__version__
            built[part] = record
    except BaseException:
        for temp in pending:   # nothing half: the engines of this run go, the bundle stays as it was
            temp.unlink(missing_ok=True)
        raise
    return built


def record_part_engines(bundle_dir: Path, manifest, source: str, built: Mapping[str, dict]) -> list[Path]:
    """Move each part's ``<engine>.building`` into place and record it (path, sha256, ``built``) in the
    manifest, rewritten once atomically; the top-level ``backend.portable`` turns false. Returns the
    engine paths in run order."""
    from ...runtime.manifest import MANIFEST_NAME, sha256_file, write_json_atomic

    paths = part_engine_paths(bundle_dir, manifest, source)
    missing = [p for p in paths if p not in built or not
               paths[p][2].with_name(paths[p][2].name + BUILDING_SUFFIX).is_file()]
    if missing:
        raise BundleError(f"no engine was built for part {missing[0]}", file=source, field="pipeline.parts",
                          fix=f"run `edgemm build {bundle_dir}` again")
    document = manifest.to_dict()   # the manifest as read (its version and unknown sections kept)
    engines = []
    for index, entry in enumerate(document["pipeline"]["parts"]):
        _entry, rel, path, _onnx = paths[entry["name"]]
        os.replace(path.with_name(path.name + BUILDING_SUFFIX), path)
        entry["backend"].update(portable=False, engine=rel, built=dict(built[entry["name"]]))
        document["files"][rel] = sha256_file(path)
        engines.append(path)
    document["backend"]["portable"] = False
    write_json_atomic(bundle_dir / MANIFEST_NAME, document)
    return engines


def finish_split_bundle(bundle_dir: Path, manifest, source: str, *, timing_cache: Path | None = None) -> list[Path]:
    return record_part_engines(bundle_dir, manifest, source,
                               build_parts(bundle_dir, manifest, source, timing_cache=timing_cache))


__all__ = ["part_engine_paths", "build_parts", "record_part_engines", "finish_split_bundle", "ENGINE_FILE"]
