"""OpenVINO backend (CPU): OpenVINO IR variants of a CPU bundle, built from the FP32 ONNX.

Why OpenVINO's runtime directly and not ONNX Runtime's OpenVINO execution provider (measured on this
project's hosts, MiniLM-fused seq 128):
* on the Intel AMX host of issue #20 both ran within a few % of each other (BF16 via AMX);
* on an AMD EPYC host (AVX512-BF16 + VNNI, no AMX) ``onnxruntime-ep-openvino`` 1.8.1 registers but
  offers **no device** (``ort.get_ep_devices()`` lists only the CPU provider): the plugin enumerates
  Intel hardware only, while OpenVINO's own CPU plugin runs there (BF16 0.57x / NNCF INT8 0.41x of ORT
  FP32 at batch 1). One engine that runs on every x86 and Arm CPU beats an API kept uniform.
* a bundle variant must be read from hash-checked bytes: ``Core.read_model(xml_bytes, weights_tensor)``
  does that; the plugin EP gets the model from ORT's bytes but compiles with OpenVINO's own caches.

The runtime session is ``edgemm/runtime/openvino_session.py`` (openvino only, no torch, no nncf).
INT8 is NNCF post-training quantization with ``model_type=TRANSFORMER`` (SmoothQuant on the MatMuls,
attention kept accurate), nodes kept in float named by ``ignored`` (ONNX node names; OpenVINO keeps them
as friendly names, ``<name>`` or ``<name>/...`` for the ops a node became).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import numpy as np

VARIANT_DIR = "openvino"


def available() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("openvino", "nncf"))


def read_onnx(onnx_path: Path):
    import openvino as ov

    return ov.Core().read_model(str(onnx_path))


def openvino_names(onnx_model, nodes: Sequence[str]) -> list[str]:
    """The friendly names OpenVINO gives ONNX ``nodes``: the node name, or for a node writing a graph output,
    that output's name (OpenVINO names the op after the result it produces)."""
    graph_outputs = {o.name for o in onnx_model.graph.output}
    wanted = set(nodes)
    names = set(wanted)
    for node in onnx_model.graph.node:
        if node.name in wanted:
            names.update(o for o in node.output if o in graph_outputs)
    return sorted(names)


def quantize_int8(model, feeds: Sequence[dict[str, np.ndarray]], *, ignored: Sequence[str] = (),
                  smooth_quant_alpha: float | None = None):
    """NNCF PTQ of an ``openvino.Model`` on ``feeds`` (one model call each); ``ignored``: OpenVINO friendly
    names (``openvino_names``) kept float; ``smooth_quant_alpha``: SmoothQuant's migration strength for
    MatMuls (NNCF's TRANSFORMER default, 0.95, when None)."""
    import contextlib
    import io
    import logging

    import nncf

    scope = nncf.IgnoredScope(patterns=[re.escape(n) + r"(/.*)?" for n in ignored], validate=False) \
        if ignored else None
    advanced = None
    if smooth_quant_alpha is not None:
        from nncf.quantization.advanced_parameters import (AdvancedQuantizationParameters,
                                                           AdvancedSmoothQuantParameters)

        advanced = AdvancedQuantizationParameters(
            smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=smooth_quant_alpha))
    nncf_log = logging.getLogger("nncf")
    level = nncf_log.level
    nncf_log.setLevel(logging.ERROR)  # its INFO lines and progress bars are not edgemm's log
    try:
        # NNCF draws rich progress bars on sys.stdout/stderr whatever the log level: keep them off the console.
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            return nncf.quantize(model, nncf.Dataset(list(feeds)), model_type=nncf.ModelType.TRANSFORMER,
                                 subset_size=max(1, len(feeds)), ignored_scope=scope, advanced_parameters=advanced)
    finally:
        nncf_log.setLevel(level)


def compile_for_timing(model, inference_precision: str, threads: int = 0):
    """A compiled model configured as ``OpenVinoSession`` configures it (so the timing is what ships)."""
    import openvino as ov

    config = {"INFERENCE_PRECISION_HINT": inference_precision, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    return ov.Core().compile_model(model, "CPU", config)


def save_variant(model, stage_dir: Path, name: str, inference_precision: str) -> dict:
    """Write ``openvino/<name>.xml`` + ``.bin`` into the bundle stage; returns the variant's backend section."""
    import openvino as ov

    folder = Path(stage_dir) / VARIANT_DIR
    folder.mkdir(exist_ok=True)
    xml = folder / f"{name}.xml"
    # FP32 weights stay FP32: the precision is the variant's, chosen and measured, not the file format's.
    ov.save_model(model, str(xml), compress_to_fp16=False)
    return {"name": "openvino", "model": f"{VARIANT_DIR}/{name}.xml", "weights": f"{VARIANT_DIR}/{name}.bin",
            "inference_precision": inference_precision}
