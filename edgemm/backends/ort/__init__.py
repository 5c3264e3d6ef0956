"""ONNX Runtime backend: the bundle holds the (precision-transformed) ONNX file itself; the runtime
session lives in edgemm/runtime/ort_session.py."""

from __future__ import annotations

import shutil
from pathlib import Path


def package(onnx_path: Path, stage_dir: Path, target, options=None) -> dict:
    shutil.copyfile(onnx_path, stage_dir / "model.onnx")
    return {"name": "onnxruntime", "model": "model.onnx", "providers": ["CPUExecutionProvider"]}
