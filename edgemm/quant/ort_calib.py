"""Calibration data for ONNX Runtime's quantizers: checked against the model's inputs, cut into one feed
per model call, and read back through ORT's ``CalibrationDataReader`` interface."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from ..errors import InputError

__all__ = ["input_specs", "check_calib", "split_feeds", "FeedReader"]


def input_specs(model) -> dict[str, tuple[np.dtype, list]]:
    import onnx

    from ..onnx_graph import graph_inputs

    return {name: (np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)),
                   [d if isinstance(d, int) else None for d in dims])
            for name, (elem_type, dims) in graph_inputs(model).items()}


def check_calib(calib: Mapping[str, np.ndarray], specs: dict, source: object) -> dict[str, np.ndarray]:
    """Validated copy of ``calib``: every input present, same sample count, castable dtype, right rank."""
    if not isinstance(calib, Mapping) or not calib:
        raise InputError("calibration data is empty", file=source, field="calib",
                         fix="pass a dict of arrays, one per model input, samples along axis 0")
    out, counts = {}, set()
    for name, (dtype, dims) in specs.items():
        field_name = f"calib['{name}']"
        if name not in calib:
            raise InputError(f"missing model input (have {sorted(calib)})", file=source, field=field_name,
                             fix="provide an array for every model input")
        arr = np.asarray(calib[name])
        if arr.ndim != len(dims):
            raise InputError(f"rank {arr.ndim} does not match the model's rank {len(dims)} (samples along "
                             "axis 0, batch dim kept)", file=source, field=field_name,
                             fix=f"give an array of shape {['N' if d is None else d for d in dims]}")
        if arr.dtype != dtype:
            if not np.can_cast(arr.dtype, dtype, casting="same_kind"):
                raise InputError(f"dtype {arr.dtype} cannot feed a {dtype} input", file=source,
                                 field=field_name, fix=f"store this input as {dtype}")
            arr = arr.astype(dtype)
        for axis, want in enumerate(dims[1:], start=1):
            if want and arr.shape[axis] != want:
                raise InputError(f"axis {axis} has size {arr.shape[axis]}, the model wants {want}",
                                 file=source, field=field_name, fix="match the model's input shape")
        counts.add(arr.shape[0])
        out[name] = arr
    if len(counts) != 1:
        raise InputError(f"inputs have different sample counts {sorted(counts)}", file=source, field="calib",
                         fix="give every input the same number of samples along axis 0")
    if counts.pop() == 0:
        raise InputError("calibration data has zero samples", file=source, field="calib",
                         fix="provide at least one sample")
    return out


def split_feeds(calib: dict[str, np.ndarray], specs: dict) -> list[dict[str, np.ndarray]]:
    """One feed per model call: a slice of the model's batch size along axis 0 (1 when dynamic)."""
    batch = max((dims[0] for _, dims in specs.values() if dims and dims[0]), default=1)
    n = next(iter(calib.values())).shape[0]
    if n < batch:
        raise InputError(f"{n} calibration samples, but the model's batch size is fixed at {batch}",
                         field="calib", fix=f"provide at least {batch} samples, or export with a dynamic batch")
    return [{k: v[i:i + batch] for k, v in calib.items()} for i in range(0, n - batch + 1, batch)]


class FeedReader:
    """``onnxruntime.quantization.CalibrationDataReader`` over a list of feeds."""

    def __init__(self, feeds: Sequence[dict]):
        self._feeds = list(feeds)
        self._it = iter(self._feeds)

    def get_next(self):
        return next(self._it, None)

    def rewind(self):
        self._it = iter(self._feeds)
