"""Running a bundle's TensorRT engine: numpy in, numpy out, device buffers and CUDA streams through
cuda-python (never torch).

Everything that can refuse is checked in ``__init__`` BEFORE the engine is deserialized, because NVIDIA
treats a serialized engine as executable code: the manifest must name an engine, its bytes must match
the manifest's sha256, and the engine's TensorRT version and compute capability must match this
machine. Engine host code is never enabled (``engine_host_code_allowed`` stays False), so plans that
embed a lean runtime or plugins as host code do not load; a version-compatible engine (built without its
lean runtime) runs on a later TensorRT through the lean runtime library the caller names.

Threads: a call takes an execution context (with its stream and buffers) from a bounded pool and gives
it back (TensorRT execution contexts are not thread-safe, and each holds the engine's activation memory:
at most ``max_contexts`` exist however many threads come and go); the engine is shared. Every call
selects the session's device on its own thread. Optional CUDA-graph replay captures
``execute_async_v3`` once per context and input-shape set (never for DLA engines).

Long module: the checks before deserialization, the context pool and the CUDA buffers are one session's
lifetime; split, each part would need the others' private state.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import threading
from pathlib import Path
from typing import Mapping

import numpy as np

from ..errors import BundleError, DependencyError, EdgemmError, InputError
from .manifest import MANIFEST_NAME, Manifest, safe_relpath

_LOG = logging.getLogger("edgemm.tensorrt")

__all__ = ["TensorRTSession", "import_tensorrt", "import_cudart", "cuda_device", "select_device", "version_tuple",
           "plan_version", "same_version"]

_INSTALL_HINT = ("install the TensorRT Python package matching the device's TensorRT "
                 "(JetPack: python3-libnvinfer; x86/SBSA: pip install tensorrt) and cuda-python")


def import_tensorrt():
    try:
        import tensorrt as trt  # noqa: PLC0415 - optional, heavy, device-only
    except ImportError as exc:
        raise DependencyError(f"TensorRT Python package not found ({exc.name or 'tensorrt'})",
                              fix=_INSTALL_HINT) from exc
    return trt


def import_cudart():
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6 layout
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python layout
        except ImportError as exc:
            raise DependencyError("cuda-python not found (needed for device buffers and streams)",
                                  fix="pip install 'edgemm[tensorrt-cu12]' (or -cu13; JetPack: "
                                      "'edgemm[jetson-cu12]'), matching the driver's CUDA major") from exc
    return cudart


def _check(cudart, result, what: str):
    """cuda-python returns (cudaError_t, *values); raise on error, return the values."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != cudart.cudaError_t.cudaSuccess:
        raise DependencyError(f"CUDA call {what} failed: {_error_name(err)}",
                              fix="check that the NVIDIA driver works (nvidia-smi / tegrastats)")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def _error_name(err) -> str:
    """cudaError_t is an IntEnum in cuda-python 12 and 13: its member name (cudaErrorInsufficientDriver,
    cudaErrorNoDevice, ...) says what went wrong."""
    return getattr(err, "name", None) or str(err)


def cuda_device(index: int = 0) -> dict:
    """Name, compute capability and integration (Jetson) of CUDA device ``index``; DependencyError naming
    the real cudaError_t when there is none."""
    cudart = import_cudart()
    err, count = cudart.cudaGetDeviceCount()
    if err != cudart.cudaError_t.cudaSuccess:
        # e.g. cudaErrorInsufficientDriver: cuda-python 13 needs driver 580+, JetPack 6 is CUDA 12.6.
        raise DependencyError(f"CUDA cannot list the GPUs: cudaGetDeviceCount failed with {_error_name(err)}",
                              fix="check the driver (nvidia-smi / tegrastats) and that cuda-python's major matches "
                                  "the CUDA the driver supports (pip install 'edgemm[tensorrt-cu12]' on JetPack 6)")
    if count == 0:
        raise DependencyError("no CUDA GPU is visible on this machine",
                              fix="run on the target device (check nvidia-smi / CUDA_VISIBLE_DEVICES)")
    if index >= count:
        raise DependencyError(f"CUDA device {index} does not exist ({count} visible)", fix="use device 0")
    props = _check(cudart, cudart.cudaGetDeviceProperties(index), "cudaGetDeviceProperties")
    name = props.name
    if isinstance(name, (bytes, bytearray)):
        name = bytes(name).split(b"\0", 1)[0].decode("utf-8", "replace")
    return {"index": index, "name": str(name).strip(), "compute_capability": f"{props.major}.{props.minor}",
            "integrated": bool(getattr(props, "integrated", 0))}


def select_device(index: int):
    """cudaSetDevice(index) on the calling thread. The current device is per host thread (CUDA Runtime
    API, "Device Management"): every thread that allocates, creates streams or builds must set it."""
    cudart = import_cudart()
    _check(cudart, cudart.cudaSetDevice(index), "cudaSetDevice")
    return cudart


def version_tuple(text: str) -> tuple[int, ...]:
    from ..text_numbers import version_numbers

    return version_numbers(text)


def plan_version(data: bytes) -> str | None:
    """The TensorRT version a plan was built with, read from its header WITHOUT deserializing it: tag
    "ftrt", serialization version 0, then major.minor.patch.build in bytes 24..27 (trtexec
    --getPlanVersionOnly, samples/common/sampleEngines.cpp printPlanVersion). None for another layout."""
    if len(data) < 28 or bytes(data[:4]) != b"ftrt" or int.from_bytes(bytes(data[4:8]), "little") != 0:
        return None
    return ".".join(str(b) for b in bytes(data[24:28]))


def same_version(a: str, b: str) -> bool:
    """Equal major.minor.patch, and equal build number where both give one (pip's tensorrt says "10.3.0")."""
    pa, pb = [p.strip() for p in str(a).split(".")], [p.strip() for p in str(b).split(".")]
    n = max(3, min(len(pa), len(pb)))
    return (pa + ["0"] * 4)[:n] == (pb + ["0"] * 4)[:n]


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


class _Capture:
    """A collector for TensorRT's log so build/deserialize errors can be reported in one line."""

    def __init__(self, trt):
        class _Logger(trt.ILogger):
            def __init__(inner):
                trt.ILogger.__init__(inner)
                inner.errors: list[str] = []

            def log(inner, severity, msg):
                if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                    inner.errors.append(_one_line(msg))
                    _LOG.debug("TensorRT: %s", msg)
                elif severity == trt.ILogger.Severity.WARNING:
                    _LOG.warning("TensorRT: %s", msg)
                else:
                    _LOG.debug("TensorRT: %s", msg)

        self.logger = _Logger()

    @property
    def last_error(self) -> str:
        return self.logger.errors[-1] if self.logger.errors else "no error message from TensorRT"


def stream_handle(stream) -> int:
    """The native cudaStream_t address for execute_async_v3. cuda-bindings 13 deprecates int() on its
    handle types; getPtr() returns the address in cuda-python 12 and 13 (cuda.bindings, "handle types")."""
    get = getattr(stream, "getPtr", None)
    return int(get()) if get is not None else int(stream)


class _ContextState:
    """One execution context + stream + device and pinned host buffers. Used by one thread at a time
    (TensorRT execution contexts are not thread-safe), handed between threads through the session's pool.

    Host buffers are page-locked (cudaMallocHost), so cudaMemcpyAsync really is asynchronous (pageable
    memory is staged through a driver buffer: CUDA C++ Best Practices, "Pinned Memory"). On integrated GPUs
    (Jetson: CPU and GPU share DRAM) they are mapped instead (cudaHostAlloc + cudaHostAllocMapped) and the
    engine reads and writes them directly, with no copy at all ("CUDA for Tegra", zero-copy)."""

    def __init__(self, engine, cudart, *, zero_copy: bool):
        self.cudart = cudart
        self.zero_copy = zero_copy
        self.context = engine.create_execution_context()
        if self.context is None:
            raise DependencyError("TensorRT could not create an execution context (out of GPU memory?)",
                                  fix="close other GPU programs or rebuild with a smaller workspace")
        self.stream = _check(cudart, cudart.cudaStreamCreate(), "cudaStreamCreate")
        self.handle = stream_handle(self.stream)
        # name -> (host pointer, device pointer, capacity in bytes)
        self.buffers: dict[str, tuple[int, int, int]] = {}
        self.graph_exec = None
        self.graph_shapes = None
        self.graph_failed = False
        self.profile = 0   # a new context starts on optimization profile 0
        self.allocator = None
        self.allocated_outputs: set[str] = set()

    def output_allocator(self, trt):
        """This context's IOutputAllocator (made on first need: the class derives from TensorRT's)."""
        if self.allocator is None:
            self.allocator = _make_output_allocator(trt, self)
        return self.allocator

    def _alloc(self, nbytes: int) -> tuple[int, int]:
        cudart = self.cudart
        if self.zero_copy:
            host = int(_check(cudart, cudart.cudaHostAlloc(nbytes, cudart.cudaHostAllocMapped), "cudaHostAlloc"))
            dev = int(_check(cudart, cudart.cudaHostGetDevicePointer(host, 0), "cudaHostGetDevicePointer"))
            return host, dev
        host = int(_check(cudart, cudart.cudaMallocHost(nbytes), "cudaMallocHost"))
        try:
            dev = int(_check(cudart, cudart.cudaMalloc(nbytes), "cudaMalloc"))
        except DependencyError:
            cudart.cudaFreeHost(host)
            raise
        return host, dev

    def _free(self, host: int, dev: int) -> None:
        self.cudart.cudaFreeHost(host)
        if not self.zero_copy:
            self.cudart.cudaFree(dev)

    def buffer(self, name: str, nbytes: int) -> tuple[int, int]:
        """(host pointer, device pointer) of at least ``nbytes``, grown (never shrunk) on demand."""
        host, dev, cap = self.buffers.get(name, (0, 0, 0))
        if nbytes > cap:
            if cap:
                self._free(host, dev)
                del self.buffers[name]
            cap = max(nbytes, 1)
            host, dev = self._alloc(cap)
            self.buffers[name] = (host, dev, cap)
            self.drop_graph()   # addresses changed: a captured graph would use the old ones
        return host, dev

    def drop_graph(self) -> None:
        if self.graph_exec is not None:
            self.cudart.cudaGraphExecDestroy(self.graph_exec)
            self.graph_exec = None
            self.graph_shapes = None

    def close(self) -> None:
        self.drop_graph()
        for host, dev, _ in self.buffers.values():
            self._free(host, dev)
        self.buffers.clear()
        self.allocator = None
        if self.stream is not None:
            self.cudart.cudaStreamDestroy(self.stream)
            self.stream = None
        self.context = None


def _make_output_allocator(trt, state: "_ContextState"):
    """An IOutputAllocator growing ``state``'s buffers for outputs whose shape depends on the data
    (NonZero, NMS...): TensorRT asks for memory and reports the shape while it executes (TensorRT developer
    guide, "Dynamically Shaped Output"; the same pattern as Polygraphy's TrtRunner)."""

    class _OutputAllocator(trt.IOutputAllocator):
        def __init__(self):
            trt.IOutputAllocator.__init__(self)
            self.shapes: dict[str, tuple[int, ...]] = {}

        def reallocate_output(self, tensor_name, memory, size, alignment):
            _host, dev = state.buffer(tensor_name, int(size))
            return dev

        def reallocate_output_async(self, tensor_name, memory, size, alignment, stream):
            # TensorRT >= 10 calls this one; reallocate_output is its deprecated synchronous form.
            return self.reallocate_output(tensor_name, memory, size, alignment)

        def notify_shape(self, tensor_name, shape):
            self.shapes[tensor_name] = tuple(int(d) for d in shape)

    return _OutputAllocator()


def _host_view(ptr: int, shape, dtype: np.dtype) -> np.ndarray:
    """A numpy array over ``ptr`` (pinned host memory owned by a _ContextState)."""
    count = int(np.prod(shape, dtype=np.int64))
    raw = (ctypes.c_char * max(count * dtype.itemsize, 1)).from_address(ptr)
    return np.frombuffer(raw, dtype=dtype, count=count).reshape(shape)


class TensorRTSession:
    """Runs ``backend.engine`` of a bundle. ``run(feeds) -> list[np.ndarray]`` in the manifest's output order."""

    def __init__(self, bundle_dir: Path, manifest: Manifest | dict, *, cuda_graph: bool | None = None, device: int = 0,
                 max_contexts: int | None = None, lean_runtime: str | Path | None = None):
        """``lean_runtime``: for a version-compatible engine built by another TensorRT, the path of that
        TensorRT's lean runtime library (libnvinfer_lean.so.N). It is host code: edgemm loads it only from
        a path the caller names, never from the bundle."""
        self.bundle_dir = Path(bundle_dir)
        self._lean_runtime = None if lean_runtime is None else Path(lean_runtime)
        source = str(self.bundle_dir / MANIFEST_NAME)
        manifest = Manifest.of(manifest, source=source)
        backend = manifest.backend
        if backend.name != "tensorrt":
            raise BundleError(f"backend is {backend.name!r}, not tensorrt", file=source, field="backend.name")
        engine_rel = backend.engine
        if not engine_rel:
            raise BundleError(f"bundle {self.bundle_dir} is a portable TensorRT bundle with no engine; "
                              f"run `edgemm build {self.bundle_dir}` on the device", field="backend.engine")
        engine_path = safe_relpath(self.bundle_dir, engine_rel, source=source)
        digest = manifest.files.get(engine_rel)
        if not digest:
            raise BundleError(f"engine {engine_rel!r} has no sha256 in the manifest", file=source, field="files",
                              fix=f"rebuild it with `edgemm build {self.bundle_dir}`")
        built = backend.built or {}
        built_version, built_cc = built.get("tensorrt_version"), built.get("compute_capability")
        if not built_version or not built_cc:
            raise BundleError("the manifest does not record the TensorRT version and compute capability the "
                              "engine was built with", file=source, field="backend.built",
                              fix=f"rebuild it with `edgemm build {self.bundle_dir}`")

        if not engine_path.is_file():
            raise BundleError(f"engine {engine_rel!r} is missing", file=self.bundle_dir,
                              fix=f"recopy the bundle or run `edgemm build {self.bundle_dir}`")
        data = engine_path.read_bytes()
        # Hash the very bytes that get deserialized (no window between check and use), before TensorRT loads.
        if hashlib.sha256(data).hexdigest() != digest:
            raise BundleError(f"engine {engine_rel!r} does not match its sha256 in the manifest (modified or "
                              f"corrupted); refusing to deserialize it", file=engine_path,
                              fix="recopy the bundle, or rebuild it with `edgemm build`")

        trt = import_tensorrt()
        cudart = import_cudart()
        dev = cuda_device(device)
        select_device(device)
        options = backend.options or {}
        self._check_compatible(trt.__version__, dev, built, options, source)
        header = plan_version(data)
        if header is not None and not options.get("version_compatible") and not same_version(header, trt.__version__):
            # The manifest says one thing, the plan's own header another: trust neither, load nothing.
            raise BundleError(f"engine header says TensorRT {header} but this machine has TensorRT {trt.__version__}",
                              file=engine_path, fix=f"rebuild it here with `edgemm build {self.bundle_dir}`")

        self._trt, self._cudart = trt, cudart
        self._log = _Capture(trt)
        self._runtime = trt.Runtime(self._log.logger)
        # Explicit although False is TensorRT's default: never run host code shipped inside a plan.
        self._runtime.engine_host_code_allowed = False
        deserializer = self._runtime
        if self._lean_runtime is not None:
            deserializer = self._load_lean_runtime(options, source)
        if options.get("dla_core") is not None:
            core, have = int(options["dla_core"]), int(getattr(self._runtime, "num_DLA_cores", 0))
            # Compute capability alone cannot tell an AGX Orin (2 DLA cores) from an Orin Nano (none).
            if core >= have:
                raise BundleError(f"engine runs on DLA core {core} but this device has {have} DLA core(s)",
                                  file=source, field="backend.options.dla_core",
                                  fix="run it on the Jetson module it was built for, or recompile without --dla")
            deserializer.DLA_core = core
        # The bytes hashed above are the bytes deserialized: no second read of the file. TensorRT 10's
        # IStreamReader(V2) deserialization would read the file again after the hash check (a window to swap
        # it), so the one verified in-memory copy is handed over instead.
        self._engine = deserializer.deserialize_cuda_engine(data)
        if self._engine is None:
            raise BundleError(f"TensorRT could not deserialize the engine: {self._log.last_error}",
                              file=engine_path, fix=f"rebuild it here with `edgemm build {self.bundle_dir}`")

        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        self.input_names = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        engine_outputs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        wanted = manifest.output_names
        if sorted(wanted) != sorted(engine_outputs):
            raise BundleError(f"engine outputs {engine_outputs} differ from the manifest's {wanted}",
                              file=engine_path, fix=f"rebuild with `edgemm build {self.bundle_dir}`")
        self.output_names = wanted
        self.dtypes = {}
        for n in names:
            try:
                self.dtypes[n] = np.dtype(trt.nptype(self._engine.get_tensor_dtype(n)))
            except TypeError:  # BF16 / FP8 I/O: numpy has no such dtype
                raise BundleError(f"engine tensor {n!r} is {self._engine.get_tensor_dtype(n)}, which numpy cannot "
                                  f"hold", file=engine_path,
                                  fix="recompile keeping FP32/FP16 model inputs and outputs (keep_io_types)") from None
        self.cuda_graph = bool(options.get("cuda_graph")) if cuda_graph is None else bool(cuda_graph)
        if self.cuda_graph and options.get("dla_core") is not None:
            # trtexec turns --useCudaGraph off for DLA engines (samples/common/sampleOptions.cpp): DLA work is
            # submitted through cuDLA, outside what a CUDA stream capture records.
            _LOG.warning("CUDA graphs are not used with a DLA engine")
            self.cuda_graph = False
        self._num_profiles = int(getattr(self._engine, "num_optimization_profiles", 1) or 1)
        # Profiles constrain the dynamic inputs only (static ones have no min/max to compare).
        self._dynamic_inputs = [n for n in self.input_names if any(d < 0 for d in self._engine.get_tensor_shape(n))] \
            if self._num_profiles > 1 else []
        self.device = dev
        self.device_index = int(device)
        self.zero_copy = bool(dev.get("integrated"))
        self.max_contexts = int(max_contexts) if max_contexts else (2 if self.zero_copy else 4)
        if self.max_contexts < 1:
            raise InputError(f"max_contexts={max_contexts}", field="max_contexts", fix="use 1 or more")
        self._idle: list[_ContextState] = []
        self._states: list[_ContextState] = []
        self._cond = threading.Condition()

    # -- compatibility checks (before deserialization) ------------------------------------------
    def _check_compatible(self, runtime_version: str, dev: dict, built: dict, options: Mapping, source: str):
        """A plan runs only on the TensorRT that built it, build number included (TensorRT developer guide,
        "Version Compatibility": by default engines are tied to the exact version and device model)."""
        built_version = str(built["tensorrt_version"])
        rebuild = f"rebuild it on this machine with `edgemm build {self.bundle_dir}`"
        if str(runtime_version).strip() != built_version.strip():
            if not options.get("version_compatible"):
                raise BundleError(f"engine was built with TensorRT {built_version} but this machine has "
                                  f"TensorRT {runtime_version}", file=source,
                                  field="backend.built.tensorrt_version", fix=rebuild)
            # Version-compatible plans run on the same or a later TensorRT (never an older one), through the
            # lean runtime of the version that built them: edgemm builds them with EXCLUDE_LEAN_RUNTIME,
            # so that library must be loaded (TensorRT "Version Compatibility", manually loading the runtime).
            if version_tuple(runtime_version) < version_tuple(built_version):
                raise BundleError(f"version-compatible engine was built with TensorRT {built_version}, newer than "
                                  f"this machine's TensorRT {runtime_version}", file=source,
                                  field="backend.built.tensorrt_version", fix=rebuild)
            if self._lean_runtime is None:
                raise BundleError(f"version-compatible engine was built with TensorRT {built_version}; this machine "
                                  f"has TensorRT {runtime_version}, which runs it only through TensorRT "
                                  f"{built_version}'s lean runtime", file=source, field="lean_runtime",
                                  fix=f"pass lean_runtime=/path/to/libnvinfer_lean.so.{version_tuple(built_version)[0]} "
                                      f"of TensorRT {built_version}, or {rebuild}")
        want, have = str(built["compute_capability"]), dev["compute_capability"]
        level = options.get("hardware_compatibility", "none")
        if level != "none" and dev.get("integrated"):
            # Hardware compatibility levels cover discrete Ampere+ GPUs only, never Jetson (TensorRT developer
            # guide, "Hardware Compatibility": not supported on JetPack / integrated GPUs).
            raise BundleError(f"engine is hardware-compatible ({level}), which TensorRT does not support on an "
                              f"integrated GPU such as {dev['name']}", file=source,
                              field="backend.options.hardware_compatibility", fix=rebuild)
        if level == "ampere_plus":
            ok = version_tuple(have) >= (8, 0)
        else:
            ok = version_tuple(have) == version_tuple(want)
        if not ok:
            raise BundleError(f"engine was built for compute capability {want} ({built.get('gpu', 'unknown GPU')}) "
                              f"but this GPU is {dev['name']} (compute capability {have})", file=source,
                              field="backend.built.compute_capability", fix=rebuild)
        if level == "none" and built.get("gpu") and str(built["gpu"]) != dev["name"]:
            raise BundleError(f"engine was built on {built['gpu']} but this GPU is {dev['name']} (engines are "
                              f"tuned for one GPU model)", file=source, field="backend.built.gpu", fix=rebuild)

    def _load_lean_runtime(self, options: Mapping, source: str):
        """IRuntime.load_runtime(path) -> the lean runtime that deserializes a version-compatible plan built
        with EXCLUDE_LEAN_RUNTIME (TensorRT "Version Compatibility"; trtexec's --leanDLLPath does the same)."""
        if not options.get("version_compatible"):
            raise BundleError("lean_runtime is only for version-compatible engines", file=source,
                              field="backend.options.version_compatible",
                              fix="drop lean_runtime, or recompile with --version-compatible")
        path = self._lean_runtime
        if not path.is_file():
            raise InputError("no such lean runtime library", file=path, field="lean_runtime",
                             fix="pass the libnvinfer_lean.so of the TensorRT that built the engine")
        lean = self._runtime.load_runtime(str(path))
        if lean is None:
            raise DependencyError(f"TensorRT could not load the lean runtime {path}: {self._log.last_error}",
                                  fix="pass the lean runtime of the TensorRT version that built the engine")
        lean.engine_host_code_allowed = False
        return lean

    # -- the context pool ------------------------------------------------------------------------
    def _memory_allows_another(self) -> bool:
        """Whether free device memory holds one more context's activations (each holds the engine's full
        device memory under the default static allocation strategy); 8 GB Jetsons run out quickly."""
        size = getattr(self._engine, "device_memory_size_v2", None)
        if size is None:
            size = getattr(self._engine, "device_memory_size", 0)
        err, free, _total = self._cudart.cudaMemGetInfo()
        if err != self._cudart.cudaError_t.cudaSuccess:
            return False
        return int(free) > int(size) + (64 << 20)   # keep 64 MiB for buffers and the driver

    def _acquire(self) -> _ContextState:
        """An idle context, a new one while under ``max_contexts`` (and memory allows), else wait for one:
        at most ``max_contexts`` contexts exist however many threads come and go."""
        with self._cond:
            while True:
                if self._idle:
                    return self._idle.pop()
                if not self._states or (len(self._states) < self.max_contexts and self._memory_allows_another()):
                    state = _ContextState(self._engine, self._cudart, zero_copy=self.zero_copy)
                    self._states.append(state)
                    return state
                self._cond.wait()

    def _release(self, state: _ContextState) -> None:
        with self._cond:
            if state in self._states:
                self._idle.append(state)
            else:
                state.close()   # the session was closed meanwhile
            self._cond.notify()

    # -- inference -------------------------------------------------------------------------------
    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise InputError(f"missing input(s) {', '.join(missing)}", field="feeds",
                             fix=f"pass {', '.join(self.input_names)}")
        # The current device is per host thread: a worker thread starts on device 0.
        select_device(self.device_index)
        st = self._acquire()
        try:
            return self._run(st, feeds)
        finally:
            self._release(st)

    def _pick_profile(self, shapes: Mapping[str, tuple]) -> int:
        """The first optimization profile whose min..max holds every input shape (profiles are declared
        latency first, e.g. batch 1 then batch 32)."""
        for index in range(self._num_profiles):
            fits = True
            for name, shape in shapes.items():
                lo, _opt, hi = self._engine.get_tensor_profile_shape(name, index)
                if len(lo) != len(shape) or any(not (a <= d <= b) for a, d, b in zip(lo, shape, hi)):
                    fits = False
                    break
            if fits:
                return index
        ranges = "; ".join(
            f"profile {i}: " + ", ".join(f"{n} {list(self._engine.get_tensor_profile_shape(n, i)[0])}.."
                                         f"{list(self._engine.get_tensor_profile_shape(n, i)[2])}" for n in shapes)
            for i in range(self._num_profiles))
        raise InputError(f"input shapes {({n: list(s) for n, s in shapes.items()})} fit no optimization profile "
                         f"({ranges})", field="feeds", fix="recompile with a profile covering these shapes")

    def _select_profile(self, st: _ContextState, shapes: Mapping[str, tuple]) -> None:
        index = self._pick_profile(shapes)
        if index != st.profile:
            # IExecutionContext.set_optimization_profile_async: switch before setting input shapes.
            if not st.context.set_optimization_profile_async(index, st.handle):
                raise EdgemmError(f"TensorRT could not switch to optimization profile {index}: "
                                  f"{self._log.last_error}")
            st.profile = index
            st.drop_graph()

    def _run(self, st: _ContextState, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        cudart = self._cudart
        ctx = st.context
        if self._num_profiles > 1:
            self._select_profile(st, {n: tuple(np.shape(feeds[n])) for n in self._dynamic_inputs})
        hosts = {}
        for name in self.input_names:
            arr = np.asarray(feeds[name])
            if arr.dtype != self.dtypes[name]:
                raise InputError(f"dtype {arr.dtype}, the engine takes {self.dtypes[name]}", field=name,
                                 fix=f"cast it with .astype('{self.dtypes[name]}')")
            if not ctx.set_input_shape(name, tuple(arr.shape)):
                lo, opt, hi = self._engine.get_tensor_profile_shape(name, st.profile)
                raise InputError(f"shape {list(arr.shape)} is outside the engine's profile "
                                 f"min {list(lo)} / max {list(hi)}", field=name,
                                 fix="recompile with a wider --dynamic range")
            hosts[name] = arr
        out_shapes, dynamic_out = {}, []
        for name in self.output_names:
            shape = tuple(ctx.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                dynamic_out.append(name)   # data-dependent: sized by the output allocator during execution
            else:
                out_shapes[name] = shape
        if dynamic_out:
            allocator = st.output_allocator(self._trt)
            for name in dynamic_out:
                if name not in st.allocated_outputs:
                    if not ctx.set_output_allocator(name, allocator):
                        raise EdgemmError(f"TensorRT refused an output allocator for {name!r}: {self._log.last_error}")
                    st.allocated_outputs.add(name)
        views = {}
        for name, shape in [*((n, a.shape) for n, a in hosts.items()), *out_shapes.items()]:
            dtype = self.dtypes[name]
            host, dev = st.buffer(name, int(np.prod(shape, dtype=np.int64)) * dtype.itemsize)
            views[name] = (_host_view(host, shape, dtype), dev)
            if not ctx.set_tensor_address(name, dev):
                raise EdgemmError(f"TensorRT refused the device address for {name!r}: {self._log.last_error}")
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for name, arr in hosts.items():
            view, dev = views[name]
            np.copyto(view, arr)   # into pinned (or mapped) memory: the one host copy
            if not st.zero_copy:
                _check(cudart, cudart.cudaMemcpyAsync(dev, view.ctypes.data, view.nbytes, h2d, st.stream),
                       "cudaMemcpyAsync(host->device)")
        self._execute(st, tuple((n, hosts[n].shape) for n in self.input_names), capturable=not dynamic_out)
        if not st.zero_copy:
            for name in out_shapes:
                view, dev = views[name]
                _check(cudart, cudart.cudaMemcpyAsync(view.ctypes.data, dev, view.nbytes, d2h, st.stream),
                       "cudaMemcpyAsync(device->host)")
        _check(cudart, cudart.cudaStreamSynchronize(st.stream), "cudaStreamSynchronize")
        if dynamic_out:
            # Shapes are known only now (IOutputAllocator.notify_shape during execution); the data sits in
            # the buffers the allocator handed TensorRT (as Polygraphy's TrtRunner reads them).
            for name in dynamic_out:
                shape = st.allocator.shapes.get(name)
                if shape is None:
                    raise EdgemmError(f"TensorRT reported no shape for the data-dependent output {name!r}")
                host, dev, _cap = st.buffers[name]
                view = _host_view(host, shape, self.dtypes[name])
                if not st.zero_copy and view.nbytes:
                    _check(cudart, cudart.cudaMemcpyAsync(view.ctypes.data, dev, view.nbytes, d2h, st.stream),
                           "cudaMemcpyAsync(device->host)")
                views[name] = (view, dev)
            _check(cudart, cudart.cudaStreamSynchronize(st.stream), "cudaStreamSynchronize")
        # Copies: the pinned buffers are reused by the next call.
        return [views[n][0].copy() for n in self.output_names]

    def _enqueue(self, st: _ContextState) -> None:
        if not st.context.execute_async_v3(st.handle):
            raise EdgemmError(f"TensorRT inference failed: {self._log.last_error}",
                              fix="run with a smaller input or rebuild the engine")

    def _give_up_graphs(self, st: _ContextState, why: str) -> None:
        # A failed capture leaves the error sticky in the runtime: read it once so the next CUDA call does
        # not report it (trtexec: endCaptureOnError, then cudaGetLastError, samples/common/sampleInference.cpp).
        self._cudart.cudaGetLastError()
        st.graph_failed = True
        _LOG.warning("CUDA graph disabled for this context: %s; running the engine directly", why)

    def _execute(self, st: _ContextState, shapes, *, capturable: bool = True) -> None:
        """Enqueue the engine; with CUDA graphs, replay a graph captured for these input shapes. Engines with
        data-dependent output shapes are never captured (the allocator runs on the host mid-execution)."""
        cudart = self._cudart
        if not self.cuda_graph or st.graph_failed or not capturable:
            self._enqueue(st)
            return
        if st.graph_exec is not None and st.graph_shapes == shapes:
            _check(cudart, cudart.cudaGraphLaunch(st.graph_exec, st.stream), "cudaGraphLaunch")
            return
        st.drop_graph()
        # TensorRT needs one ordinary enqueue after a shape change before capture (it updates internal
        # state then), see "CUDA Graphs" in the TensorRT developer guide.
        self._enqueue(st)
        mode = cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        _check(cudart, cudart.cudaStreamBeginCapture(st.stream, mode), "cudaStreamBeginCapture")
        captured = st.context.execute_async_v3(st.handle)
        err, graph = cudart.cudaStreamEndCapture(st.stream)
        ok = cudart.cudaError_t.cudaSuccess
        if not captured or err != ok:
            # Some engines cannot be captured (loops, data-dependent shapes, some plugins).
            if err == ok and graph is not None:
                cudart.cudaGraphDestroy(graph)
            self._give_up_graphs(st, "the engine cannot be captured" if not captured else
                                 f"cudaStreamEndCapture failed with {_error_name(err)}")
            return
        try:
            err, graph_exec = cudart.cudaGraphInstantiate(graph, 0)
        finally:
            cudart.cudaGraphDestroy(graph)
        if err != ok:
            self._give_up_graphs(st, f"cudaGraphInstantiate failed with {_error_name(err)}")
            return
        st.graph_exec, st.graph_shapes = graph_exec, shapes
        # The first enqueue above already produced this call's outputs; the graph serves later calls.

    def close(self) -> None:
        with self._cond:
            states, self._states, self._idle = self._states, [], []
            self._cond.notify_all()
        for st in states:
            st.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown: CUDA may already be gone
            pass
