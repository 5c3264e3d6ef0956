"""Building a TensorRT engine from a precision-marked ONNX file with the TensorRT Python API (10.x, 11.x).

TensorRT is imported inside ``build_engine`` only. Version differences handled here:
- Strong typing: on 11.x every network is strongly typed and NetworkDefinitionCreationFlag.STRONGLY_TYPED
  is deprecated and ignored; the precision BuilderFlags (FP16/INT8/FP8/BF16) were removed
  (https://docs.nvidia.com/deeplearning/tensorrt/latest/api/migration/tensorrt-10x-to-11x-python-api-reference.html).
  On 10.x the flag is set explicitly, except for DLA builds (see TensorRTOptions.weak_typing).
- HardwareCompatibilityLevel.SAME_COMPUTE_CAPABILITY exists from 10.9 only.
- Version-compatible plans are built with EXCLUDE_LEAN_RUNTIME so they carry no host code
  (https://docs.nvidia.com/deeplearning/tensorrt/10.16.1/inference-library/version-compatibility.html).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import hashlib
import json
import logging

from ...errors import DependencyError, EdgemmError, InputError
from ...runtime.tensorrt_session import _Capture, cuda_device, import_tensorrt, select_device, version_tuple
from ...targets import dla_precision_supported, dla_supported
from .jetson import available_memory_mb, jetson_state, warn_if_unlocked
from .options import SAME_CC_MIN_TRT, TensorRTOptions

_LOG = logging.getLogger("edgemm")

__all__ = ["build_engine", "timing_cache_path", "timing_cache_dir", "trtexec_version_code"]


def timing_cache_dir() -> Path:
    """EDGEMM_TIMING_CACHE_DIR, else $XDG_CACHE_HOME/edgemm/timing, else ~/.cache/edgemm/timing: the same
    folder build.sh hands trtexec, so the Python builder and trtexec share one cache."""
    explicit = os.environ.get("EDGEMM_TIMING_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edgemm" / "timing"


def trtexec_version_code(trt_version: str) -> int:
    """10.3.0.30 -> 100300, the number trtexec prints as "[TensorRT v100300]" (samples/common/logging.h)."""
    major, minor, patch = (version_tuple(trt_version) + (0, 0, 0))[:3]
    return major * 10000 + minor * 100 + patch


def timing_cache_path(compute_capability: str, trt_version: str, root: Path | None = None) -> Path:
    """<timing_cache_dir>/cc<cc>-trt<MMmmpp>.cache, the name build.sh gives trtexec's --timingCacheFile.
    Timings hold for one GPU and one TensorRT version; TensorRT itself rejects a cache from another device
    (set_timing_cache with ignore_mismatch=False), and the builder then starts a fresh one."""
    root = timing_cache_dir() if root is None else Path(root)
    return root / f"cc{compute_capability}-trt{trtexec_version_code(trt_version)}.cache"


def _write_atomic(path: Path, data) -> None:
    """``data``: bytes or a buffer such as TensorRT's IHostMemory (written as is, no host copy)."""
    from ...runtime.atomic import write_bytes_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, data, fsync=True)


def build_engine(onnx_path: Path, engine_path: Path, options: TensorRTOptions, *,
                 timing_cache: Path | None = None, device: int = 0) -> dict:
    """Parse ``onnx_path``, build with ``options``, write ``engine_path`` atomically.

    Returns the record the manifest keeps under ``backend.built``."""
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    trt = import_tensorrt()
    dev = cuda_device(device)
    # The builder works on the calling thread's current device: select it (cudaGetDeviceProperties alone
    # does not), or a build for device 1 runs and tunes on device 0.
    select_device(device)
    trt_version = trt.__version__
    major = version_tuple(trt_version)[0]
    check_dla_build(trt_version, options)
    jetson = jetson_state() if dev.get("integrated") else None
    warn_if_unlocked(jetson, "building a TensorRT engine")
    if jetson is not None:
        _check_memory(onnx_path, options)
    log = _Capture(trt)
    builder = trt.Builder(log.logger)
    if builder is None:
        raise DependencyError(f"TensorRT could not create a builder: {log.last_error}",
                              fix="check the CUDA driver and the TensorRT installation")

    weak = options.weak_typing(major)
    flags = 0
    if major < 11 and not weak:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    config = builder.create_builder_config()
    if options.dla_core is not None:
        if builder.num_DLA_cores <= options.dla_core:
            raise DependencyError(f"this device has {builder.num_DLA_cores} DLA core(s), DLA core "
                                  f"{options.dla_core} was requested",
                                  fix="build on the Jetson module the bundle targets, or drop --dla")
        # Set before parsing: the DLA parser flag below validates each node against this config.
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = int(options.dla_core)
        if options.gpu_fallback:
            config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
    parser = trt.OnnxParser(network, log.logger)
    dla_flag = getattr(getattr(trt, "OnnxParserFlag", None), "REPORT_CAPABILITY_DLA", None)
    if options.dla_core is not None and dla_flag is not None and hasattr(parser, "set_builder_config"):
        # Newer parsers validate every node for DLA when asked (OnnxParserFlag.REPORT_CAPABILITY_DLA, which
        # needs the builder config: NVIDIA/TensorRT python/docstrings/parsers/pyOnnxDoc.h); older ones have
        # no such flag and the per-layer can_run_on_DLA report below is all there is.
        parser.set_flag(dla_flag)
        parser.set_builder_config(config)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors)) or log.last_error
        raise InputError(f"TensorRT {trt_version} cannot parse the ONNX model: {errors}", file=onnx_path,
                         fix="check the operators against TensorRT's ONNX support matrix")

    if options.workspace_mb:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_mb) << 20)
    config.builder_optimization_level = int(options.opt_level)
    for flag in options.precision_flags(major):
        config.set_flag(getattr(trt.BuilderFlag, flag))
    _add_profile(trt, builder, network, config, options, onnx_path)

    placement = None
    if options.dla_core is not None:
        placement = dla_placement(trt, network, config)
        if placement["gpu_layers"] and not options.gpu_fallback:
            raise InputError(f"{len(placement['gpu_layers'])} layer(s) cannot run on DLA (first: "
                             f"{placement['gpu_layers'][0]!r}) and GPU fallback is off", file=onnx_path,
                             field="--dla", fix="allow GPU fallback, or drop --dla")
        if placement["gpu_layers"]:
            _LOG.warning("DLA core %d: %d of %d layers fall back to the GPU (first: %s)", options.dla_core,
                         len(placement["gpu_layers"]), placement["layers"], placement["gpu_layers"][0])
        # DETAILED keeps per-layer names in the plan, so the engine inspector below can list them.
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    if options.sparse_weights:
        config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
    if options.refittable:
        config.set_flag(trt.BuilderFlag.REFIT)
    if options.version_compatible:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
        config.set_flag(trt.BuilderFlag.EXCLUDE_LEAN_RUNTIME)
    if options.hardware_compatibility != "none":
        level = {"ampere_plus": "AMPERE_PLUS", "same_cc": "SAME_COMPUTE_CAPABILITY"}[options.hardware_compatibility]
        if not hasattr(trt.HardwareCompatibilityLevel, level):
            need = ".".join(map(str, SAME_CC_MIN_TRT))
            raise DependencyError(f"TensorRT {trt_version} has no hardware compatibility level {level}",
                                  fix=f"use TensorRT >= {need} or hardware_compatibility='none'")
        config.hardware_compatibility_level = getattr(trt.HardwareCompatibilityLevel, level)

    cache_file = timing_cache or timing_cache_path(dev["compute_capability"], trt_version)
    cache_bytes = cache_file.read_bytes() if cache_file.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    # ignore_mismatch=False: a cache from another GPU/TensorRT is rejected instead of silently used.
    if not config.set_timing_cache(cache, False):
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, False)

    started = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - started
    if serialized is None:
        raise EdgemmError(f"TensorRT {trt_version} failed to build the engine: {log.last_error}",
                          file=onnx_path, fix="see the TensorRT log with --verbose; try a larger workspace")
    # IHostMemory exposes the buffer protocol (NVIDIA/TensorRT samples/python/common_runtime.py writes
    # `f.write(engine.serialize())`): write and hash it in place instead of copying it to bytes first.
    view = memoryview(serialized)
    _write_atomic(engine_path, view)
    digest = hashlib.sha256(view).hexdigest()
    try:
        _write_atomic(cache_file, config.get_timing_cache().serialize())
    except OSError:
        pass  # a read-only home must not fail the build; the next build is just slower
    built = {
        "tensorrt_version": trt_version,
        "compute_capability": dev["compute_capability"],
        "gpu": dev["name"],
        "integrated": bool(dev.get("integrated", False)),
        "dla_cores": int(builder.num_DLA_cores),
        "strongly_typed": not weak,
        "precision_flags": list(options.precision_flags(major)),
        "build_seconds": round(seconds, 3),
        "engine_bytes": view.nbytes,
        "engine_sha256": digest,
        "timing_cache": str(cache_file),
    }
    if jetson is not None:
        built["jetson"] = jetson
    if placement is not None:
        placement["engine_layers"] = _inspected_layers(trt, log, serialized)
        built["dla_placement"] = placement
    return built


def _check_memory(onnx_path: Path, options: TensorRTOptions) -> None:
    """On a Jetson the builder shares DRAM with the CPU: refuse before parsing when the workspace plus
    the model would not fit in what is available (an 8 GB Orin Nano otherwise swaps or gets OOM-killed)."""
    available = available_memory_mb()
    if available is None:
        return
    # The ONNX file and its external data (the bundle's engine, reports and build files are not loaded).
    skip = (".engine", ".plan", ".json", ".sh", ".md", ".sig", ".cache")
    model_mb = sum(p.stat().st_size for p in onnx_path.parent.iterdir()
                   if p.is_file() and not p.name.endswith(skip)) >> 20
    # Parsed weights, the builder's copies and the workspace: about twice the model plus the workspace.
    need = 2 * model_mb + int(options.workspace_mb or 0)
    if need > available:
        raise DependencyError(f"building needs about {need} MiB (model {model_mb} MiB twice + workspace "
                              f"{options.workspace_mb} MiB) but {available} MiB of memory is available",
                              fix="close other programs, add swap, or recompile with a smaller --workspace-mb")


def check_dla_build(trt_version: str, options: TensorRTOptions) -> None:
    """Refuse, before parsing, a DLA build this TensorRT cannot make (see targets.DLA_TENSORRT_RANGES)."""
    if options.dla_core is None:
        return
    if not dla_supported(trt_version):
        raise DependencyError(f"TensorRT {trt_version} has no DLA support",
                              fix="build with TensorRT 10.0-10.7 (JetPack 6) or 11.4.1 (JetPack 7.2.2, AGX Orin), "
                                  "or recompile without --dla")
    if not dla_precision_supported(trt_version, options.precision):
        raise InputError(f"TensorRT {trt_version} runs DLA INT8 with implicit quantization only, not a Q/DQ model",
                         field="--dla", fix="recompile with --fp16 --dla, or build on TensorRT 11.4.1 (JetPack 7.2.2)")


def dla_placement(trt, network, config) -> dict:
    """Which layers the builder can place on the DLA (IBuilderConfig.can_run_on_DLA, asked per layer before
    building, as trtexec's --verbose "DLA Layers / GPU Layers" report does after it)."""
    gpu = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if not config.can_run_on_DLA(layer):
            gpu.append(layer.name)
    return {"dla_core": int(config.DLA_core), "layers": int(network.num_layers), "gpu_layers": gpu}


def _inspected_layers(trt, log, serialized) -> list | None:
    """The built engine's layers as the engine inspector lists them (IEngineInspector.get_engine_information
    in JSON; names kept by ProfilingVerbosity.DETAILED). DLA subgraphs show up as single layers there.
    None when the inspector is unavailable: the placement above still stands."""
    try:
        runtime = trt.Runtime(log.logger)
        engine = runtime.deserialize_cuda_engine(serialized)
        info = json.loads(engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON))
    except Exception as exc:  # noqa: BLE001 - a report, never a reason to fail a finished build
        _LOG.info("engine inspector unavailable: %s", exc)
        return None
    layers = info.get("Layers", []) if isinstance(info, dict) else []
    return [(x.get("Name"), x.get("LayerType")) if isinstance(x, dict) else (str(x), None) for x in layers]


def _add_profile(trt, builder, network, config, options: TensorRTOptions, onnx_path: Path) -> None:
    """One optimization profile per entry of options.profiles, each covering every input with a dynamic
    (-1) dimension; profile i gets index i in the engine (added in order)."""
    dynamic = []
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        if any(d < 0 for d in tuple(tensor.shape)):
            dynamic.append(tensor)
    if not dynamic:
        return
    for index, shapes_by_name in enumerate(options.profiles or [{}]):
        profile = builder.create_optimization_profile()
        for tensor in dynamic:
            shapes = shapes_by_name.get(tensor.name)
            if shapes is None:
                raise InputError(f"input {tensor.name!r} has dynamic shape {list(tensor.shape)} but no min/opt/max "
                                 f"in profile {index}", file=onnx_path, field="backend.options.profile_shapes",
                                 fix=f"recompile with --dynamic {tensor.name}:AXIS=MIN:OPT:MAX")
            lo, opt, hi = shapes
            if len(lo) != len(tuple(tensor.shape)):
                raise InputError(f"profile rank {len(lo)} differs from input rank {len(tuple(tensor.shape))}",
                                 file=onnx_path, field=f"profile_shapes[{tensor.name!r}]", fix="recompile the bundle")
            profile.set_shape(tensor.name, lo, opt, hi)
        config.add_optimization_profile(profile)
