"""Backends: how a precision-marked ONNX file becomes deployable artefacts, and how they run.

- ``base.py``: the ``Backend`` interface (package, tune, parity runner, runtime session, target checks,
  quantizes_as, split parts, Triton serving); ``registry.py``: backends by name
  (``registry.get(manifest.backend.name)``).
- ``ort/``: ONNX Runtime (the embedded CPU default): the bundle holds the ONNX file itself.
- ``tensorrt/``: TensorRT engines, or portable bundles finished on the device (``edgemm build``).

To add a backend: ``<name>/backend.py`` with a ``Backend`` subclass, a line in ``registry.BACKENDS``, and
its torch-free session in ``edgemm/runtime/<name>_session.py`` (opened by ``Backend.open_session``).
"""
