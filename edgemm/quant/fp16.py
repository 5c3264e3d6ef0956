"""FP16 / BF16 ONNX conversion.

- TensorRT targets: modelopt AutoCast (``convert_to_mixed_precision``), the conversion NVIDIA documents
  for strongly typed TensorRT 11 builds, where precision must be in the graph
  (https://docs.nvidia.com/deeplearning/tensorrt/latest/api/migration/tensorrt-10x-to-11x-python-api-patterns.html).
  AutoCast keeps nodes in FP32 when their values overflow FP16 (``data_max``). It finds them by running
  the model on reference data; without real samples that run would use random inputs, so edgemm then
  disables the activation check (``data_max=inf``) and keeps only the initializer-range check.
- Other targets (ONNX Runtime): onnxconverter-common's float16 converter; also the fallback when
  AutoCast fails on a model, recorded in the recipe.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ..errors import DependencyError, InputError, storage_error
from ..onnx_io import is_large, save_onnx

__all__ = ["to_fp16"]

_DATA_MAX = 512.0   # AutoCast's default: activations beyond this stay FP32
def _summary(model) -> dict:
    from collections import Counter

    from onnx import TensorProto

    init = Counter(TensorProto.DataType.Name(t.data_type) for t in model.graph.initializer)
    casts = sum(1 for n in model.graph.node if n.op_type == "Cast")
    return {"initializer_dtypes": dict(init), "cast_nodes": casts, "nodes": len(model.graph.node)}


def _split_consumed_outputs(model) -> int:
    """Give every graph output that other nodes also read its own Identity node.

    Why: onnxconverter-common (1.16) with keep_io_types casts such an output back to float32 under its
    own name, so the in-graph consumers read float32 next to float16 tensors (seen here as a Concat
    type error on a dynamo-exported model). Consumers now read the internal float16 tensor."""
    from onnx import helper

    graph = model.graph
    consumed = {i for n in graph.node for i in n.input}
    split = 0
    for out in graph.output:
        if out.name not in consumed:
            continue
        internal = f"{out.name}__edgemm_internal"
        for node in graph.node:
            for k, name in enumerate(node.output):
                if name == out.name:
                    node.output[k] = internal
            for k, name in enumerate(node.input):
                if name == out.name:
                    node.input[k] = internal
        graph.node.append(helper.make_node("Identity", [internal], [out.name], name=f"{out.name}__edgemm_output"))
        split += 1
    return split


def _type_error(model) -> str | None:
    """Strict ONNX type inference: a converter that mixed float16 and float32 inputs is caught here."""
    import onnx

    if is_large(model):
        return None  # in-memory inference cannot take protobufs near 2 GiB; ONNX Runtime still checks at load
    try:
        onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except Exception as exc:  # noqa: BLE001 - onnx raises several error types
        return " ".join(str(exc).split())[:200]
    return None


def autocast(fp32_onnx: Path, low: str, *, keep_io_types: bool = True, calib: Mapping[str, np.ndarray] | None = None,
             max_samples: int | None = None, exclude_patterns: Sequence[str] = ()):
    """modelopt AutoCast of ``fp32_onnx`` to ``low`` (a ModelProto), the nodes matching ``exclude_patterns``
    (regexes) kept FP32. Its data-range check runs on ``calib``'s real samples only (the first
    ``max_samples``), never on random data; what it prints is logged, not shown."""
    try:
        from modelopt.onnx.autocast import convert_to_mixed_precision
        from modelopt.onnx.logging_config import configure_logging
    except ImportError as exc:
        raise DependencyError(f"nvidia-modelopt is not installed ({exc})", fix="pip install 'edgemm[compile]'") from exc
    import logging

    configure_logging(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="edgemm-autocast-") as tmp:
        calib_path = None
        if calib:
            calib_path = str(Path(tmp) / "reference.npz")
            np.savez(calib_path, **{k: np.asarray(v)[:max_samples] for k, v in calib.items()})
        from ..capture import captured_output

        # AutoCast prints progress and notes ("Shared constants were detected..."): logged, not shown.
        with captured_output() as out:
            model = convert_to_mixed_precision(
                onnx_path=str(fp32_onnx),
                low_precision_type=low,
                nodes_to_exclude=list(exclude_patterns) or None,
                keep_io_types=keep_io_types,
                calibration_data=calib_path,
                data_max=_DATA_MAX if calib_path else np.inf,
                providers=["cpu"],
            )
        if out.text.strip():
            logging.getLogger("edgemm").info("modelopt AutoCast output:\n%s", out.text.rstrip())
    return model


def to_fp16(fp32_onnx: Path, out_onnx: Path, *, keep_io_types: bool = True, for_tensorrt: bool,
            low_precision: str = "fp16", calib: Mapping[str, np.ndarray] | None = None) -> dict:
    """Convert ``fp32_onnx`` to FP16 (or BF16, TensorRT only) at ``out_onnx``; return the manifest recipe.

    ``calib`` (optional): real samples per input; AutoCast uses them to keep overflow-prone nodes in FP32."""
    import onnx

    fp32_onnx, out_onnx = Path(fp32_onnx), Path(out_onnx)
    if low_precision not in ("fp16", "bf16"):
        raise InputError(f"unknown low precision {low_precision!r}", field="precision", fix="use fp16 or bf16")
    if low_precision == "bf16" and not for_tensorrt:
        raise InputError("bf16 conversion is for TensorRT targets", field="precision",
                         fix="use --fp16 for ONNX Runtime targets")
    if not fp32_onnx.is_file():
        raise InputError("ONNX file not found", file=fp32_onnx)
    recipe = {"mode": low_precision, "keep_io_types": keep_io_types}
    fallback_reason = None
    if for_tensorrt:
        from modelopt import __version__ as modelopt_version

        try:
            model = autocast(fp32_onnx, low_precision, keep_io_types=keep_io_types, calib=calib)
        except DependencyError:
            raise
        except Exception as exc:  # noqa: BLE001 - AutoCast failures vary; fall back and record why
            if (disk := storage_error(exc)) is not None:
                raise disk from exc
            if low_precision == "bf16":
                raise InputError(f"modelopt AutoCast failed ({' '.join(str(exc).split())[:200]})",
                                 file=fp32_onnx, fix="use --fp16") from exc
            fallback_reason = f"AutoCast failed: {' '.join(str(exc).split())[:200]}"
        else:
            problem = _type_error(model)
            if problem and low_precision == "bf16":
                raise InputError(f"modelopt AutoCast produced an invalid graph ({problem})", file=fp32_onnx,
                                 fix="use --fp16")
            if problem:
                fallback_reason = f"AutoCast produced an invalid graph: {problem}"
        if not fallback_reason:
            recipe.update(tool="modelopt.onnx.autocast.convert_to_mixed_precision", modelopt_version=modelopt_version,
                          data_max=_DATA_MAX if calib else None, reference_samples=(
                              int(next(iter(calib.values())).shape[0]) if calib else 0),
                          providers=["cpu"])
    if not for_tensorrt or fallback_reason:
        try:
            from onnxconverter_common import __version__ as occ_version
            from onnxconverter_common.float16 import convert_float_to_float16
        except ImportError as exc:
            raise DependencyError(f"onnxconverter-common is not installed ({exc})",
                                  fix="pip install 'edgemm[compile]'") from exc
        source = onnx.load(str(fp32_onnx))
        split = _split_consumed_outputs(source) if keep_io_types else 0
        # The converter warns (UserWarning, to stderr) about every constant it clamps to the FP16 range;
        # keep those in the recipe instead, so the CLI's output stays ours.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = convert_float_to_float16(source, keep_io_types=keep_io_types)
        recipe.update(tool="onnxconverter_common.float16.convert_float_to_float16",
                      onnxconverter_common_version=occ_version, outputs_split=split)
        if caught:
            unique = sorted({" ".join(str(w.message).split())[:160] for w in caught})
            recipe["converter_warnings"] = {"count": len(caught), "first": unique[:3]}
        if fallback_reason:
            recipe["fallback"] = fallback_reason
        problem = _type_error(model)
        if problem and not for_tensorrt:
            # The converter produced an inconsistent graph: AutoCast also runs on the CPU, use it instead.
            model = autocast(fp32_onnx, low_precision, keep_io_types=keep_io_types, calib=calib)
            from modelopt import __version__ as modelopt_version
            recipe.update(tool="modelopt.onnx.autocast.convert_to_mixed_precision", modelopt_version=modelopt_version,
                          fallback=f"onnxconverter-common produced an invalid graph: {problem}")
            problem = _type_error(model)
        if problem:
            raise InputError(f"FP16 conversion produced an invalid graph ({problem})", file=fp32_onnx,
                             fix="compile with --fp32, or report the model")
    save_onnx(model, out_onnx)
    recipe["graph"] = _summary(model)
    return recipe
