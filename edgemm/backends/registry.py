"""Backends by name: the one place that lists them. ``get(name)`` imports the backend's module on first
use, so that a runtime or CLI call pays only for the backend it runs.

To add a backend: a ``Backend`` subclass (``edgemm/backends/base.py``) in ``edgemm/backends/<name>/backend.py``
and one line in ``BACKENDS``; third-party code may call ``register`` instead.
"""

from __future__ import annotations

import importlib

from ..errors import InputError
from .base import Backend

# name -> "module:class" (relative to edgemm.backends), imported lazily.
BACKENDS: dict[str, str] = {
    "onnxruntime": "ort.backend:OrtBackend",
    "openvino": "openvino.backend:OpenVinoBackend",
    "tensorrt": "tensorrt.backend:TensorRTBackend",
}
_LOADED: dict[str, Backend] = {}


def names() -> tuple[str, ...]:
    return tuple(BACKENDS) + tuple(n for n in _LOADED if n not in BACKENDS)


def register(backend: Backend) -> Backend:
    """Make ``backend`` available by its name (replaces a backend of the same name)."""
    if not backend.name:
        raise ValueError("a backend needs a name")
    _LOADED[backend.name] = backend
    return backend


def unregister(name: str) -> None:
    """Forget a backend added with ``register`` (tests); shipped backends load again on next use."""
    _LOADED.pop(name, None)


def get(name: str) -> Backend:
    """The backend called ``name``; InputError (one line) for a name no backend has."""
    if name in _LOADED:
        return _LOADED[name]
    where = BACKENDS.get(name)
    if where is None:
        raise InputError(f"unknown backend {name!r} (known: {', '.join(names())})", field="backend",
                         fix="use one of the known backends, or upgrade edgemm")
    module, cls = where.split(":")
    backend = getattr(importlib.import_module(f"{__package__}.{module}"), cls)()
    _LOADED[name] = backend
    return backend
