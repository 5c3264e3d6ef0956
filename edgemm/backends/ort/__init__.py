"""ONNX Runtime backend: the bundle holds the (precision-transformed) ONNX file itself; the runtime
session lives in edgemm/runtime/ort_session.py."""

from __future__ import annotations

import shutil
from pathlib import Path


def package(onnx_path: Path, stage_dir: Path, target, recipe: dict | None = None) -> dict:
    shutil.copyfile(onnx_path, stage_dir / "model.onnx")
    section = {"name": "onnxruntime", "model": "model.onnx", "providers": ["CPUExecutionProvider"]}
    disabled = (recipe or {}).get("ort_disabled_optimizers")
    if disabled:  # the recipe search timed the model with these off; the runtime must match
        section["disabled_optimizers"] = list(disabled)
    return section


def package_part(onnx_path: Path, stage_dir: Path, part: str, folder: str, recipe: dict | None = None) -> dict:
    """A split bundle's part: its ONNX file as ``folder/<part>.onnx`` (path relative to the bundle)."""
    rel = f"{folder}/{part}.onnx"
    shutil.copyfile(onnx_path, stage_dir / rel)
    section = {"model": rel}
    disabled = (recipe or {}).get("ort_disabled_optimizers")
    if disabled:
        section["disabled_optimizers"] = list(disabled)
    return section
