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
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from .. import precision as precision_table
from ..errors import InputError
from ..onnx_io import save_onnx
from . import PrecisionResult
from .branches import BRANCHES, COMPUTE_OPS, FUSION, BranchMap, find_branches, parse_branch_overrides
from .exclusions import anchored as _anchored

__all__ = ["POLICY_PRECISIONS", "parse_precision_policy", "resolve_policy", "apply_mixed", "OrtInt8Builder",
           "mixed_mode_name", "normalize_for_ort"]

POLICY_PRECISIONS = precision_table.ORDER   # a branch may take any known precision
_QUANTIZED = precision_table.QUANTIZED
DEFAULT_KEY = "default"
# The plain CPU recipe the mixed and accuracy-aware modes start from: cpu_int8 measured it the fastest
# (dynamic MatMul, per-channel weights, Conv as static QLinearConv); its outlier guards are replaced here
# by an explicit list of FP32 nodes.
DEFAULT_CPU_RECIPE = "dynamic_per_channel"


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


def _backend_and_target(backend, target):
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
            if requested in ("fp16", "bf16"):
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


def normalize_for_ort(fp32_onnx: Path, out: Path) -> None:
    """ORT's Gemm -> MatMul + Add rewrite (its quantizers apply it anyway and rename the node), done up
    front so node names are stable; the new nodes keep the Gemm's module path."""
    import onnx

    from .ort_fusions import normalize_gemm

    model = onnx.load(str(fp32_onnx))
    meta = {n.name: list(n.metadata_props) for n in model.graph.node if n.op_type == "Gemm"}
    normalize_gemm(model)
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    unused = [t for t in model.graph.initializer if t.name not in used]  # the Gemms' original weights
    for t in unused:
        model.graph.initializer.remove(t)
    for node in model.graph.node:
        for suffix in ("_MatMul", "_Add"):
            base = node.name[: -len(suffix)] if node.name.endswith(suffix) else None
            if base in meta and not len(node.metadata_props):
                for p in meta[base]:
                    node.metadata_props.add(key=p.key, value=p.value)
    save_onnx(model, out)


class OrtInt8Builder:
    """ONNX Runtime CPU INT8 with an explicit set of nodes kept in FP32, following a ``cpu_int8`` recipe's
    arguments (method, per-channel, Conv handling, format, types).

    Written here rather than through ``cpu_int8.apply_recipe`` because that function chooses its FP32
    nodes itself (outlier heuristics) and takes no exclusion list. Calibration runs once: static ranges
    are cached (ORT's ``calibration_cache_path``) from a first build with nothing excluded."""

    def __init__(self, fp32_onnx: Path, calib: Mapping[str, np.ndarray], workdir: Path, *,
                 recipe: str | None = None):
        import onnx

        from . import cpu_int8

        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        name = recipe or DEFAULT_CPU_RECIPE
        if name not in cpu_int8.ALL_RECIPES:
            raise InputError(f"unknown INT8 recipe {name!r}", field="--int8-recipe",
                             fix=f"use one of {', '.join(cpu_int8.ALL_RECIPES)}")
        self.recipe = cpu_int8.ALL_RECIPES[name]
        self.params = dict(self.recipe.params)
        self.notes = []
        if self.params.get("outlier_ratio") or self.params.get("exclude_final") or self.params.get("fuse"):
            self.notes.append(f"recipe {name}: its outlier/final-layer guards and fusions are not applied here; "
                              "the FP32 nodes are chosen per branch / by measurement instead")
        self.base = self.workdir / "fp32_ort.onnx"
        normalize_for_ort(Path(fp32_onnx), self.base)
        model = onnx.load(str(self.base), load_external_data=False)
        self.large = self.base.stat().st_size > 1_800_000_000
        inits = {i.name for i in model.graph.initializer}
        static = self.params["method"] == "static"
        self.units = [n.name for n in model.graph.node
                      if (n.op_type == "MatMul" and n.input[1] in inits) or n.op_type == "Conv"]
        self.op_types = {n.name: n.op_type for n in model.graph.node}
        specs = cpu_int8._input_specs(model)
        checked = cpu_int8._check_calib(calib, specs, fp32_onnx)
        self.feeds = cpu_int8._split_feeds(checked, specs)
        self._cache = self.workdir / ("static_ranges.json" if static else "conv_ranges.json")
        self.builds = 0
        self._calibrated = False
        del model

    def _reader(self):
        from .cpu_int8 import _FeedReader

        return _FeedReader(self.feeds)

    def build(self, out_onnx: Path, keep_fp32: Sequence[str] = ()) -> dict:
        """Quantize every unit not in ``keep_fp32``; return {"kept_fp32": [...]}."""
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_dynamic, quantize_static

        from .cpu_int8 import _qtype, quiet_ort_quantizer_logs

        keep = sorted(set(keep_fp32))
        if keep and not self._calibrated:
            # A first build with nothing excluded calibrates every unit and fills the range cache, which
            # later builds (any subset of units) reuse.
            warmup = self.workdir / "warmup_int8.onnx"
            self.build(warmup)
            warmup.unlink()
        out_onnx = Path(out_onnx)
        stage = Path(tempfile.mkdtemp(prefix=f".{out_onnx.name}.", dir=out_onnx.parent))
        tmp = stage / out_onnx.name
        common = {"per_channel": bool(self.params.get("per_channel", True)), "nodes_to_exclude": keep,
                  "use_external_data_format": self.large}
        try:
            with contextlib.redirect_stdout(sys.stderr), quiet_ort_quantizer_logs():
                if self.params["method"] == "dynamic":
                    src = self.base
                    convs_quantized = any(self.op_types[u] == "Conv" and u not in keep for u in self.units)
                    if convs_quantized and self.params.get("conv", "static_u8s8") == "static_u8s8":
                        src = stage / "conv_int8.onnx"
                        quantize_static(self.base, src, self._reader(), quant_format=QuantFormat.QOperator,
                                        op_types_to_quantize=["Conv"], activation_type=_qtype("uint8"),
                                        weight_type=_qtype("int8"), calibration_cache_path=self._cache, **common)
                    if any(self.op_types[u] == "MatMul" and u not in keep for u in self.units):
                        quantize_dynamic(src, tmp, op_types_to_quantize=["MatMul"], weight_type=_qtype("int8"),
                                         extra_options={"MatMulConstBOnly": True}, **common)
                    else:  # nothing left for the dynamic pass (e.g. one Conv quantized alone)
                        shutil.copyfile(src, tmp)
                else:
                    fmt = {"qoperator": QuantFormat.QOperator, "qdq": QuantFormat.QDQ}[self.params.get("format",
                                                                                                       "qoperator")]
                    quantize_static(self.base, tmp, self._reader(), quant_format=fmt,
                                    op_types_to_quantize=["MatMul", "Conv"],
                                    activation_type=_qtype(self.params.get("activation_type", "uint8")),
                                    weight_type=_qtype(self.params.get("weight_type", "int8")),
                                    calibrate_method=CalibrationMethod.MinMax, calibration_cache_path=self._cache,
                                    extra_options={"MatMulConstBOnly": True}, **common)
            data = tmp.with_name(tmp.name + ".data")
            if data.exists():
                os.replace(data, out_onnx.with_name(out_onnx.name + ".data"))
            os.replace(tmp, out_onnx)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        self.builds += 1
        self._calibrated = self._calibrated or not keep
        return {"kept_fp32": keep}

    def describe(self) -> dict:
        return {"tool": "onnxruntime.quantization", "base_recipe": self.recipe.name, "params": self.params,
                "calibration_feeds": len(self.feeds)}


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
    backend, target = _backend_and_target(backend, target)
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
    int8 = [b for b, v in table.items() if v["precision"] == "int8"]
    if not int8:
        shutil.copyfile(source, out)
        notes.append("no branch is int8 on this target: the bundle is FP32")
        return {"recipe": {"tool": "none"}}
    builder = OrtInt8Builder(source, calib, work / "int8", recipe=int8_recipe)
    keep = [u for u in builder.units if branches.branch_of.get(u) not in int8]
    builder.build(out, keep)
    notes.extend(builder.notes)
    counts = {b: sum(1 for u in builder.units if branches.branch_of.get(u) == b and u not in keep) for b in table}
    return {"quantized_nodes": counts,
            "recipe": {**builder.describe(), "kept_fp32_nodes": len(keep)}}


def _build_tensorrt(fp32_onnx: Path, out: Path, table: dict, branches: BranchMap, calib, high_precision,
                    notes: list[str]) -> dict:
    from .modelopt_qdq import inspect_qdq, quantize_qdq

    quant = next((v["precision"] for v in table.values() if v["precision"] in _QUANTIZED), None)
    rest = {b: v["precision"] for b, v in table.items() if v["precision"] not in _QUANTIZED}
    low = sorted({p for p in rest.values() if p in ("fp16", "bf16")})
    fp32_branches = [b for b, p in rest.items() if p == "fp32"]
    fp32_nodes = [n for b in fp32_branches for n in branches.nodes(b)]
    if quant is None:
        if not low:
            shutil.copyfile(fp32_onnx, out)
            return {"recipe": {"tool": "none"}}
        model = _autocast(fp32_onnx, low[0], fp32_nodes, calib)
        save_onnx(model, out)
        return {"recipe": {"tool": "modelopt.onnx.autocast.convert_to_mixed_precision",
                           "low_precision": low[0], "fp32_nodes": len(fp32_nodes)}}
    excluded = [n for b, p in rest.items() for n in branches.nodes(b)]
    uniform = (not low) or not fp32_branches
    hp = high_precision or (low[0] if (low and uniform) else "fp32")
    recipe = quantize_qdq(fp32_onnx, out, calib, quant, exclude_nodes=_anchored(excluded), high_precision=hp)
    if not uniform:
        # Quantized + FP16 + FP32 branches: Q/DQ with FP32 elsewhere, then AutoCast everything but the FP32
        # branches (AutoCast keeps Q/DQ nodes as they are).
        model = _autocast(out, low[0], fp32_nodes, calib)
        save_onnx(model, out)
        recipe["autocast"] = {"low_precision": low[0], "fp32_nodes": len(fp32_nodes)}
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


def _autocast(onnx_path: Path, low: str, fp32_nodes: Sequence[str], calib):
    """AutoCast to ``low`` with ``fp32_nodes`` kept FP32 (the data-range check runs on real samples only)."""
    import logging

    from modelopt.onnx.autocast import convert_to_mixed_precision
    from modelopt.onnx.logging_config import configure_logging

    configure_logging(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="edgemm-autocast-") as tmp:
        calib_path = None
        if calib:
            calib_path = str(Path(tmp) / "reference.npz")
            np.savez(calib_path, **{k: np.asarray(v)[:8] for k, v in calib.items()})
        with contextlib.redirect_stdout(sys.stderr):
            return convert_to_mixed_precision(onnx_path=str(onnx_path), low_precision_type=low,
                                              nodes_to_exclude=_anchored(fp32_nodes) or None, keep_io_types=True,
                                              calibration_data=calib_path,
                                              data_max=512.0 if calib_path else np.inf, providers=["cpu"])
