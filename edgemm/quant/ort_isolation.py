"""modelopt's ONNX quantizer monkey-patches onnxruntime.quantization's calibrators and quantizers
process-wide (modelopt/onnx/quantization/ort_patching.py: patch_ort_modules) and never undoes it.
After one TensorRT-style quantization, ORT's own static quantization in the same process then breaks
(QLinearConv loses its activation ranges). This puts ORT back as it was after every modelopt call."""

from __future__ import annotations

import contextlib

# (module, class or None, attribute) that patch_ort_modules replaces.
_PATCHED = (
    ("onnxruntime.quantization.calibrate", "MinMaxCalibrater",
     ("augment_graph", "collect_data", "compute_data", "merge_range")),
    ("onnxruntime.quantization.calibrate", "HistogramCalibrater", ("augment_graph", "collect_data")),
    ("onnxruntime.quantization.calibrate", "HistogramCollector",
     ("collect", "collect_value", "collect_absolute_value")),
    ("onnxruntime.quantization.calibrate", "CalibraterBase",
     ("__init__", "create_inference_session", "select_tensors_to_calibrate")),
    ("onnxruntime.quantization.calibrate", None, ("create_calibrator",)),
    ("onnxruntime.quantization.qdq_quantizer", "QDQQuantizer", ("check_opset_version",)),
    ("onnxruntime.quantization.base_quantizer", "BaseQuantizer", ("adjust_tensor_ranges",)),
)


@contextlib.contextmanager
def ort_quantization_restored():
    """Also a decorator (``ort_quantization_restored()(fn)``): contextlib's context managers are."""
    import importlib

    saved = []
    for module_name, cls_name, attrs in _PATCHED:
        try:
            owner = importlib.import_module(module_name)
            owner = getattr(owner, cls_name) if cls_name else owner
        except (ImportError, AttributeError):
            continue
        for attr in attrs:
            # Read from the class __dict__ so inherited attributes are restored as "absent".
            saved.append((owner, attr, owner.__dict__.get(attr, _ABSENT) if cls_name else getattr(owner, attr)))
    try:
        yield
    finally:
        for owner, attr, value in saved:
            if value is _ABSENT:
                if attr in owner.__dict__:
                    delattr(owner, attr)
            else:
                setattr(owner, attr, value)


_ABSENT = object()
