"""OpenVINO backend session (CPU): an OpenVINO IR (model.xml + weights.bin) read from hash-checked bytes.

Imports openvino only when a bundle variant needs it (``pip install 'edgemm[openvino]'``); never torch.
The manifest's backend section: ``{"name": "openvino", "model": "<rel>.xml", "weights": "<rel>.bin",
"inference_precision": "f32" | "bf16" | "f16", "threads": N}`` (threads 0: OpenVINO's default).
"""

from __future__ import annotations

import queue

import numpy as np

from ..errors import BundleError, DependencyError
from .manifest import MANIFEST_NAME, Manifest, safe_relpath
from .ort_session import _read_verified

INFERENCE_PRECISIONS = ("f32", "bf16", "f16")
# OpenVINO element type names -> the numpy dtype names manifests use
_OV_DTYPES = {"f32": "float32", "f16": "float16", "f64": "float64", "i64": "int64", "i32": "int32", "i8": "int8",
              "u8": "uint8", "boolean": "bool"}


def openvino_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("openvino") is not None


class OpenVinoSession:
    backend = "openvino"

    def __init__(self, bundle_dir, manifest: Manifest | dict, *, intra_op_threads: int = 0, providers=None):
        try:
            import openvino as ov
        except ImportError as exc:
            raise DependencyError("this bundle variant runs on OpenVINO, which is not installed",
                                  fix="pip install 'edgemm[openvino]'") from exc
        source = bundle_dir / MANIFEST_NAME
        manifest = Manifest.of(manifest, source=source)
        section = manifest.backend
        rels = {}
        for key in ("model", "weights"):
            rel = section.get(key)
            if not isinstance(rel, str):
                raise BundleError(f"missing {key} file name", file=source, field=f"backend.{key}",
                                  fix="recompile the bundle")
            rels[key] = rel
        precision = section.get("inference_precision", "f32")
        if precision not in INFERENCE_PRECISIONS:
            raise BundleError(f"inference_precision {precision!r} is not one of {', '.join(INFERENCE_PRECISIONS)}",
                              file=source, field="backend.inference_precision", fix="recompile the bundle")
        threads = intra_op_threads or section.get("threads", 0)
        if isinstance(threads, bool) or not isinstance(threads, int) or not 0 <= threads <= 1024:
            raise BundleError(f"must be an integer from 0 to 1024, not {threads!r}", file=source,
                              field="backend.threads", fix="recompile the bundle")
        # The very bytes that were hashed (no window between check and use): OpenVINO never opens a bundle
        # file itself, so a file swapped after the check, or one the manifest does not list, is never read.
        xml, weights = (_read_verified(bundle_dir, manifest, rels[k],
                                       safe_relpath(bundle_dir, rels[k], source=str(source), field=f"backend.{k}"),
                                       field=f"backend.{k}") for k in ("model", "weights"))
        core = ov.Core()
        try:
            model = core.read_model(xml, ov.Tensor(np.frombuffer(weights, dtype=np.uint8)))
        except Exception as exc:  # OpenVINO raises RuntimeError subclasses with multi-line messages
            raise BundleError(f"OpenVINO cannot read the model ({' '.join(str(exc).split())[:300]})",
                              file=bundle_dir / rels["model"], field="backend.model",
                              fix="recompile the bundle, or install the OpenVINO version that built it") from exc
        config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        self._compiled = core.compile_model(model, "CPU", config)
        self.inference_precision = str(self._compiled.get_property("INFERENCE_PRECISION_HINT"))
        self._names = [port.get_any_name() for port in self._compiled.outputs]
        _check_io(self._compiled, manifest, source)
        self._output_order = [self._names.index(name) for name in manifest.output_names]
        # One infer request per concurrent caller (a request is not re-entrant); reused across calls.
        self._requests: queue.SimpleQueue = queue.SimpleQueue()

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        try:
            request = self._requests.get_nowait()
        except queue.Empty:
            request = self._compiled.create_infer_request()
        try:
            results = request.infer(feeds)
            values = [np.array(results[self._compiled.outputs[i]], copy=True) for i in self._output_order]
        finally:
            self._requests.put(request)
        return values


def _check_io(compiled, manifest: Manifest, source) -> None:
    """The manifest's inputs and outputs (names, dtypes, ranks) must be the model's own."""
    for key, ports in (("inputs", compiled.inputs), ("outputs", compiled.outputs)):
        by_name = {}
        for port in ports:
            for name in port.get_names():
                by_name[name] = port
        for i, spec in enumerate(getattr(manifest, key)):
            port = by_name.get(spec["name"])
            if port is None:
                raise BundleError(f"the model has no {key[:-1]} {spec['name']!r}", file=source, field=f"{key}[{i}]",
                                  fix="recompile the bundle")
            want = _OV_DTYPES.get(port.get_element_type().get_type_name())
            if want is not None and want != spec["dtype"]:
                raise BundleError(f"dtype {spec['dtype']} in the manifest but {want} in the model", file=source,
                                  field=f"{key}[{i}].dtype", fix="recompile the bundle")
            rank = port.get_partial_shape().rank
            if rank.is_static and rank.get_length() != len(spec["shape"]):
                raise BundleError(f"rank {len(spec['shape'])} in the manifest but {rank.get_length()} in the model",
                                  file=source, field=f"{key}[{i}].shape", fix="recompile the bundle")
