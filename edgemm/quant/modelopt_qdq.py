"""INT8 / FP8 (E4M3) explicit quantization for TensorRT: modelopt's ONNX PTQ inserts QuantizeLinear /
DequantizeLinear pairs where TensorRT fuses them (TensorRT placement), calibrated on the CPU.

Precision then travels inside the ONNX file, which is what TensorRT 11 requires (no INT8 calibrator,
no --int8 flag) and what strongly typed TensorRT 10 builds honour.

Pitfalls handled here (DESIGN.md, and modelopt 0.47's source):
- modelopt calibrates with RANDOM data when none is given: calibration data is required, never empty.
- its CalibrationDataProvider asserts rather than explains: inputs are checked here first.
- it silently skips models that already hold Q/DQ nodes: refused here.
- it skips small layers (MatMul/Gemm with K or N < 16, GEMV with M or N == 1, FP8 Conv with <= 16
  channels), so a tiny model may get no Q/DQ at all: the result is verified and refused if empty.
- this placement is for TensorRT; on ONNX Runtime CPU it is slower than FP32, and FP8 Q/DQ does not
  run there at all.
"""

from __future__ import annotations

import inspect
import logging
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Mapping

import numpy as np

from ..capture import captured_output
from ..errors import DependencyError, EdgemmError, InputError, first_line, storage_error
from ..onnx_io import EXTERNAL_DATA_BYTES, save_onnx  # modelopt must write big models as external data
from .exclusions import anchored, unquantizable_nodes

__all__ = ["quantize_qdq", "inspect_qdq", "QDQ_DTYPES", "NothingToQuantize"]


class NothingToQuantize(InputError):
    """modelopt placed no Q/DQ node: the model has no layer it quantizes (a split part may then be built
    at a float precision instead of failing the whole compile)."""


log = logging.getLogger("edgemm")

# ONNX element type of the zero point / quantized tensor for each mode.
QDQ_DTYPES = {"int8": "INT8", "fp8": "FLOAT8E4M3FN"}
_HIGH_PRECISION = ("fp16", "bf16", "fp32")


def _import_modelopt():
    try:
        import modelopt
        from modelopt.onnx.quantization import quantize
    except ImportError as exc:
        raise DependencyError(f"nvidia-modelopt is not installed ({exc})",
                              fix="pip install 'edgemm[compile]' (installs nvidia-modelopt without its [onnx] extra)"
                              ) from exc
    from .ort_isolation import ort_quantization_restored

    return ort_quantization_restored()(quantize), getattr(modelopt, "__version__", "unknown")


def _require_target_dla(quantize, modelopt_version: str) -> None:
    """modelopt before 0.46 has no ``target_dla`` parameter and its ``**kwargs`` swallow it silently
    (the DLA Q/DQ placement came with NVIDIA/Model-Optimizer PR #1661): check the signature, which
    inspect follows through functools.wraps to modelopt's own function, before any calibration."""
    try:
        params = inspect.signature(quantize).parameters
    except (TypeError, ValueError):
        params = {}
    if "target_dla" not in params:
        raise DependencyError(f"nvidia-modelopt {modelopt_version} cannot place Q/DQ for DLA (its quantize() has "
                              f"no target_dla parameter)", fix="pip install 'nvidia-modelopt>=0.46', or drop --dla")


def _model_inputs(model) -> dict[str, tuple[list, int]]:
    """name -> (dims as int or None for dynamic, ONNX elem type); initializers are not inputs."""
    from ..onnx_graph import graph_inputs

    return {name: ([d if isinstance(d, int) and d > 0 else None for d in dims], elem_type)
            for name, (elem_type, dims) in graph_inputs(model).items()}


def _check_calib(calib: Mapping[str, np.ndarray], inputs: dict, source: str) -> dict[str, np.ndarray]:
    """Every input covered, samples along axis 0, same count everywhere, static dims respected."""
    from onnx import helper

    if not calib:
        raise InputError("no calibration data: modelopt would calibrate with random data", field="calib",
                         fix="pass --calib calib.npz with real samples for every input")
    missing = [n for n in inputs if n not in calib]
    extra = [n for n in calib if n not in inputs]
    if missing:
        raise InputError(f"calibration data has no array for input(s) {', '.join(map(repr, missing))}",
                         field=f"calib[{missing[0]!r}]", fix=f"the model takes {', '.join(inputs)}")
    if extra:
        raise InputError(f"calibration data has array(s) {', '.join(map(repr, extra))} the model does not take",
                         field=f"calib[{extra[0]!r}]", fix=f"the model takes {', '.join(inputs)}")
    checked, counts = {}, {}
    for name, (dims, elem_type) in inputs.items():
        arr = np.asarray(calib[name])
        field = f"calib[{name!r}]"
        want = np.dtype(helper.tensor_dtype_to_np_dtype(elem_type))
        if arr.ndim != len(dims):
            raise InputError(f"has shape {list(arr.shape)} (rank {arr.ndim}); the input has rank {len(dims)} "
                             f"and samples go along axis 0", field=field, fix="stack samples along axis 0")
        if arr.shape[0] == 0:
            raise InputError("holds no samples", field=field, fix="pass at least one sample per input")
        for axis, (got, need) in enumerate(zip(arr.shape[1:], dims[1:]), start=1):
            if need is not None and got != need:
                raise InputError(f"axis {axis} is {got}, the model needs {need}", field=field,
                                 fix="use calibration samples shaped like the model input")
        batch = dims[0]
        if batch is not None and arr.shape[0] % batch:
            raise InputError(f"{arr.shape[0]} samples do not split into the model's static batch of {batch}",
                             field=field, fix=f"use a multiple of {batch} samples")
        if arr.dtype != want:
            if arr.dtype.kind != want.kind or not np.can_cast(arr.dtype, want, casting="same_kind"):
                raise InputError(f"dtype {arr.dtype}, the input is {want}", field=field,
                                 fix=f"save it as {want}")
            arr = arr.astype(want)
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise InputError("contains NaN or Inf", field=field, fix="clean the calibration data")
        checked[name] = np.ascontiguousarray(arr)
        counts[name] = arr.shape[0] // (batch or 1)
    if len(set(counts.values())) > 1:
        raise InputError(f"inputs hold different numbers of samples {counts}", field="calib",
                         fix="give every input the same number of samples")
    return checked


def inspect_qdq(model) -> dict:
    """Q/DQ statistics of a model: pair counts, quantized element types, which ops consume DQ outputs."""
    from onnx import TensorProto

    inits = {i.name: i for i in model.graph.initializer}
    consts = {o: n for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    dtypes = Counter()
    for node in model.graph.node:
        if node.op_type != "QuantizeLinear":
            continue
        elem = None
        attrs = {a.name: a for a in node.attribute}
        if "output_dtype" in attrs and attrs["output_dtype"].i:
            elem = attrs["output_dtype"].i
        elif len(node.input) > 2 and node.input[2]:
            zp = node.input[2]
            if zp in inits:
                elem = inits[zp].data_type
            elif zp in consts:
                elem = next(a.t.data_type for a in consts[zp].attribute if a.name == "value")
        dtypes[TensorProto.DataType.Name(elem) if elem else "UINT8"] += 1  # ONNX default zero point is uint8
    dq_outputs = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    consumers = Counter(n.op_type for n in model.graph.node
                        if n.op_type not in ("QuantizeLinear", "DequantizeLinear") and dq_outputs & set(n.input))
    ops = Counter(n.op_type for n in model.graph.node)
    return {"quantize_linear": ops["QuantizeLinear"], "dequantize_linear": ops["DequantizeLinear"],
            "quantized_dtypes": dict(dtypes), "quantized_ops": dict(sorted(consumers.items()))}


def quantize_qdq(fp32_onnx: Path, out_onnx: Path, calib: Mapping[str, np.ndarray], mode: str, *,
                 exclude_nodes: list[str] | None = None, high_precision: str = "fp16",
                 calibration_method: str | None = None, op_types_to_exclude: list[str] | None = None,
                 target_dla: bool = False, auto_exclude: bool = True) -> dict:
    """Write ``out_onnx`` with INT8 or FP8-E4M3 Q/DQ nodes placed for TensorRT; return the manifest recipe.

    ``calib``: one array per model input, samples along axis 0 (real data; empty is refused).
    ``high_precision``: dtype of the layers left unquantized ("fp16" default, "bf16", or "fp32").
    ``exclude_nodes``: node-name regexes kept in high precision (e.g. a sensitive fusion head).
    ``target_dla``: INT8 only; modelopt then puts Q/DQ on every tensor, as DLA needs (may cost accuracy).
    ``auto_exclude``: keep attention-mask arithmetic and sentinel-valued tensors out of calibration and
    quantization (``exclusions.unquantizable_nodes``; recorded as ``auto_excluded``)."""
    import onnx

    fp32_onnx, out_onnx = Path(fp32_onnx), Path(out_onnx)
    if mode not in QDQ_DTYPES:
        raise InputError(f"unknown Q/DQ mode {mode!r}", field="precision", fix="use int8 or fp8")
    if high_precision not in _HIGH_PRECISION:
        raise InputError(f"unknown high precision {high_precision!r}", field="high_precision",
                         fix=f"use one of {', '.join(_HIGH_PRECISION)}")
    if calibration_method not in (None, "entropy", "max"):
        raise InputError(f"unknown calibration method {calibration_method!r}", field="calibration_method",
                         fix="use entropy or max")
    if not fp32_onnx.is_file():
        raise InputError("ONNX file not found", file=fp32_onnx)
    model = onnx.load(str(fp32_onnx), load_external_data=False)
    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node):
        raise InputError("the model already holds QuantizeLinear/DequantizeLinear nodes (modelopt would skip it)",
                         file=fp32_onnx, fix="export the FP32 model, not a quantized one")
    data = _check_calib(calib, _model_inputs(model), str(fp32_onnx))
    quantize, modelopt_version = _import_modelopt()
    if target_dla and mode == "int8":
        _require_target_dla(quantize, modelopt_version)
    method = calibration_method or "entropy"   # modelopt's default for int8 and fp8

    extra_files = _external_files(model, fp32_onnx.parent)
    external = fp32_onnx.stat().st_size + sum(p.stat().st_size for p in extra_files) > EXTERNAL_DATA_BYTES
    out_onnx.parent.mkdir(parents=True, exist_ok=True)
    # modelopt writes intermediate files next to its input: work on a copy in a private folder.
    with tempfile.TemporaryDirectory(prefix=".edgemm-qdq-", dir=out_onnx.parent) as tmp:
        work = Path(tmp)
        src = work / "model.onnx"
        for p in extra_files:
            target = work / p.relative_to(fp32_onnx.parent)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(p, target)
        shutil.copyfile(fp32_onnx, src)
        dst = work / "model.quant.onnx"
        auto = _auto_exclusions(fp32_onnx, src, data, work) if auto_exclude else {}
        exclude = list(exclude_nodes or []) + anchored(auto)
        error, output = _run_modelopt(quantize, src, dst, mode, data, method, exclude, op_types_to_exclude,
                                      high_precision, external, target_dla)
        fallback = None
        if error is not None and _histogram_failure(error) and method != "max":
            # A range no histogram can bin survived the exclusions: max calibration needs no bins.
            fallback = (f"{method} calibration failed ({_detail(error, output)}); calibrated with max instead")
            log.info("modelopt: %s", fallback)
            method = "max"
            error, output = _run_modelopt(quantize, src, dst, mode, data, method, exclude, op_types_to_exclude,
                                          high_precision, external, target_dla)
        if isinstance(error, EdgemmError):
            raise error
        if error is not None:
            raise InputError(f"modelopt {mode} quantization failed ({_detail(error, output)})", file=fp32_onnx,
                             fix="run with --verbose to see modelopt's log; keep the failing nodes out of "
                                 "quantization with --exclude (e.g. --exclude op:Softmax), or use --fp16") from error
        if not dst.is_file():
            last = output.last_line()
            raise InputError(f"modelopt wrote no quantized model for {mode}" + (f" (last output: {last})" if last
                                                                                else ""), file=fp32_onnx,
                             fix="run with --verbose to see modelopt's log")
        quantized = onnx.load(str(dst), load_external_data=False)
        stats = inspect_qdq(quantized)
        want = QDQ_DTYPES[mode]
        if stats["quantize_linear"] == 0:
            raise NothingToQuantize(f"modelopt placed no {mode} Q/DQ nodes: every layer was too small or excluded "
                             f"(it skips MatMul/Gemm with K or N < 16, GEMV with M or N == 1"
                             f"{', Conv with <= 16 channels' if mode == 'fp8' else ''})", file=fp32_onnx,
                             fix="use --fp16 for this model")
        wrong = {k: v for k, v in stats["quantized_dtypes"].items() if k != want}
        if wrong:
            raise InputError(f"modelopt produced Q/DQ types {wrong}, expected only {want}", file=fp32_onnx,
                             fix="report this modelopt version; use --fp16 meanwhile")
        _move_model(dst, out_onnx, external)

    return {
        "tool": "modelopt.onnx.quantization.quantize",
        "modelopt_version": modelopt_version,
        "mode": mode,
        "quantized_dtype": want,
        "placement": "tensorrt",
        "calibration_method": method,
        "calibration_eps": ["cpu"],
        "calibration_samples": int(next(iter(data.values())).shape[0]),
        "high_precision_dtype": high_precision,
        "nodes_to_exclude": list(exclude_nodes or []),
        "auto_excluded": auto,
        "calibration_fallback": fallback,
        "op_types_to_exclude": list(op_types_to_exclude or []),
        "target_dla": bool(target_dla and mode == "int8"),
        "qdq": stats,
        "runs_on_onnxruntime_cpu": mode == "int8",
        "notes": ("Q/DQ placed for TensorRT explicit quantization; on ONNX Runtime CPU this graph runs slower "
                  "than FP32" if mode == "int8" else
                  "FP8 E4M3 Q/DQ for TensorRT on compute capability >= 8.9; ONNX Runtime CPU cannot run it, so "
                  "accuracy measured on a CPU is simulated"),
    }


_AUTO_CACHE: dict = {}   # the accuracy search quantizes one model many times: probe it once


def _auto_exclusions(fp32_onnx: Path, copy: Path, data: Mapping[str, np.ndarray], work: Path) -> dict[str, str]:
    """exclusions.unquantizable_nodes of ``copy`` (a private copy of ``fp32_onnx``), cached per source file
    and calibration data."""
    import hashlib

    stat = fp32_onnx.stat()
    digest = hashlib.sha256()
    for name in sorted(data):
        digest.update(name.encode() + str(data[name].shape).encode() + data[name].tobytes())
    key = (str(fp32_onnx.resolve()), stat.st_size, stat.st_mtime_ns, digest.hexdigest())
    if key not in _AUTO_CACHE:
        if len(_AUTO_CACHE) >= 4:
            _AUTO_CACHE.pop(next(iter(_AUTO_CACHE)))
        _AUTO_CACHE[key] = unquantizable_nodes(copy, data, work)
    return dict(_AUTO_CACHE[key])


def _run_modelopt(quantize, src: Path, dst: Path, mode: str, data, method: str, exclude: list[str],
                  op_types_to_exclude, high_precision: str, external: bool, target_dla: bool):
    """One modelopt call; returns (the exception it raised or None, its captured output)."""
    # modelopt, ONNX Runtime's calibrator (progress bars), polygraphy and modelopt's logger print to
    # stdout/stderr: capture it all; --verbose shows it through the "edgemm" logger.
    with captured_output() as output:
        try:
            quantize(
                onnx_path=str(src),
                quantize_mode=mode,
                calibration_data=data,
                calibration_method=method,
                calibration_eps=["cpu"],
                nodes_to_exclude=list(exclude),
                op_types_to_exclude=list(op_types_to_exclude or []) or None,
                high_precision_dtype=high_precision,
                use_external_data_format=external,
                target_dla=bool(target_dla and mode == "int8"),
                output_path=str(dst),
                log_level="WARNING",
            )
            error = None
        except Exception as exc:  # modelopt and ORT raise many types; reported as one line by the caller
            if (disk := storage_error(exc)) is not None:
                raise disk from exc
            error = exc
    if output.text:
        log.info("modelopt %s quantization output (%s calibration):\n%s", mode, method, output.text)
    return error, output


def _histogram_failure(error: BaseException) -> bool:
    text = str(error)
    return "bins" in text and ("Too many" in text or "finite-sized" in text)


def _detail(error: BaseException, output) -> str:
    first = " ".join(first_line(error, None, default="").split())[:200]
    detail = f"{type(error).__name__}: {first}" if first else type(error).__name__
    last = output.last_line()
    if last and last not in detail and "Warning" not in last:
        detail += f"; modelopt's last output: {last}"
    return detail


def _external_files(model, folder: Path) -> list[Path]:
    """Files holding the model's external data (relative to its folder; escaping paths refused)."""
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    files = []
    for loc in sorted({ExternalDataInfo(t).location for t in model.graph.initializer if uses_external_data(t)}):
        rel = Path(loc)
        if rel.is_absolute() or ".." in rel.parts or not (folder / rel).is_file():
            raise InputError(f"external data {loc!r} is missing or outside the model folder", file=folder,
                             fix="keep the .onnx file and its data file side by side")
        files.append(folder / rel)
    return files


def _move_model(src: Path, dst: Path, external: bool) -> None:
    """Put the quantized model in place atomically; big models keep external data under the final name."""
    import onnx

    if external:
        save_onnx(onnx.load(str(src), load_external_data=True), dst, external=True)
        return
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
