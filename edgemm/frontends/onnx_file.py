"""ONNX files: export is skipped. External data must stay inside the model's folder."""

from __future__ import annotations

import os
import warnings
from pathlib import Path, PurePath

from ..errors import InputError, SecurityError, first_line
from ..paths import require_regular_file
from ..iospec import TensorSpec
from .base import LoadedModel, LoadOptions, sha256_of

# ONNX TensorProto elem_type -> numpy dtype name (the ones a bundle may expose)
ONNX_DTYPES = {1: "float32", 2: "uint8", 3: "int8", 6: "int32", 7: "int64", 9: "bool", 10: "float16",
               11: "float64"}


def load(spec: str, options: LoadOptions) -> LoadedModel:
    import onnx

    path = Path(spec)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf DecodeError and friends
        raise InputError(f"not a valid ONNX file ({first_line(exc, None)})", file=path,
                         fix="re-export the model, or check that the file was copied whole") from exc
    check_external_data(model, path)
    try:
        onnx.checker.check_model(str(path), full_check=True)  # full: shape inference too
    except Exception as exc:
        raise InputError(f"ONNX checker rejects the model ({first_line(exc, None)})", file=path,
                         fix="re-export with a current torch.onnx.export / opset") from exc
    from ..onnx_graph import graph_inputs

    specs = []
    for name, (elem_type, dims) in graph_inputs(model).items():
        dtype = ONNX_DTYPES.get(elem_type)
        if dtype is None:
            raise InputError(f"input {name!r} has unsupported element type {elem_type}", file=path,
                             field=name, fix="use float32/float16/int64/int32/uint8/bool inputs")
        shape = []
        for axis, d in enumerate(dims):
            if isinstance(d, int) and d > 0:
                shape.append(d)
            elif isinstance(d, str):
                shape.append("batch" if axis == 0 else d)
            else:
                shape.append("batch" if axis == 0 else f"{name}_dim{axis}")
        specs.append(TensorSpec(name, dtype, tuple(shape)))
    files = [path] + external_files(model, path)
    return LoadedModel(source=spec, format="onnx", sha256=sha256_of(*files), name=path.stem, onnx_path=path,
                       input_specs=specs, input_names=[s.name for s in specs])


def external_files(model, path: Path) -> list[Path]:
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    out = []
    for tensor in _all_tensors(model):
        if uses_external_data(tensor):
            out.append(path.parent / ExternalDataInfo(tensor).location)
    return sorted(set(out))


def _all_tensors(model):
    from onnx.external_data_helper import _get_all_tensors

    return _get_all_tensors(model)


def check_external_data(model, path: Path) -> None:
    """External data locations must be relative paths that resolve inside the model's folder."""
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    base = path.parent.resolve()
    for tensor in _all_tensors(model):
        if not uses_external_data(tensor):
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # unknown keys: onnx ignores them, and so does edgemm
                info = ExternalDataInfo(tensor)
        except ValueError as exc:  # a negative or non-numeric offset/length
            raise InputError(f"bad external data entry ({exc})", file=path, field=f"initializer {tensor.name!r}",
                             fix="re-export the model") from exc
        location = info.location
        pure = PurePath(location)
        target = (path.parent / location)
        if (not location or pure.is_absolute() or ".." in pure.parts or location.startswith(("/", "\\"))
                or (target.exists() and base not in target.resolve().parents)):
            raise SecurityError(f"external data location {location!r} escapes the model's folder", file=path,
                                field=f"initializer {tensor.name!r}",
                                fix="keep external data files next to the .onnx file with relative names")
        if not os.path.lexists(target):
            raise InputError(f"external data file {location!r} is missing", file=path,
                             field=f"initializer {tensor.name!r}", fix="copy it next to the .onnx file")
        require_regular_file(target, field=f"initializer {tensor.name!r}",
                             fix="external data must be a regular file next to the .onnx file")
        size = target.stat().st_size
        offset, length = info.offset or 0, info.length
        if offset < 0 or offset > size or (length is not None and (length < 0 or offset + length > size)):
            span = f"offset {offset}" + ("" if length is None else f" + length {length}")
            raise InputError(f"external data {span} lies beyond the end of {location!r} ({size} bytes)",
                             file=path, field=f"initializer {tensor.name!r}",
                             fix="re-export the model, or copy its external data file whole")
