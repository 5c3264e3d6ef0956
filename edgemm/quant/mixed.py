"""Per-modality mixed precision: ``--precision vision=int8,text=fp16,fusion=fp32``.

Branches come from ``branches.find_branches`` (module paths + data flow, overridable with
``--branch``). What each precision becomes depends on the backend, and the result says so:

- ONNX Runtime CPU: int8 branches are quantized with ONNX Runtime's own INT8 (a ``cpu_int8`` recipe's
  arguments, the other branches' nodes excluded); fp16/bf16 branches run FP32, because ORT's CPU
  provider has few FP16 kernels and inserting casts would make them slower, not faster (noted);
  fp8 is refused (no FP8 on CPUs).
- TensorRT: one modelopt Q/DQ pass (int8 or fp8) for the quantized branches with every node of the
  other branches excluded; the other branches are FP16 or FP32 as asked (modelopt's high-precision
  type when they agree, else AutoCast with the FP32 branches' nodes excluded). int8 and fp8 branches
  in one model are refused: modelopt quantizes one type per pass and refuses already-quantized input.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from .. import precision as precision_table
from ..errors import InputError
from . import PrecisionResult
from .branches import BRANCHES, COMPUTE_OPS, FUSION, BranchMap, find_branches, parse_branch_overrides
from .ort_int8 import OrtInt8Quantizer, normalize_for_ort
from .ort_recipes import DEFAULT_CPU_RECIPE, search_recipe
from .plan import QuantPlan
from .qdq import QdqQuantizer

__all__ = ["POLICY_PRECISIONS", "parse_precision_policy", "resolve_policy", "apply_mixed", "mixed_mode_name",
           "normalize_for_ort", "DEFAULT_CPU_RECIPE", "backend_and_target"]

POLICY_PRECISIONS = precision_table.ORDER   # a branch may take any known precision
_QUANTIZED = precision_table.QUANTIZED
DEFAULT_KEY = "default"


def parse_precision_policy(text: str) -> dict[str, str]:
    """``"vision=int8,text=fp16,fusion=fp32"`` -> {"vision": "int8", "text": "fp16", "fusion": "fp32"}.

    ``default=PREC`` (or ``*=PREC``) sets the branches not named; without it they stay fp32."""
    if not isinstance(text, str) or not text.strip():
        raise InputError("empty precision policy", field="--precision",
                         fix="e.g. --precision vision=int8,text=fp16,fusion=fp32")
    policy: dict[str, str] = {}
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        if "=" not in item:
            raise InputError(f"{item!r} is not BRANCH=PRECISION", field="--precision",
                             fix="e.g. --precision vision=int8,text=fp16,fusion=fp32")
        branch, _, precision = (s.strip().lower() for s in item.partition("="))
        branch = DEFAULT_KEY if branch == "*" else branch
        if branch not in BRANCHES + (DEFAULT_KEY,):
            raise InputError(f"unknown branch {branch!r}", field="--precision",
                             fix=f"use {', '.join(BRANCHES)} or default")
        if precision not in POLICY_PRECISIONS:
            raise InputError(f"unknown precision {precision!r} for {branch}", field="--precision",
                             fix=f"use one of {', '.join(POLICY_PRECISIONS)}")
        if branch in policy:
            raise InputError(f"branch {branch} is given twice", field="--precision", fix="name each branch once")
        policy[branch] = precision
    if not policy:
        raise InputError("empty precision policy", field="--precision",
                         fix="e.g. --precision vision=int8,text=fp16,fusion=fp32")
    return policy


def mixed_mode_name(precisions: Sequence[str]) -> str:
    """Text label ``mixed:fp32+int8`` (``precision.Precision.label``); a single precision is named plainly."""
    return precision_table.Precision.of(precisions).label


def backend_and_target(backend, target):
    """``backend`` may be a backend name, a target name or a TargetProfile; ``target`` a profile or a name."""
    from .. import targets

    if target is not None and isinstance(target, str):
        target = targets.load(target)
    if isinstance(backend, str) and backend not in ("onnxruntime", "tensorrt"):
        backend = targets.load(backend)
    if not isinstance(backend, str):
        target, backend = backend, backend.backend
    if backend not in ("onnxruntime", "tensorrt"):
        raise InputError(f"unknown backend {backend!r}", field="backend", fix="onnxruntime or tensorrt")
    return backend, target


def resolve_policy(policy: Mapping[str, str], branches: BranchMap, backend: str, target=None
                   ) -> tuple[dict[str, dict], list[str]]:
    """Per present branch: {"requested", "precision" (what is built)}; plus notes. Refusals raise."""
    present = branches.present()
    named = [b for b in policy if b != DEFAULT_KEY]
    absent = [b for b in named if b not in present]
    if absent:
        raise InputError(f"the model has no {absent[0]} branch (found: {', '.join(present) or 'none'})",
                         field="--precision", fix="name only branches the model has, or assign nodes with "
                                                  f"--branch {absent[0]}=MODULE_PATTERN")
    default = policy.get(DEFAULT_KEY, "fp32")
    table, notes = {}, []
    for branch in present:
        requested = policy.get(branch, default)
        if target is not None and requested != "fp32" and not target.supports(requested):
            fix = ("use a target with compute capability >= 8.9 (e.g. h100) for fp8, or int8"
                   if requested == "fp8" else f"use one of {', '.join(target.precisions)}")
            raise InputError(f"target {target.name} does not support {requested} (branch {branch})",
                             field="--precision", fix=fix)
        built = requested
        if backend == "onnxruntime":
            if requested == "fp8":
                raise InputError(f"fp8 (branch {branch}) does not run on ONNX Runtime CPU", field="--precision",
                                 fix="use int8 for CPU targets, or a TensorRT target with compute capability >= 8.9")
            if requested in precision_table.LOW_FLOATS:
                built = "fp32"
                notes.append(f"{branch}: {requested} runs as fp32 on ONNX Runtime CPU (its CPU provider has few "
                             f"{requested} kernels, so casts would make the branch slower, not faster)")
        table[branch] = {"requested": requested, "precision": built}
    quantized = {v["precision"] for v in table.values() if v["precision"] in _QUANTIZED}
    if len(quantized) > 1:
        raise InputError("int8 and fp8 branches in one model are not supported (one quantization type per "
                         "modelopt pass)", field="--precision", fix="quantize every quantized branch as int8, "
                                                                     "or every one as fp8")
    if backend == "tensorrt" and {v["precision"] for v in table.values()} >= {"fp16", "bf16"}:
        raise InputError("fp16 and bf16 branches in one model are not supported", field="--precision",
                         fix="pick one of fp16 or bf16 for the unquantized branches")
    return table, notes


def apply_mixed(fp32_onnx, out_onnx, policy: Mapping[str, str] | str, calib: Mapping[str, np.ndarray] | None,
                backend, *, branch_overrides=None, target=None, workdir: Path | None = None,
                int8_recipe: str | None = None, high_precision: str | None = None,
                log: Callable[[str], None] = lambda _m: None) -> PrecisionResult:
    """Build ``out_onnx`` with one precision per modality branch (see the module doc).

    ``policy``: {branch: precision} or its text form; ``backend``: "onnxruntime" | "tensorrt" or a
    TargetProfile; ``branch_overrides``: ["text=text_encoder.*", ...] or {branch: [patterns]}.
    The returned recipe holds the branch table (requested / built precision, inputs, modules, nodes)."""
    fp32_onnx, out_onnx = Path(fp32_onnx), Path(out_onnx)
    if isinstance(policy, str):
        policy = parse_precision_policy(policy)
    backend, target = backend_and_target(backend, target)
    overrides = parse_branch_overrides(branch_overrides)
    if not fp32_onnx.is_file():
        raise InputError("ONNX file not found", file=fp32_onnx)
    out_onnx.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        work = Path(workdir) if workdir else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="edgemm-mixed-")))
        work.mkdir(parents=True, exist_ok=True)
        if backend == "onnxruntime":
            source = work / "fp32_ort.onnx"
            normalize_for_ort(fp32_onnx, source)
        else:
            source = fp32_onnx
        branches = find_branches(source, overrides=overrides)
        table, notes = resolve_policy(policy, branches, backend, target)
        quantized = sorted({v["precision"] for v in table.values() if v["precision"] in _QUANTIZED})
        if quantized and not calib:
            raise InputError(f"{quantized[0]} branches need calibration data; edgemm never calibrates on random data",
                             field="--calib", fix="pass --calib data.npz (keys = input names, axis 0 = samples)")
        log(f"mixed precision ({backend}): " + ", ".join(f"{b}={v['precision']}" for b, v in table.items()))
        if backend == "onnxruntime":
            details = _build_ort(source, out_onnx, table, branches, calib, work, int8_recipe, notes)
        else:
            details = _build_tensorrt(fp32_onnx, out_onnx, table, branches, calib, high_precision, notes)
    summary = branches.summary()
    for branch, row in table.items():
        row.update(summary["branches"].get(branch, {}))
        row["quantized_nodes"] = details.get("quantized_nodes", {}).get(branch, 0)
    mode = mixed_mode_name([v["precision"] for v in table.values()])
    recipe = {"name": "mixed", "policy": dict(policy), "branches": table, "branches_found_by": summary["found_by"],
              **({"branch_overrides": overrides} if overrides else {}), **details.get("recipe", {})}
    return PrecisionResult(out_onnx, mode, recipe, notes=notes, simulated="fp8" in quantized,
                           per_branch={b: v["precision"] for b, v in table.items()})


def _build_ort(source: Path, out: Path, table: dict, branches: BranchMap, calib, work: Path,
               int8_recipe: str | None, notes: list[str]) -> dict:
    """The per-branch plan on ONNX Runtime CPU: every unit outside the int8 branches kept FP32."""
    int8 = [b for b, v in table.items() if v["precision"] == "int8"]
    if not int8:
        shutil.copyfile(source, out)
        notes.append("no branch is int8 on this target: the bundle is FP32")
        return {"recipe": {"tool": "none"}}
    recipe, recipe_notes = search_recipe(int8_recipe)
    quantizer = OrtInt8Quantizer(source, calib, work / "int8", recipe=recipe)
    keep = [u for u in quantizer.units if branches.branch_of.get(u) not in int8]
    quantizer.build(out, QuantPlan("int8", tuple(keep), params=recipe.params))
    notes.extend(recipe_notes)
    counts = {b: sum(1 for u in quantizer.units if branches.branch_of.get(u) == b and u not in keep) for b in table}
    return {"quantized_nodes": counts,
            "recipe": {**quantizer.describe(), "kept_fp32_nodes": len(keep)}}


def _build_tensorrt(fp32_onnx: Path, out: Path, table: dict, branches: BranchMap, calib, high_precision,
                    notes: list[str]) -> dict:
    """The per-branch plan for TensorRT: the quantized branches' precision, every node of the other branches
    excluded; those run in their low float type, FP32 branches held in FP32 when both kinds are asked for."""
    from .modelopt_qdq import inspect_qdq

    quant = next((v["precision"] for v in table.values() if v["precision"] in _QUANTIZED), None)
    rest = {b: v["precision"] for b, v in table.items() if v["precision"] not in _QUANTIZED}
    low = sorted({p for p in rest.values() if p in precision_table.LOW_FLOATS})
    fp32_branches = [b for b, p in rest.items() if p == "fp32"]
    fp32_nodes = [n for b in fp32_branches for n in branches.nodes(b)] if low else []
    excluded = [n for b in rest for n in branches.nodes(b)] if quant else []
    plan = QuantPlan(quant, tuple(excluded), float_precision=low[0] if low else "fp32", keep_fp32=tuple(fp32_nodes),
                     params={"high_precision": high_precision} if high_precision else {})
    recipe = QdqQuantizer(fp32_onnx, calib).build(out, plan)
    if quant is None:
        return {"recipe": recipe}
    recipe.pop("excluded_nodes")   # the branch table lists them; nodes_to_exclude below says how many
    if recipe.get("autocast"):
        notes.append(f"unquantized branches: {', '.join(b for b, p in rest.items() if p != 'fp32')} in {low[0]} "
                     f"(AutoCast), {', '.join(fp32_branches)} in fp32")
    import onnx

    quantized_model = onnx.load(str(out), load_external_data=False)
    dq_out = {o for n in quantized_model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    counts = {b: 0 for b in table}
    for node in quantized_model.graph.node:
        if node.op_type in COMPUTE_OPS and dq_out & set(node.input):
            branch = branches.branch_of.get(node.name, FUSION)
            counts[branch] = counts.get(branch, 0) + 1
    recipe["qdq"] = inspect_qdq(quantized_model)
    recipe["nodes_to_exclude"] = f"{len(excluded)} nodes of the {', '.join(rest) or 'no'} branches"
    return {"quantized_nodes": counts, "recipe": recipe}
