"""Backends: how a precision-marked ONNX file becomes deployable artefacts.

- ``ort/``: ONNX Runtime (the embedded CPU default) — the bundle holds the ONNX file itself.
- ``tensorrt/``: TensorRT engines, or portable bundles finished on the device (``edgemm build``).

To add a backend: a package here with ``package(onnx_path, stage_dir, target, options) -> dict`` (the
manifest's "backend" section) and a session class in ``edgemm/runtime/``.
"""
