"""TensorRTSession.run against a stand-in TensorRT + cuda-python whose "device memory" is host memory and
whose engine computes y = 2 * x through the addresses it is given.

What the stand-ins cannot prove: that real CUDA/TensorRT behave like them (stream ordering, capture
rules, pinned or mapped memory, DLA, device selection effects). They show which calls edgemm makes, on
which thread, in which order, and how it reacts to the failures CUDA and TensorRT document; the real
thing runs in tests/gpu/ and tests/gpu/run_on_device.sh on a device."""

from __future__ import annotations

import ctypes
import enum
import hashlib
import sys
import threading
import types

import numpy as np
import pytest

from edgemm.errors import BundleError
from edgemm.runtime.tensorrt_session import TensorRTSession

ENGINE = b"stand-in plan"


class Err(enum.IntEnum):
    cudaSuccess = 0
    cudaErrorInvalidValue = 1
    cudaErrorStreamCaptureInvalidated = 901
    cudaErrorInsufficientDriver = 35


class Stack:
    """Records (call, thread name, args) for every CUDA/TensorRT call that matters."""

    def __init__(self, *, version="10.3.0.30", name=b"Orin", integrated=False, dla_cores=0, gpus=2,
                 capture_ok=True, end_capture=Err.cudaSuccess, instantiate=Err.cudaSuccess, free=8 << 30,
                 count_err=Err.cudaSuccess, profiles=(((1, 4), (1, 4), (64, 4)),), data_dependent=False):
        self.calls: list[tuple] = []
        self.memory: dict[int, ctypes.Array] = {}
        self.sticky = Err.cudaSuccess
        stack = self

        def rec(*what):
            stack.calls.append((what[0], threading.current_thread().name, *what[1:]))

        class Stream:
            def __init__(self, n):
                self.n = n

            def getPtr(self):
                return 0x5000 + self.n

            def __int__(self):
                raise AssertionError("int(stream) is deprecated in cuda-bindings 13; use getPtr()")

        def alloc(n):
            buf = ctypes.create_string_buffer(n)
            stack.memory[ctypes.addressof(buf)] = buf
            return ctypes.addressof(buf)

        ok = Err.cudaSuccess
        streams = []

        def stream_create():
            streams.append(Stream(len(streams)))
            rec("cudaStreamCreate")
            return ok, streams[-1]

        def memcpy(dst, src, n, kind, stream):
            ctypes.memmove(dst, src, n)
            rec("cudaMemcpyAsync", kind)
            return (ok,)

        def end_capture_fn(stream):
            rec("cudaStreamEndCapture")
            if end_capture != ok:
                stack.sticky = end_capture
                return end_capture, None
            return ok, "graph"

        def instantiate_fn(graph, flags):
            rec("cudaGraphInstantiate")
            return (instantiate, None) if instantiate != ok else (ok, "graph_exec")

        def last_error():
            rec("cudaGetLastError")
            err, stack.sticky = stack.sticky, ok
            return (err,)

        self.cudart = types.SimpleNamespace(
            cudaError_t=Err,
            cudaGetDeviceCount=lambda: (count_err, gpus),
            cudaGetDeviceProperties=lambda i: (ok, types.SimpleNamespace(name=name + b"\0", major=8, minor=7,
                                                                          integrated=int(integrated))),
            cudaSetDevice=lambda i: (rec("cudaSetDevice", i), (ok,))[1],
            cudaStreamCreate=stream_create,
            cudaStreamDestroy=lambda s: (ok,),
            cudaMalloc=lambda n: (rec("cudaMalloc", n), (ok, alloc(n)))[1],
            cudaMallocHost=lambda n: (rec("cudaMallocHost", n), (ok, alloc(n)))[1],
            cudaHostAlloc=lambda n, flags: (rec("cudaHostAlloc", n, flags), (ok, alloc(n)))[1],
            cudaHostAllocMapped=2,
            cudaHostGetDevicePointer=lambda p, f: (ok, p),
            cudaFree=lambda p: (ok,), cudaFreeHost=lambda p: (ok,),
            cudaMemGetInfo=lambda: (ok, free, 8 << 30),
            cudaMemcpyKind=types.SimpleNamespace(cudaMemcpyHostToDevice="h2d", cudaMemcpyDeviceToHost="d2h"),
            cudaMemcpyAsync=memcpy,
            cudaStreamSynchronize=lambda s: (rec("cudaStreamSynchronize"), (ok,))[1],
            cudaStreamCaptureMode=types.SimpleNamespace(cudaStreamCaptureModeThreadLocal="thread-local"),
            cudaStreamBeginCapture=lambda s, m: (rec("cudaStreamBeginCapture"), (ok,))[1],
            cudaStreamEndCapture=end_capture_fn,
            cudaGraphInstantiate=instantiate_fn,
            cudaGraphDestroy=lambda g: (ok,), cudaGraphExecDestroy=lambda g: (ok,),
            cudaGraphLaunch=lambda g, s: (rec("cudaGraphLaunch"), (ok,))[1],
            cudaGetLastError=last_error,
        )

        class Context:
            def __init__(self):
                self.shapes, self.addr, self.capturing = {}, {}, False
                rec("create_execution_context")

            def set_input_shape(self, name, shape):
                self.shapes[name] = shape
                return True

            def get_tensor_shape(self, name):
                if name == "y" and data_dependent:
                    return (-1, 4)
                return self.shapes["x"]

            def set_output_allocator(self, name, allocator):
                rec("set_output_allocator", name)
                self.allocator = allocator
                return True

            def set_optimization_profile_async(self, index, handle):
                rec("set_optimization_profile_async", index, handle)
                return True

            def set_tensor_address(self, name, ptr):
                self.addr[name] = ptr
                return True

            def execute_async_v3(self, handle):
                rec("execute_async_v3", handle)
                if any(c[0] == "cudaStreamBeginCapture" for c in stack.calls[-3:]) and not capture_ok:
                    return False
                n = int(np.prod(self.shapes["x"]))
                x = np.frombuffer((ctypes.c_float * n).from_address(self.addr["x"]), dtype=np.float32)
                if data_dependent:   # y = 2 * the rows of x whose first value is positive (like NonZero)
                    rows = x.reshape(-1, 4)[x.reshape(-1, 4)[:, 0] > 0]
                    ptr = self.allocator.reallocate_output_async("y", 0, max(rows.nbytes, 1), 256, handle)
                    self.allocator.notify_shape("y", rows.shape)
                    ctypes.memmove(ptr, (2 * rows).astype(np.float32).ctypes.data, rows.nbytes)
                    return True
                y = np.frombuffer((ctypes.c_float * n).from_address(self.addr["y"]), dtype=np.float32)
                y[:] = 2 * x
                return True

        class Engine:
            num_io_tensors = 2
            device_memory_size_v2 = 1 << 30
            num_optimization_profiles = len(profiles)

            def get_tensor_shape(self, name):
                return (-1, 4)

            def get_tensor_profile_shape(self, name, index):
                return [list(s) for s in profiles[index]]

            def get_tensor_name(self, i):
                return ("x", "y")[i]

            def get_tensor_mode(self, name):
                return "in" if name == "x" else "out"

            def get_tensor_dtype(self, name):
                return "float32"

            def create_execution_context(self):
                return Context()

            def serialize(self):
                rec("serialize")
                return bytearray(stack.refitted_plan)

        class Runtime:
            num_DLA_cores = dla_cores

            def __init__(self, logger):
                rec("Runtime")

            def deserialize_cuda_engine(self, data):
                rec("deserialize", data)
                return Engine()

            def load_runtime(self, path):
                rec("load_runtime", path)
                lean = Runtime.__new__(Runtime)
                lean.deserialize_cuda_engine = lambda data: (rec("lean deserialize", data), Engine())[1]
                return lean

        class ILogger:
            class Severity:
                INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

            def __init__(self):
                pass

        class IOutputAllocator:
            def __init__(self):
                pass

        self.refitted_plan = b"refitted plan"
        self.refit_ok = True

        class Refitter:
            def __init__(self, engine, logger):
                rec("Refitter")

            def refit_cuda_engine(self):
                rec("refit_cuda_engine")
                return stack.refit_ok

            def get_missing_weights(self):
                return ["fc.weight"]

        class OnnxParserRefitter:
            def __init__(self, refitter, logger):
                pass

            def refit_from_file(self, path):
                rec("refit_from_file", path)
                return True

        self.trt = types.SimpleNamespace(__version__=version, Runtime=Runtime, ILogger=ILogger,
                                         IOutputAllocator=IOutputAllocator, Refitter=Refitter,
                                         OnnxParserRefitter=OnnxParserRefitter,
                                         TensorIOMode=types.SimpleNamespace(INPUT="in", OUTPUT="out"),
                                         nptype=lambda t: np.float32)

    def install(self, monkeypatch):
        bindings = types.SimpleNamespace(runtime=self.cudart)
        monkeypatch.setitem(sys.modules, "tensorrt", self.trt)
        monkeypatch.setitem(sys.modules, "cuda", types.SimpleNamespace(bindings=bindings))
        monkeypatch.setitem(sys.modules, "cuda.bindings", bindings)
        monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", self.cudart)
        return self

    def names(self):
        return [c[0] for c in self.calls]


def _manifest(built=None, options=None) -> dict:
    return {
        "format": "edgemm-bundle", "format_version": 1, "name": "b",
        "inputs": [{"name": "x", "dtype": "float32", "shape": ["batch", 4]}],
        "outputs": [{"name": "y", "dtype": "float32", "shape": ["batch", 4]}],
        "precision": {"mode": "fp16"}, "target": {"name": "jetson-orin-nano"},
        "backend": {"name": "tensorrt", "engine": "model.engine", "options": options or {},
                    "built": {"tensorrt_version": "10.3.0.30", "compute_capability": "8.7", "gpu": "Orin",
                              **(built or {})}},
        "files": {"model.engine": hashlib.sha256(ENGINE).hexdigest()},
    }


@pytest.fixture
def bundle(tmp_path):
    (tmp_path / "model.engine").write_bytes(ENGINE)
    return tmp_path


def test_runs_on_the_verified_bytes_with_the_native_stream_handle(bundle, monkeypatch):
    # Old code passed int(stream) (deprecated in cuda-bindings 13; the stand-in's __int__ raises).
    stack = Stack().install(monkeypatch)
    sess = TensorRTSession(bundle, _manifest())
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    np.testing.assert_array_equal(sess.run({"x": x})[0], 2 * x)
    assert ("deserialize", "MainThread", ENGINE) in stack.calls
    assert [c[2] for c in stack.calls if c[0] == "execute_async_v3"] == [0x5000]


def test_worker_threads_select_the_session_device(bundle, monkeypatch):
    # Old code called cudaSetDevice in the constructor only: a worker thread ran on device 0.
    stack = Stack().install(monkeypatch)
    sess = TensorRTSession(bundle, _manifest(), device=1)
    out = []
    t = threading.Thread(target=lambda: out.append(sess.run({"x": np.ones((1, 4), np.float32)})), name="worker")
    t.start()
    t.join()
    assert out and np.all(out[0][0] == 2)
    worker = [c for c in stack.calls if c[1] == "worker"]
    assert worker[0][:3] == ("cudaSetDevice", "worker", 1)
    assert ("cudaSetDevice", "worker", 0) not in stack.calls


def test_contexts_are_bounded_and_reused_across_thread_churn(bundle, monkeypatch):
    # Old code created one context per thread and never released it: 20 short-lived threads, 20 contexts.
    stack = Stack().install(monkeypatch)
    sess = TensorRTSession(bundle, _manifest(), max_contexts=2)
    barrier = threading.Barrier(4)

    def work():
        barrier.wait()
        for _ in range(3):
            sess.run({"x": np.ones((2, 4), np.float32)})

    for _ in range(5):
        threads = [threading.Thread(target=work) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert 1 <= stack.names().count("create_execution_context") <= 2


def test_a_second_context_waits_when_memory_would_not_hold_it(bundle, monkeypatch):
    stack = Stack(free=512 << 20).install(monkeypatch)   # less free memory than one context's activations
    sess = TensorRTSession(bundle, _manifest(), max_contexts=4)
    threads = [threading.Thread(target=lambda: sess.run({"x": np.ones((1, 4), np.float32)})) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert stack.names().count("create_execution_context") == 1


def test_host_buffers_are_pinned_on_discrete_and_mapped_on_integrated_gpus(bundle, monkeypatch):
    # Old code copied from pageable numpy memory (cudaMemcpyAsync then runs synchronously).
    stack = Stack(name=b"NVIDIA L4").install(monkeypatch)
    sess = TensorRTSession(bundle, _manifest(built={"gpu": "NVIDIA L4"}))
    x = np.full((2, 4), 3, np.float32)
    y1 = sess.run({"x": x})[0]
    y2 = sess.run({"x": x + 1})[0]
    assert "cudaMallocHost" in stack.names() and "cudaHostAlloc" not in stack.names()
    assert np.all(y1 == 6) and np.all(y2 == 8)    # results are copies, not views of reused buffers
    jetson = Stack(integrated=True).install(monkeypatch)
    sess = TensorRTSession(bundle, _manifest())
    np.testing.assert_array_equal(sess.run({"x": x})[0], 2 * x)
    assert "cudaHostAlloc" in jetson.names() and "cudaMalloc" not in jetson.names()
    assert "cudaMemcpyAsync" not in jetson.names()    # zero-copy: the engine works on mapped memory


@pytest.mark.parametrize("failure", ["enqueue", "end_capture", "instantiate"])
def test_failed_graph_capture_clears_the_error_and_runs_directly(bundle, monkeypatch, failure):
    # Old code left the capture error set, and a failed cudaGraphInstantiate raised instead of falling back.
    kwargs = {"enqueue": dict(capture_ok=False),
              "end_capture": dict(end_capture=Err.cudaErrorStreamCaptureInvalidated),
              "instantiate": dict(instantiate=Err.cudaErrorInvalidValue)}[failure]
    stack = Stack(**kwargs).install(monkeypatch)
    sess = TensorRTSession(bundle, _manifest(), cuda_graph=True)
    x = np.ones((1, 4), np.float32)
    for _ in range(3):
        np.testing.assert_array_equal(sess.run({"x": x})[0], 2 * x)
    names = stack.names()
    assert names.count("cudaStreamBeginCapture") == 1             # tried once, then marked failed
    assert "cudaGetLastError" in names and stack.sticky == Err.cudaSuccess
    assert "cudaGraphLaunch" not in names


def test_graph_replays_when_capture_works(bundle, monkeypatch):
    stack = Stack().install(monkeypatch)
    sess = TensorRTSession(bundle, _manifest(), cuda_graph=True)
    for _ in range(3):
        sess.run({"x": np.ones((1, 4), np.float32)})
    assert stack.names().count("cudaStreamBeginCapture") == 1 and stack.names().count("cudaGraphLaunch") == 2


def test_no_graph_capture_on_dla_engines(bundle, monkeypatch):
    # trtexec disables --useCudaGraph with --useDLACore; old code tried to capture DLA engines.
    stack = Stack(dla_cores=2).install(monkeypatch)
    sess = TensorRTSession(bundle, _manifest(options={"dla_core": 0, "precision": "fp16"}), cuda_graph=True)
    sess.run({"x": np.ones((1, 4), np.float32)})
    assert sess.cuda_graph is False and "cudaStreamBeginCapture" not in stack.names()


@pytest.mark.parametrize("stack_kwargs, built, options, pattern", [
    # the build number is part of the version (TensorRT refuses other builds)
    (dict(version="10.3.0.26"), {}, {}, "built with TensorRT 10.3.0.30 but this machine has TensorRT 10.3.0.26"),
    # same compute capability, another GPU model
    (dict(name=b"NVIDIA A10"), {"compute_capability": "8.7"}, {}, "built on Orin but this GPU is NVIDIA A10"),
    # an AGX Orin DLA engine on an Orin Nano (no DLA): same name, same compute capability
    (dict(dla_cores=0), {}, {"dla_core": 0}, "DLA core 0 but this device has 0 DLA core"),
    # hardware-compatible engines are for discrete GPUs; Jetson is integrated
    (dict(integrated=True), {}, {"hardware_compatibility": "ampere_plus"}, "not support on an integrated GPU"),
])
def test_compatibility_refused_before_deserializing(bundle, monkeypatch, stack_kwargs, built, options, pattern):
    stack = Stack(**stack_kwargs).install(monkeypatch)
    with pytest.raises(BundleError, match=pattern) as err:
        TensorRTSession(bundle, _manifest(built=built, options=options))
    assert "\n" not in str(err.value) and "deserialize" not in stack.names()


def test_cuda_error_is_named(bundle, monkeypatch):
    # Old code said "no CUDA GPU is visible" for every cudaGetDeviceCount failure (e.g. cuda-python 13 on
    # a CUDA 12 driver gives cudaErrorInsufficientDriver).
    from edgemm.errors import DependencyError

    Stack(count_err=Err.cudaErrorInsufficientDriver).install(monkeypatch)
    with pytest.raises(DependencyError, match="cudaErrorInsufficientDriver") as err:
        TensorRTSession(bundle, _manifest())
    assert "tensorrt-cu12" in str(err.value)


def test_version_compatible_engine_runs_through_the_named_lean_runtime(bundle, monkeypatch, tmp_path):
    # Old code refused every version mismatch, so --version-compatible only cost speed. The stand-in cannot
    # prove that a real lean runtime deserializes a real plan; it shows the load_runtime route and the refusals.
    stack = Stack(version="10.16.1.11").install(monkeypatch)
    vc = {"version_compatible": True}
    with pytest.raises(BundleError, match="pass lean_runtime=/path/to/libnvinfer_lean.so.10 of TensorRT 10.3.0.30"):
        TensorRTSession(bundle, _manifest(options=vc))
    lean = tmp_path / "libnvinfer_lean.so.10"
    lean.write_bytes(b"stand-in library")
    sess = TensorRTSession(bundle, _manifest(options=vc), lean_runtime=lean)
    assert ("load_runtime", "MainThread", str(lean)) in stack.calls
    assert ("lean deserialize", "MainThread", ENGINE) in stack.calls and "deserialize" not in stack.names()
    np.testing.assert_array_equal(sess.run({"x": np.ones((1, 4), np.float32)})[0], np.full((1, 4), 2, np.float32))
    # Not version-compatible: still refused, lean runtime or not.
    with pytest.raises(BundleError, match="built with TensorRT 10.3.0.30 but this machine has TensorRT 10.16.1.11"):
        TensorRTSession(bundle, _manifest(), lean_runtime=lean)
    # Never backwards: a plan from a newer TensorRT.
    Stack(version="10.2.0.19").install(monkeypatch)
    with pytest.raises(BundleError, match="newer than this machine's TensorRT 10.2.0.19"):
        TensorRTSession(bundle, _manifest(options=vc), lean_runtime=lean)


def _portable_bundle(folder, options=None) -> None:
    from edgemm.runtime.manifest import sha256_file, write_json_atomic

    folder.mkdir()
    (folder / "model.onnx").write_bytes(b"onnx")
    (folder / "build.sh").write_text("#!/usr/bin/env bash\n")
    manifest = _manifest(options=options)
    manifest.update(precision={"mode": "fp16"}, target={"name": "jetson-orin-nx"})
    manifest["backend"].update(portable=True, engine=None, built=None, onnx="model.onnx", build_script="build.sh")
    manifest["files"] = {n: sha256_file(folder / n) for n in ("model.onnx", "build.sh")}
    write_json_atomic(folder / "manifest.json", manifest)


def test_trtexec_engine_adopted_after_a_smoke_run(monkeypatch, tmp_path):
    # Old code could not load what the bundle's own build.sh builds. The stand-in cannot prove that real
    # TensorRT refuses another version's plan; it shows the order: load, smoke run, then write the bundle.
    from edgemm import runtime
    from edgemm.backends.tensorrt.package import adopt_engine

    stack = Stack(version="10.3.0.30").install(monkeypatch)
    bundle = tmp_path / "b"
    _portable_bundle(bundle)
    engine = tmp_path / "b.engine"
    engine.write_bytes(ENGINE)
    built = adopt_engine(bundle, engine, runs=3)
    assert built["tensorrt_version"] == "10.3.0.30" and built["gpu"] == "Orin" and built["smoke_ms"] >= 0
    assert built["engine_sha256"] == hashlib.sha256(ENGINE).hexdigest()
    assert (bundle / "model.engine").read_bytes() == ENGINE and engine.read_bytes() == ENGINE
    assert stack.names().count("execute_async_v3") == 4          # one warm-up + 3 timed
    loaded = runtime.load(bundle)                                  # hashes verified, engine from the bundle
    np.testing.assert_array_equal(loaded.run({"x": np.ones((1, 4), np.float32)})["y"], np.full((1, 4), 2.0))


def test_engine_this_tensorrt_cannot_load_is_not_adopted(monkeypatch, tmp_path):
    from edgemm.backends.tensorrt.package import adopt_engine
    from edgemm.errors import InputError

    stack = Stack().install(monkeypatch)
    stack.trt.Runtime.deserialize_cuda_engine = lambda self, data: None
    bundle = tmp_path / "b"
    _portable_bundle(bundle)
    before = (bundle / "manifest.json").read_bytes()
    engine = tmp_path / "other.engine"
    engine.write_bytes(b"plan of another TensorRT")
    with pytest.raises(InputError, match="cannot load this engine") as err:
        adopt_engine(bundle, engine)
    assert "build.sh" in str(err.value)
    assert (bundle / "manifest.json").read_bytes() == before and not (bundle / "model.engine").exists()


def test_each_call_runs_on_the_first_profile_that_holds_its_shapes(bundle, monkeypatch):
    # Old code built one profile and always used profile 0. The stand-in cannot prove TensorRT's
    # switching cost or that a real engine exposes its profiles like this.
    stack = Stack(profiles=(((1, 4), (1, 4), (1, 4)), ((2, 4), (32, 4), (32, 4)))).install(monkeypatch)
    sess = TensorRTSession(bundle, _manifest(), max_contexts=1, cuda_graph=True)
    for batch in (1, 8, 8, 1):
        x = np.ones((batch, 4), np.float32)
        np.testing.assert_array_equal(sess.run({"x": x})[0], 2 * x)
    switches = [c[2] for c in stack.calls if c[0] == "set_optimization_profile_async"]
    assert switches == [1, 0]
    # a profile switch drops the captured graph: capture again for the new shapes, never replay a stale one
    assert stack.names().count("cudaStreamBeginCapture") == 3 and stack.names().count("cudaGraphLaunch") == 1
    from edgemm.errors import InputError

    with pytest.raises(InputError, match="fit no optimization profile .*profile 1: x \\[2, 4\\]..\\[32, 4\\]"):
        sess.run({"x": np.ones((40, 4), np.float32)})


@pytest.mark.parametrize("integrated", [False, True])
def test_data_dependent_outputs_come_through_an_output_allocator(bundle, monkeypatch, integrated):
    # Old code refused any output whose shape TensorRT knows only after execution. The stand-in cannot
    # prove how real TensorRT sizes or aligns such outputs; it shows allocation, shape and copy-out.
    stack = Stack(data_dependent=True, integrated=integrated).install(monkeypatch)
    sess = TensorRTSession(bundle, _manifest(), cuda_graph=True)
    x = np.array([[1, 2, 3, 4], [-1, 0, 0, 0], [5, 6, 7, 8]], np.float32)
    for _ in range(2):
        np.testing.assert_array_equal(sess.run({"x": x})[0], 2 * x[[0, 2]])
    np.testing.assert_array_equal(sess.run({"x": -np.ones((2, 4), np.float32)})[0], np.zeros((0, 4), np.float32))
    assert stack.names().count("set_output_allocator") == 1     # set once per context
    assert "cudaStreamBeginCapture" not in stack.names()        # never captured


def _built_bundle(folder, options) -> None:
    from edgemm.runtime.manifest import sha256_file, write_json_atomic

    folder.mkdir()
    (folder / "model.onnx").write_bytes(b"old onnx")
    (folder / "model.engine").write_bytes(ENGINE)
    manifest = _manifest(options=options)
    manifest.update(precision={"mode": "fp16"}, target={"name": "jetson-orin-nx"})
    manifest["backend"].update(portable=False, onnx="model.onnx")
    manifest["files"] = {n: sha256_file(folder / n) for n in ("model.onnx", "model.engine")}
    write_json_atomic(folder / "manifest.json", manifest)


def test_refit_swaps_weights_and_records_the_new_engine_and_onnx(monkeypatch, tmp_path):
    # New capability (old code had none). The stand-in cannot prove TensorRT accepts the new weights; it
    # shows the Refitter/OnnxParserRefitter sequence and that the bundle stays verifiable afterwards.
    from edgemm import runtime
    from edgemm.backends.tensorrt.refit import refit_bundle

    stack = Stack().install(monkeypatch)
    bundle = tmp_path / "b"
    _built_bundle(bundle, {"refittable": True, "precision": "fp16"})
    new = tmp_path / "new.onnx"
    new.write_bytes(b"new weights onnx")
    refit_bundle(bundle, new)
    assert ("refit_from_file", "MainThread", str(new)) in stack.calls
    assert (bundle / "model.engine").read_bytes() == b"refitted plan"
    assert (bundle / "model.onnx").read_bytes() == b"new weights onnx" and new.read_bytes() == b"new weights onnx"
    runtime.load(bundle)        # every hash in the rewritten manifest matches


def test_refit_refused_for_a_non_refittable_engine_or_a_failed_refit(monkeypatch, tmp_path):
    from edgemm.backends.tensorrt.refit import refit_bundle
    from edgemm.errors import EdgemmError

    stack = Stack().install(monkeypatch)
    new = tmp_path / "new.onnx"
    new.write_bytes(b"w")
    plain = tmp_path / "plain"
    _built_bundle(plain, {"precision": "fp16"})
    with pytest.raises(BundleError, match="not built refittable"):
        refit_bundle(plain, new)
    refittable = tmp_path / "r"
    _built_bundle(refittable, {"refittable": True, "precision": "fp16"})
    before = {p.name: p.read_bytes() for p in refittable.iterdir()}
    stack.refit_ok = False
    with pytest.raises(EdgemmError, match="missing weights: fc.weight"):
        refit_bundle(refittable, new)
    assert {p.name: p.read_bytes() for p in refittable.iterdir()} == before     # nothing written


def _plan(version: tuple[int, int, int, int]) -> bytes:
    # The header layout trtexec --getPlanVersionOnly reads (samples/common/sampleEngines.cpp); the rest of a
    # real plan is not modelled.
    return b"ftrt" + (0).to_bytes(4, "little") + bytes(16) + bytes(version) + b"rest of the plan"


def test_plan_header_version_is_read_without_deserializing():
    from edgemm.runtime.tensorrt_session import plan_version, same_version

    assert plan_version(_plan((10, 3, 0, 30))) == "10.3.0.30"
    assert plan_version(b"not a plan" * 4) is None and plan_version(b"ftrt") is None
    assert same_version("10.3.0.30", "10.3.0") and not same_version("10.3.0.30", "10.3.0.26")
    assert not same_version("10.3.0", "10.3.1")


def test_engine_whose_header_disagrees_with_this_tensorrt_is_refused_before_deserializing(monkeypatch, tmp_path):
    # A manifest claiming 10.3.0.30 over a plan whose header says 10.4: the header wins, nothing is loaded.
    from edgemm.runtime.manifest import sha256_file

    stack = Stack(version="10.3.0.30").install(monkeypatch)
    (tmp_path / "model.engine").write_bytes(_plan((10, 4, 0, 26)))
    manifest = _manifest()
    manifest["files"]["model.engine"] = sha256_file(tmp_path / "model.engine")
    with pytest.raises(BundleError, match="engine header says TensorRT 10.4.0.26"):
        TensorRTSession(tmp_path, manifest)
    assert "deserialize" not in stack.names()


def test_adoption_reads_the_plan_version_before_loading(monkeypatch, tmp_path):
    from edgemm.backends.tensorrt.package import adopt_engine
    from edgemm.errors import InputError

    stack = Stack(version="10.3.0.30").install(monkeypatch)
    bundle = tmp_path / "b"
    _portable_bundle(bundle)
    other = tmp_path / "other.engine"
    other.write_bytes(_plan((10, 7, 0, 23)))
    with pytest.raises(InputError, match="built with TensorRT 10.7.0.23"):
        adopt_engine(bundle, other)
    assert "deserialize" not in stack.names()
    same = tmp_path / "same.engine"
    same.write_bytes(_plan((10, 3, 0, 30)))
    assert adopt_engine(bundle, same, runs=1)["plan_version"] == "10.3.0.30"
