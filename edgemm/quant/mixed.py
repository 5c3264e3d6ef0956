"""Per-modality mixed precision: ``--precision vision=int8,text=fp16,fusion=fp32``.

Branches come from ``branches.find_branches`` (module paths + data flow, overridable with
``--branch``). What each precision becomes depends on the backend, and the result says so: a quantized
precision its quantizer does not build (``Quantizer.modes``: fp8 on ONNX Runtime CPU) is refused; on a
backend without fast FP16/BF16 kernels (``Backend.low_float_kernels``: ONNX Runtime CPU) fp16/bf16
branches run FP32, because inserting casts would make them slower, not faster (noted). The plan is then
built by the backend's quantizer (``Quantizer.build_per_branch``: ORT's INT8 with the other branches'
nodes kept FP32; TensorRT's one modelopt Q/DQ pass with them excluded, the rest FP16 or FP32 as asked).
int8 and fp8 branches in one model are refused (one quantization type per plan), and so are fp16 and
bf16 branches together (one float type per plan).
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from .. import precision as precision_table
from ..errors import InputError
from . import PrecisionResult
from .branches import BRANCHES, BranchMap, find_branches, parse_branch_overrides
from .ort_int8 import normalize_for_ort
from .ort_recipes import DEFAULT_CPU_RECIPE
from .plan import quantizer_for

__all__ = ["POLICY_PRECISIONS", "parse_precision_policy", "check_policy_branches", "resolve_policy", "apply_mixed", "mixed_mode_name",
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


def check_policy_branches(policy_text: str | None, specs, *, overrides=None) -> None:
    """Refuse, from the input specs alone (before the export and any quantization work), a policy naming a
    modality branch none of the model's inputs has: ``--precision audio=int8`` on an image + text model.
    Conservative: when an input's modality cannot be told from its name, dtype and shape (module names may
    then label it), or ``--branch`` overrides move nodes, the check waits for the graph (``resolve_policy``)."""
    if not policy_text or overrides:
        return
    from ..modality import FUSION, MODALITIES, is_mask, resolve_inputs

    modality = resolve_inputs({s.name: (s.dtype, list(s.shape)) for s in specs})
    if any(m is None and not is_mask(name, spec.dtype) for (name, m), spec in zip(modality.items(), specs)):
        return
    have = [m for m in MODALITIES if m in modality.values()]
    absent = [b for b in parse_precision_policy(policy_text) if b in MODALITIES and b not in have]
    if absent:
        known = have + ([FUSION] if len(have) > 1 else [])
        inputs = "; ".join(f"{m}: {', '.join(n for n, mm in modality.items() if mm == m)}" for m in have)
        raise InputError(f"the model has no {absent[0]} branch (its inputs: {inputs})", field="--precision",
                         fix=f"name only branches the model has ({', '.join(known)}), or assign nodes with "
                             f"--branch {absent[0]}=MODULE_PATTERN")


def mixed_mode_name(precisions: Sequence[str]) -> str:
    """Text label ``mixed:fp32+int8`` (``precision.Precision.label``); a single precision is named plainly."""
    return precision_table.Precision.of(precisions).label


def backend_and_target(backend, target):
    """``backend`` may be a backend name, a target name or a TargetProfile; ``target`` a profile or a name.
    Returns (backend name, profile or None); refuses a backend without a quantizer (one-line InputError)."""
    from .. import targets
    from ..backends import registry

    if target is not None and isinstance(target, str):
        target = targets.load(target)
    if isinstance(backend, str) and backend not in registry.names():
        backend = targets.load(backend)
    if not isinstance(backend, str):
        target, backend = backend, backend.backend
    quantizer_for(backend)
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
    from ..backends import registry

    runtime, quantizer = registry.get(backend), quantizer_for(backend)
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
        if requested in _QUANTIZED and requested not in quantizer.modes:
            raise InputError(f"{requested} (branch {branch}) does not run on {quantizer.label}", field="--precision",
                             fix=f"use {' or '.join(quantizer.modes)} here, or a target whose backend builds {requested}")
        if requested in precision_table.LOW_FLOATS and not runtime.low_float_kernels:
            built = "fp32"
            notes.append(f"{branch}: {requested} runs as fp32 on {runtime.title} (it has few {requested} kernels, "
                         f"so casts would make the branch slower, not faster)")
        table[branch] = {"requested": requested, "precision": built}
    quantized = {v["precision"] for v in table.values() if v["precision"] in _QUANTIZED}
    if len(quantized) > 1:
        raise InputError("int8 and fp8 branches in one model are not supported (one quantization type per "
                         "modelopt pass)", field="--precision", fix="quantize every quantized branch as int8, "
                                                                     "or every one as fp8")
    if {v["precision"] for v in table.values()} >= {"fp16", "bf16"}:   # one float type per plan
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
    quantizer = quantizer_for(backend)
    overrides = parse_branch_overrides(branch_overrides)
    if not fp32_onnx.is_file():
        raise InputError("ONNX file not found", file=fp32_onnx)
    out_onnx.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        work = Path(workdir) if workdir else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="edgemm-mixed-")))
        work.mkdir(parents=True, exist_ok=True)
        source = quantizer.plan_graph(fp32_onnx, work)   # the graph whose node names plans use
        branches = find_branches(source, overrides=overrides)
        table, notes = resolve_policy(policy, branches, backend, target)
        quantized = sorted({v["precision"] for v in table.values() if v["precision"] in _QUANTIZED})
        if quantized and not calib:
            raise InputError(f"{quantized[0]} branches need calibration data; edgemm never calibrates on random data",
                             field="--calib", fix="pass --calib data.npz (keys = input names, axis 0 = samples)")
        log(f"mixed precision ({backend}): " + ", ".join(f"{b}={v['precision']}" for b, v in table.items()))
        details = quantizer.build_per_branch(source, out_onnx, table, branches, calib, work, notes,
                                             int8_recipe=int8_recipe, high_precision=high_precision)
    summary = branches.summary()
    for branch, row in table.items():
        row.update(summary["branches"].get(branch, {}))
        row["quantized_nodes"] = details.get("quantized_nodes", {}).get(branch, 0)
    mode = mixed_mode_name([v["precision"] for v in table.values()])
    recipe = {"name": "mixed", "policy": dict(policy), "branches": table, "branches_found_by": summary["found_by"],
              **({"branch_overrides": overrides} if overrides else {}), **details.get("recipe", {})}
    return PrecisionResult(out_onnx, mode, recipe, notes=notes, simulated="fp8" in quantized,
                           per_branch={b: v["precision"] for b, v in table.items()})
