"""Precision recipes. The recipe follows the backend (DESIGN.md: TensorRT-style Q/DQ is slow on
ONNX Runtime CPU, ORT's own INT8 is fast), so dispatch is keyed by (backend, precision).

``RECIPES`` is the uniform planner's entry; per-branch (``mixed``) and accuracy-aware
(``accuracy_search``) precision are the other planners. Every quantized build goes through the
backend's one quantizer (``plan.py``: ``ort_int8.OrtInt8Quantizer``, ``qdq.QdqQuantizer``).

To add a precision mode: a row in ``edgemm/precision.py:TABLE`` (its bars, whether it is quantized),
then ``quant/<mode>.py`` with a function taking (fp32_onnx, out_onnx, request) and returning a
``PrecisionResult``, and a row in ``RECIPES`` per backend that builds it.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import InputError, ParityError


@dataclass
class PrecisionRequest:
    precision: str
    backend: str
    calib: dict[str, np.ndarray] | None
    workdir: Path
    int8_recipe: str | None = None
    min_cosine: float | None = None
    min_top1: float | None = None                       # top-1 bar of class-score outputs (the gate's --min-top1)
    max_metric_drop: float | None = None                # task-metric drop bar, points (the gate's --max-metric-drop)
    dla: bool = False
    exclude: list[str] = field(default_factory=list)   # --exclude patterns (quant/exclusions.py)
    held_out: dict[str, np.ndarray] | None = None      # samples to judge choices on, never calibrated on
    batches: tuple[int, ...] = (1,)                     # batch sizes the bundle declares, for timing choices
    labelled: tuple | None = None                       # (arrays, labels) to score the task metric on
    task: tuple[str, list[str]] | None = None           # (metric, outputs) the task metric reads
    cpu_engines: str = "auto"                           # "auto": OpenVINO candidates too, when installed
    log: Callable[[str], None] = print


@dataclass
class PrecisionResult:
    path: Path
    mode: str                    # "int8", or the label of a mixed build ("mixed:fp32+int8", precision.py)
    recipe: dict
    notes: list[str] = field(default_factory=list)
    simulated: bool = False      # the artefact cannot run here; accuracy is estimated
    per_branch: dict[str, str] | None = None   # branch -> built precision (per-branch builds)

    @property
    def precision(self):
        """The structured value the manifest stores (``precision.Precision.to_manifest``)."""
        from ..precision import Precision, parse

        return Precision(parse(self.mode).parts, self.per_branch)
    # CPU engine search (quant/cpu_engines.py): faster variants to carry beside this one, fastest first
    variants: list = field(default_factory=list)


def _fp32(fp32_onnx: Path, out: Path, req: PrecisionRequest) -> PrecisionResult:
    shutil.copyfile(fp32_onnx, out)
    return PrecisionResult(out, "fp32", {"name": "fp32"})


def _fp16_ort(fp32_onnx: Path, out: Path, req: PrecisionRequest) -> PrecisionResult:
    from .fp16 import to_fp16

    recipe = to_fp16(fp32_onnx, out, keep_io_types=True, for_tensorrt=False)
    note = ("ONNX Runtime's CPU provider has few FP16 kernels: this bundle halves the model size but "
            "usually runs slower than FP32 on CPU; benchmark it, and prefer --int8 for CPU speed")
    return PrecisionResult(out, "fp16", recipe, notes=[note])


def _int8_ort(fp32_onnx: Path, out: Path, req: PrecisionRequest) -> PrecisionResult:
    from . import cpu_int8

    if req.int8_recipe:
        recipes = cpu_int8.ALL_RECIPES
        if req.int8_recipe not in recipes:
            raise InputError(f"unknown INT8 recipe {req.int8_recipe!r}", field="--int8-recipe",
                             fix=f"use one of {', '.join(recipes)}")
        facts = cpu_int8.apply_recipe(recipes[req.int8_recipe], fp32_onnx, out, req.calib, exclude=req.exclude)
        return PrecisionResult(out, "int8", {"name": req.int8_recipe, **recipes[req.int8_recipe].params,
                                             "selected_by": "user", "excluded_nodes": facts["excluded_nodes"]})
    kwargs = {} if req.min_cosine is None else {"min_cosine": req.min_cosine}
    ovb = None
    if req.cpu_engines == "auto":
        from ..backends import openvino as ovb

        if not ovb.available():
            ovb = None
            req.log("CPU engine search: ONNX Runtime only (pip install 'edgemm[openvino]' to also measure "
                    "OpenVINO FP32/BF16/INT8 on this host)")
    try:
        selection = cpu_int8.select_recipe(fp32_onnx, req.calib, req.workdir / "int8-search", log=req.log,
                                           exclude=req.exclude, held_out=req.held_out, min_top1=req.min_top1,
                                           **kwargs)
    except ParityError as exc:
        if ovb is None:
            raise
        # No ORT INT8 recipe met the bar: OpenVINO's BF16 (or a guarded INT8) may, at INT8-like speed.
        return _engines_without_ort_int8(fp32_onnx, out, req, exc, kwargs.get("min_cosine", 0.99))
    engines = None
    if ovb is not None:
        from .cpu_engines import engine_search_for

        engines = engine_search_for(fp32_onnx, selection, req.calib, req.held_out, batches=req.batches,
                                    min_cosine=selection.min_cosine, min_top1=req.min_top1,
                                    max_metric_drop=req.max_metric_drop, exclude=req.exclude, log=req.log,
                                    task=req.task, labelled=req.labelled)
    shutil.copyfile(selection.path, out)
    recipe = {"name": selection.recipe.name, **selection.recipe.params, "selected_by": "search",
              "candidates": _jsonable(selection.table)}
    if engines is not None:
        recipe["engines"] = _engines_record(engines)
    notes = []
    chosen = next((r for r in recipe["candidates"] if r.get("status") == "selected"), {})
    if (chosen.get("p50_ratio") or 0) > 0.95:
        # Small models are bound by per-op overhead, not arithmetic: INT8 may buy size, not speed.
        notes.append(f"INT8 measured {chosen['p50_ratio']:.2f}x FP32 latency on this CPU (no speed-up for this "
                     "model); the bundle is smaller, but prefer --fp32 if latency is what matters")
    if engines is not None and engines.variants:
        notes.append(_variants_note(engines))
    return PrecisionResult(out, "int8", recipe, notes=notes, variants=engines.variants if engines else [])


def _engines_record(engines) -> dict:
    return {"batches": engines.batches, "seconds": engines.seconds, "fallback": engines.fallback,
            "table": _jsonable(engines.table)}


def _variants_note(engines) -> str:
    best = engines.variants[0]
    fallback = next(r for r in engines.table if r.name == engines.fallback)
    return (f"CPU engine search: {best['name']} runs {best['measured']['score']:.2f}x ORT FP32 here "
            f"({fallback.name} {fallback.score:.2f}x); the bundle carries {len(engines.variants) + 1} variants "
            "and the runtime picks by host ISA")


def _engines_without_ort_int8(fp32_onnx: Path, out: Path, req: PrecisionRequest, failure, min_cosine: float):
    """OpenVINO candidates against the FP32 ORT model (the fallback then), when no ORT INT8 recipe met the
    bar; re-raises ``failure`` when no OpenVINO candidate beats FP32 under the bar either."""
    from .cpu_engines import engine_search_for

    req.log(f"  {failure.detail}; measuring OpenVINO's candidates against the FP32 ONNX Runtime model")
    engines = engine_search_for(fp32_onnx, None, req.calib, req.held_out, batches=req.batches,
                                min_cosine=min_cosine, min_top1=req.min_top1, max_metric_drop=req.max_metric_drop,
                                exclude=req.exclude, log=req.log, task=req.task, labelled=req.labelled)
    if not engines.variants:
        raise failure
    shutil.copyfile(fp32_onnx, out)
    recipe = {"name": "fp32", "selected_by": "search", "int8_search": failure.detail,
              "engines": _engines_record(engines)}
    note = (f"no ONNX Runtime INT8 recipe met the bar ({failure.detail}); the bundle's ONNX Runtime fallback "
            "is FP32")
    return PrecisionResult(out, "int8", recipe, notes=[note, _variants_note(engines)], variants=engines.variants)


def _qdq_trt(mode: str):
    def run(fp32_onnx: Path, out: Path, req: PrecisionRequest) -> PrecisionResult:
        import onnx

        from .exclusions import resolve_exclude
        from .plan import QuantPlan
        from .qdq import QdqQuantizer

        # The uniform plan: everything quantized but --exclude; unquantized layers in modelopt's FP16.
        keep = resolve_exclude(onnx.load(str(fp32_onnx), load_external_data=False), req.exclude)
        plan = QuantPlan(mode, tuple(keep), float_precision="fp16", params={"target_dla": req.dla and mode == "int8"})
        recipe = QdqQuantizer(fp32_onnx, req.calib).build(out, plan)
        notes = []
        if recipe.get("auto_excluded"):
            notes.append(f"{len(recipe['auto_excluded'])} node(s) kept out of {mode} calibration and quantization "
                         "automatically (attention-mask arithmetic or sentinel-valued tensors; "
                         "manifest precision.recipe.auto_excluded)")
        if recipe.get("calibration_fallback"):
            notes.append(recipe["calibration_fallback"])
        return PrecisionResult(out, mode, recipe, notes=notes, simulated=(mode == "fp8"))
    return run


def _fp16_trt(fp32_onnx: Path, out: Path, req: PrecisionRequest) -> PrecisionResult:
    from .fp16 import to_fp16

    recipe = to_fp16(fp32_onnx, out, keep_io_types=True, for_tensorrt=True, calib=req.calib)
    return PrecisionResult(out, "fp16", recipe)


RECIPES: dict[tuple[str, str], Callable[[Path, Path, PrecisionRequest], PrecisionResult]] = {
    ("onnxruntime", "fp32"): _fp32,
    ("onnxruntime", "fp16"): _fp16_ort,
    ("onnxruntime", "int8"): _int8_ort,
    ("tensorrt", "fp32"): _fp32,
    ("tensorrt", "fp16"): _fp16_trt,
    ("tensorrt", "int8"): _qdq_trt("int8"),
    ("tensorrt", "fp8"): _qdq_trt("fp8"),
}


def apply_precision(fp32_onnx: Path, out: Path, req: PrecisionRequest) -> PrecisionResult:
    from ..backends import registry

    backend = registry.get(req.backend)
    key = (backend.quantizes_as or backend.name, req.precision)
    if key not in RECIPES:
        supported = sorted(p for b, p in RECIPES if b == key[0])
        raise InputError(f"precision {req.precision} is not available for the {req.backend} backend",
                         field="precision", fix=f"use one of {', '.join(supported)}")
    return RECIPES[key](fp32_onnx, out, req)


def _jsonable(table):
    out = []
    for row in table or []:
        if hasattr(row, "to_dict"):
            out.append(row.to_dict())
        elif hasattr(row, "__dataclass_fields__"):
            from dataclasses import asdict
            out.append(asdict(row))
        else:
            out.append(dict(row))
    return out


# Mixed precision, accuracy-aware search and FP8 simulation (issue 5). Loaded on first use: they import
# onnx / onnxruntime.quantization, which plain FP32 / INT8 compiles do not need.
_LAZY = {
    "parse_precision_policy": "mixed", "apply_mixed": "mixed", "parse_branch_overrides": "branches",
    "find_branches": "branches", "parse_accuracy_target": "accuracy_search", "accuracy_aware": "accuracy_search",
    "AccuracyTarget": "accuracy_search", "simulate_fp8": "fp8_sim", "Fp8Simulator": "fp8_sim",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
