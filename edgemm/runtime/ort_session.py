"""ONNX Runtime backend session (CPU by default)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import BundleError, DependencyError
from .manifest import safe_relpath


class OrtSession:
    backend = "onnxruntime"

    def __init__(self, bundle_dir: Path, manifest: dict, *, providers: list[str] | None = None,
                 intra_op_threads: int = 0):
        try:
            import onnxruntime as ort
        except ImportError as exc:  # pragma: no cover - onnxruntime is a core dependency
            raise DependencyError("onnxruntime is not installed", fix="pip install onnxruntime") from exc
        model_rel = manifest["backend"].get("model")
        if not isinstance(model_rel, str):
            raise BundleError("missing model file name", file=bundle_dir / "manifest.json",
                              field="backend.model", fix="recompile the bundle")
        model_path = safe_relpath(bundle_dir, model_rel, source=str(bundle_dir / "manifest.json"))
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if intra_op_threads:
            opts.intra_op_num_threads = intra_op_threads
        # Idle worker threads would otherwise spin for a while after each call, stealing the cores from
        # whatever runs next (the app's own pre-processing, or the reference in a side-by-side timing).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            # Read the model ourselves: ORT then never resolves paths (e.g. external data) on its own.
            self._session = ort.InferenceSession(model_path.read_bytes(), opts,
                                                 providers=providers or ["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises bare RuntimeError-like types for invalid graphs
            raise BundleError(f"ONNX Runtime cannot load the model: {exc}", file=model_path,
                              fix="recompile the bundle") from exc
        self._output_names = [o["name"] for o in manifest["outputs"]]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        # InferenceSession.run is documented thread-safe: one session serves all threads.
        return self._session.run(self._output_names, feeds)
