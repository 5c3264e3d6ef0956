"""Accuracy-aware precision: quantize, find the layers that cost the accuracy, keep the fewest of them in
higher precision until a task-level target holds, at the lowest latency.

    --accuracy-target "cosine>=0.998"            every float output's mean cosine vs FP32
    --accuracy-target "top1-drop<=0.5"           task accuracy drop in points (needs labels)
    --accuracy-target "cosine@text_embeds>=0.999,top1-agreement>=0.99"

The search (``accuracy_aware``):
1. Quantize every unit (MatMul / Conv / Gemm ...; a "block" granularity groups them by module, e.g.
   ``text_encoder.layers.3``). If the target already holds, done.
2. Sensitivity, on calibration samples (no labels needed): quantize one unit alone and measure how much
   of the all-INT8 output error it causes (1 - cosine on the outputs the failing conditions read,
   normalised by the all-INT8 error of that output).
3. Keep the most sensitive units in higher precision, fewest first: the smallest k that meets the target
   on the evaluation data (doubling, then bisection; a mean-cosine condition must hold for the 95% lower
   confidence bound of the mean, so the result also holds on samples the search never saw), then drop every kept unit the target does not need
   (least sensitive first), so no unit is kept without being needed.
4. Report each kept unit: its sensitivity, what it buys (target values with and without it, measured) and
   what it costs (the measured latency gap between all-INT8 and the result, split by the units' MACs).

This is a planner (quant/plan.py): it decides the exclusion set; the backend's quantizer builds every
candidate (``variant``) and the result (``build``). CPU target: ONNX Runtime INT8
(``ort_int8.OrtInt8Quantizer``), every variant a full build, latency measured here. TensorRT targets:
modelopt Q/DQ (``qdq.QdqQuantizer``) calibrated once; variants bypass the Q/DQ pairs that feed the kept
units (no re-calibration), measured on ONNX Runtime CPU (INT8 Q/DQ runs there; FP8 through
``fp8_sim``), and the final file is modelopt's own output with the kept units as ``exclude_nodes``:
the Q/DQ placement for the device build. Its latency is the device's to measure (``edgemm verify``).

The target's grammar is in ``accuracy_target``, the scoring in ``accuracy_eval``.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from ..errors import InputError, ParityError
from ..onnx_io import cpu_session, remove_model
from . import PrecisionResult
from .accuracy_eval import Evaluator, Measurement
from .accuracy_target import (TARGET_METRICS, AccuracyTarget, Condition, TargetCheck, parse_accuracy_target,
                              round_sig)
from .ort_int8 import runner_of
from .plan import quantizer_for
from .qdq import bypass_qdq

__all__ = ["Condition", "AccuracyTarget", "TargetCheck", "parse_accuracy_target", "accuracy_aware",
           "TARGET_METRICS", "estimate_macs", "bypass_qdq", "Evaluator", "Measurement"]


# ------------------------------------------------------------------------------------------------
# Cost model

def estimate_macs(model_path: Path, feeds: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Multiply-accumulates per MatMul / Gemm / Conv node for one sample, from ONNX shape inference with
    the inputs' concrete shapes (relative costs for splitting a measured latency; not a timing)."""
    import onnx
    from onnx import shape_inference

    model = onnx.load(str(model_path), load_external_data=False)
    for vi in model.graph.input:
        if vi.name in feeds:
            shape = (1,) + tuple(np.asarray(feeds[vi.name]).shape[1:])
            dims = vi.type.tensor_type.shape.dim
            for d, size in zip(dims, shape):
                d.ClearField("dim_param")
                d.dim_value = int(size)
    try:
        model = shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # shape inference gives up on some graphs; fall back to weight sizes below
        pass
    shapes = {}
    for vi in list(model.graph.value_info) + list(model.graph.output) + list(model.graph.input):
        dims = vi.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") for d in dims):
            shapes[vi.name] = [d.dim_value for d in dims]
    inits = {t.name: list(t.dims) for t in model.graph.initializer}
    macs = {}
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm", "Conv", "ConvTranspose"):
            continue
        out = shapes.get(node.output[0])
        weight = inits.get(node.input[1]) if len(node.input) > 1 else None
        if node.op_type in ("MatMul", "Gemm"):
            a = shapes.get(node.input[0])
            k = a[-1] if a else (weight[0] if weight else None)
            macs[node.name] = float(np.prod(out) * k) if out and k else float(np.prod(weight) if weight else 0)
        else:
            w = weight or [0]
            per_out = float(np.prod(w[1:])) if len(w) > 1 else 0.0
            macs[node.name] = float(np.prod(out)) * per_out if out else float(np.prod(w))
    return macs


# ------------------------------------------------------------------------------------------------
# The search

def _block_of(module: str | None, node: str) -> str:
    """Block key: the module path up to its first list index (``text_encoder.layers.3``), else the
    top-level module; nodes without a module path are their own block."""
    if not module:
        return node
    parts = module.split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[:i + 1])
    return parts[0]


@dataclass
class _Group:
    name: str
    nodes: list[str]
    module: str | None
    score: float = 0.0
    errors: dict = field(default_factory=dict)


def _sample(feeds: Mapping[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    return {k: np.asarray(v)[:n] for k, v in feeds.items()}


def accuracy_aware(fp32_onnx, out_onnx, calib: Mapping[str, np.ndarray], eval_feeds: Mapping[str, np.ndarray],
                   target: AccuracyTarget | str, backend, *, labels: np.ndarray | None = None,
                   metric: str | tuple[str, Sequence[str]] | None = None, workdir: Path,
                   mode: str = "int8", policy: Mapping[str, str] | str | None = None, branch_overrides=None,
                   granularity: str = "layer", int8_recipe: str | None = None, high_precision: str = "fp16",
                   sensitivity_samples: int = 16, batch_size: int = 16, timing_iterations: int = 40,
                   confidence: float | None = 0.95, log: Callable[[str], None] = lambda _m: None) -> PrecisionResult:
    """Meet ``target`` with the fewest units kept in higher precision (see the module doc).

    ``backend``: "onnxruntime" | "tensorrt" or a TargetProfile; ``mode``: "int8" | "fp8" (TensorRT);
    ``policy``: optional per-branch precisions (branches not quantized there are never searched);
    ``metric``: the task metric for ``*-drop`` targets, a name or (name, outputs);
    ``confidence``: mean-cosine conditions must hold for the one-sided lower confidence bound of the mean
    over ``eval_feeds`` (None: for the mean itself). Pass enough evaluation samples (>= 32): each
    candidate runs on all of them.
    Raises ParityError if the target cannot be met even with every searchable unit unquantized."""
    import onnx

    from ..precision import QUANTIZED
    from ..precision import spec as precision_spec
    from .branches import find_branches, node_module_paths, parse_branch_overrides
    from .mixed import backend_and_target, parse_precision_policy, resolve_policy

    started = time.perf_counter()
    fp32_onnx, out_onnx, workdir = Path(fp32_onnx), Path(out_onnx), Path(workdir)
    target = parse_accuracy_target(target) if isinstance(target, str) else target
    backend_name, profile = backend_and_target(backend, None)
    quantizer_cls = quantizer_for(backend_name)
    if granularity not in ("layer", "block"):
        raise InputError(f"unknown granularity {granularity!r}", field="granularity", fix="layer or block")
    if mode not in quantizer_cls.modes:
        raise InputError(f"{mode} does not run on {quantizer_cls.label}", field="--accuracy-target",
                         fix=f"search in {' or '.join(quantizer_cls.modes)} here; fp8 needs a TensorRT target with "
                             "compute capability >= 8.9")
    if profile is not None and not profile.supports(mode):
        raise InputError(f"target {profile.name} does not support {mode}", field="--target",
                         fix=f"use one of {', '.join(profile.precisions)}")
    if target.needs_labels and labels is None:
        raise InputError(f"{target} needs labels", field="--eval",
                         fix="pass evaluation data with a 'labels' array, or use a cosine target")
    if not calib:
        raise InputError("the accuracy-aware search needs calibration data", field="--calib",
                         fix="pass --calib data.npz")
    workdir.mkdir(parents=True, exist_ok=True)
    out_onnx.parent.mkdir(parents=True, exist_ok=True)

    # Which branches are searched: those the policy quantizes (all of them without a policy). Branches and
    # modules are read on the quantizer's own graph (ORT's is Gemm-normalized), the names its plans use.
    quantizer = quantizer_cls.for_search(fp32_onnx, calib, workdir, mode=mode, high_precision=high_precision,
                                         int8_recipe=int8_recipe)
    source = quantizer.reference_path
    modules = node_module_paths(onnx.load(str(source), load_external_data=False))
    branches = find_branches(source, overrides=parse_branch_overrides(branch_overrides))   # for the report too
    branch_of, branch_table, fixed_nodes = branches.branch_of, None, []
    if policy is not None:
        policy = parse_precision_policy(policy) if isinstance(policy, str) else dict(policy)
        branch_table, _ = resolve_policy(policy, branches, backend_name, profile)
        searched = {b for b, v in branch_table.items() if v["precision"] in QUANTIZED}
        fixed_nodes = [n for n, b in branch_of.items() if b not in searched]
    quantizer.fixed_exclude = list(fixed_nodes)

    log(f"accuracy-aware {mode}: target {target} on {backend_name}")
    fixed = set(fixed_nodes)
    always_keep = [u for u in quantizer.units if u in fixed]   # units of branches the policy does not quantize
    searchable = [u for u in quantizer.units if u not in set(always_keep)]
    if not searchable:
        raise InputError("nothing to quantize: no MatMul/Conv layer outside the branches kept in high precision",
                         file=fp32_onnx, fix="quantize a branch that holds MatMul/Conv layers")

    ref_runner = runner_of(cpu_session(quantizer.reference_path, spinning=False))
    from ..parity.output_kinds import graph_score_outputs

    fp32_model = onnx.load(str(fp32_onnx), load_external_data=False)
    output_names = [o.name for o in fp32_model.graph.output]
    evaluator = Evaluator(ref_runner, eval_feeds, target, output_names=output_names, labels=labels, task=metric,
                          batch_size=batch_size, confidence=confidence, heads=graph_score_outputs(fp32_model),
                          score_noise=precision_spec(mode).score_noise)
    del fp32_model
    sens_feeds = _sample(calib, sensitivity_samples)
    sensor = Evaluator(ref_runner, sens_feeds, target, output_names=output_names, batch_size=batch_size,
                       check_target=False, score_noise=precision_spec(mode).score_noise)
    builds = {"n": 0}
    measured: dict[tuple, Measurement] = {}

    def candidate(keep_units: Sequence[str], ev: Evaluator = evaluator) -> Measurement:
        """Build the variant keeping ``keep_units`` unquantized and measure it (cached by unit set)."""
        key = (frozenset(keep_units), id(ev))
        if key not in measured:
            builds["n"] += 1
            path = quantizer.variant(workdir / f"candidate_{builds['n']}.onnx", sorted(set(keep_units) | set(always_keep)))
            try:
                measured[key] = ev.measure(quantizer.runner(path))
            finally:
                remove_model(path)   # candidates of a large model would fill the disk
        return measured[key]

    full_path = quantizer.variant(workdir / "candidate_all.onnx", list(always_keep))
    full_runner = quantizer.runner(full_path)
    full = evaluator.measure(full_runner)
    measured[(frozenset(), id(evaluator))] = full
    builds["n"] += 1
    log(f"  all {mode}: " + ", ".join(f"{k} = {v:.6g}" for k, v in full.check.values.items()))
    groups_by: dict[str, _Group] = {}
    for u in searchable:
        key = u if granularity == "layer" else _block_of(modules.get(u), u)
        g = groups_by.setdefault(key, _Group(key, [], modules.get(u) if granularity == "layer" else key))
        g.nodes.append(u)
    groups = list(groups_by.values())
    steps = [{"kept_units": 0, **full.check.to_dict()}]
    loo: dict[str, dict] = {}

    if full.check.met:
        kept: list[_Group] = []
        final_check = full.check
    else:
        # Sensitivity on calibration samples: each group quantized alone.
        sens_full = sensor.measure(full_runner)
        relevant = _relevant_outputs(target, evaluator, full)
        all_units = [u for g in groups for u in g.nodes]
        for i, g in enumerate(groups):
            m = candidate([u for u in all_units if u not in set(g.nodes)], sensor)
            g.errors = {o: m.errors.get(o, 0.0) for o in relevant}
            g.score = max((m.errors.get(o, 0.0) / sens_full.errors[o] for o in relevant
                           if sens_full.errors.get(o, 0.0) > 1e-12), default=0.0)
            if (i + 1) % 10 == 0 or i + 1 == len(groups):
                log(f"  sensitivity {i + 1}/{len(groups)} units")
        ranked = sorted(groups, key=lambda g: -g.score)

        def keep_units(k: int) -> list[str]:
            return [u for g in ranked[:k] for u in g.nodes]

        # Smallest k that meets the target: double, then bisect.
        lo, hi, k = 0, None, 1
        while hi is None:
            k = min(k, len(ranked))
            m = candidate(keep_units(k))
            steps.append({"kept_units": k, **m.check.to_dict()})
            log(f"  keep {k}: " + ("met" if m.check.met else "; ".join(m.check.failures)))
            if m.check.met:
                hi = k
            elif k == len(ranked):
                raise ParityError(f"the target {target} is not met even with every searched layer unquantized "
                                  f"({'; '.join(m.check.failures)})", file=fp32_onnx,
                                  fix="relax the target, or keep more of the model in higher precision with --precision")
            else:
                lo, k = k, k * 2
        while hi - lo > 1:
            mid = (lo + hi) // 2
            m = candidate(keep_units(mid))
            steps.append({"kept_units": mid, **m.check.to_dict()})
            log(f"  keep {mid}: " + ("met" if m.check.met else "; ".join(m.check.failures)))
            lo, hi = (lo, mid) if m.check.met else (mid, hi)
        kept = list(ranked[:hi])
        # Drop every kept group the target does not need, least sensitive first (one pass: a group found
        # needed stays, since dropping others only lowers accuracy further).
        for g in sorted(kept, key=lambda g: g.score):
            if len(kept) == 1:
                break
            rest = [x for x in kept if x is not g]
            m = candidate([u for x in rest for u in x.nodes])
            if m.check.met:
                kept = rest
                log(f"  {g.name} not needed: dropped")
        final = candidate([u for g in kept for u in g.nodes])
        final_check = final.check
        for g in kept:  # what each kept group buys: the target's values without it (leave-one-out)
            m = candidate([u for x in kept if x is not g for u in x.nodes])
            loo[g.name] = {"without": m.check.to_dict()["values"],
                           "bought": {k: round_sig(final_check.values[k] - m.check.values[k]) for k in final_check.values}}
    keep_final = sorted({u for g in kept for u in g.nodes} | set(always_keep))
    log(f"  keeping {len(kept)} of {len(groups)} {granularity}s in {quantizer.high_precision}; building the result")

    recipe_backend = {**quantizer.describe(), **quantizer.build(out_onnx, quantizer.plan(keep_final))}
    result_check = final_check
    notes = list(quantizer.notes)
    if not quantizer.exact_variants:
        # The search measured bypassed variants; the build is the backend's own placement: measure it too.
        m = evaluator.measure(quantizer.runner(out_onnx))
        result_check = m.check
        if not m.check.met:
            notes.append("modelopt's final placement (kept layers as exclude_nodes) measures below the target "
                         f"that the bypassed variant met: {'; '.join(m.check.failures)}")

    # Cost: measured latency (CPU), split over kept groups by MACs.
    macs = estimate_macs(quantizer.reference_path, eval_feeds)
    op_of = {n.name: n.op_type for n in onnx.load(str(quantizer.reference_path), load_external_data=False).graph.node}
    latency = None
    if quantizer.runs_here:   # its builds run here at deployment speed: the cost is measured
        latency = _latency(quantizer.reference_path, full_path, out_onnx, eval_feeds, timing_iterations)
    total_macs = sum(macs.get(u, 0.0) for u in searchable) or 1.0
    kept_macs = sum(macs.get(u, 0.0) for g in kept for u in g.nodes) or 1.0
    kept_table = []
    for g in kept:
        g_macs = sum(macs.get(u, 0.0) for u in g.nodes)
        row = {"unit": g.name, "nodes": g.nodes, "module": g.module,
               "ops": sorted({op_of.get(u, "?") for u in g.nodes}),
               **({"branch": branch_of[g.nodes[0]]} if g.nodes[0] in branch_of else {}), "sensitivity": round_sig(g.score),
               "macs_share": round_sig(g_macs / total_macs), **loo.get(g.name, {})}
        if latency:
            row["latency_cost_ms_est"] = round_sig(latency["overhead_ms"] * g_macs / kept_macs)
        kept_table.append(row)
    ranking = [{"unit": g.name, "module": g.module, "sensitivity": round_sig(g.score)}
               for g in sorted(groups, key=lambda g: -g.score)[:20]]
    precisions = [mode] + ([quantizer.high_precision] if keep_final else [])
    if branch_table:
        precisions += [v["precision"] for v in branch_table.values()]
    from .mixed import mixed_mode_name

    recipe = {
        "name": "accuracy-aware",
        "target": target.to_dict(),
        "met": result_check.met,
        "measured": result_check.to_dict(),
        "all_quantized": full.check.to_dict(),
        "quantized": mode,
        "kept_precision": quantizer.high_precision,
        "kept": kept_table,
        "exclude_nodes": keep_final,
        "search": {"granularity": granularity, "units": len(groups), "builds": builds["n"],
                   "eval_samples": evaluator.samples, "sensitivity_samples": sensor.samples,
                   "seconds": round(time.perf_counter() - started, 1), "steps": steps, "most_sensitive": ranking},
        "backend": recipe_backend,
        **({"branches": branch_table} if branch_table else {}),
        **({"latency": latency} if latency else {"latency": "measure on the device (edgemm verify)"}),
    }
    if quantizer.simulated:
        from .fp8_sim import SIMULATED_NOTE

        notes.append(SIMULATED_NOTE)
    if quantizer.exact_variants and not result_check.met:
        notes.append("the built model misses the target: " + "; ".join(result_check.failures))
    log(f"accuracy-aware done in {recipe['search']['seconds']:.0f} s: kept {len(kept)} {granularity}(s); "
        + ", ".join(f"{k} = {v:.6g}" for k, v in result_check.values.items())
        + (f"; p50 {latency['ratio_vs_fp32']:.3f}x FP32" if latency else ""))
    shutil.rmtree(workdir / "int8", ignore_errors=True)
    remove_model(full_path)
    return PrecisionResult(out_onnx, mixed_mode_name(precisions), recipe, notes=notes, simulated=quantizer.simulated,
                           per_branch={b: v["precision"] for b, v in branch_table.items()} if branch_table else None)


def _relevant_outputs(target: AccuracyTarget, evaluator: Evaluator, full: Measurement) -> list[str]:
    """Float outputs whose error the search must reduce: for a failing mean-cosine condition, the outputs
    that fail it or use more than half of its error budget (an output well within the target must not
    pull its own layers up the ranking: the score is relative to each output's all-INT8 error); for
    other failing conditions, every output they read."""
    outs: list[str] = []
    failing = [c for c in target.conditions if str(c) in full.check.values and any(
        f.startswith(f"{c}:") for f in full.check.failures)] or list(target.conditions)
    for c in failing:
        reads = [o for o in evaluator.outputs_of(c) if o in evaluator.float_outputs]
        if c.metric == "cosine":
            reads = [o for o in reads if 1.0 - full.errors.get(o, 0.0) < c.threshold + 0.5 * (1.0 - c.threshold)] \
                or reads
        outs.extend(o for o in reads if o not in outs)
    return outs or list(evaluator.float_outputs)


def _latency(reference: Path, all_path: Path, final_path: Path, feeds, iterations: int) -> dict:
    """p50 at batch 1 of FP32, all-INT8 and the result, timed interleaved in one run."""
    from ..parity.latency import measure_interleaved

    one = {k: np.ascontiguousarray(np.asarray(v)[:1]) for k, v in feeds.items()}
    # No idle spinning (as the bundle runtime), which would steal cores from interleaved timings.
    sessions = {"fp32": cpu_session(reference, spinning=False), "all_int8": cpu_session(all_path, spinning=False),
                "result": cpu_session(final_path, spinning=False)}
    fns = {k: (lambda s=s: s.run(None, one)) for k, s in sessions.items()}
    stats = measure_interleaved(fns, warmup=5, iterations=iterations)
    fp32, q, res = stats["fp32"].p50_ms, stats["all_int8"].p50_ms, stats["result"].p50_ms
    return {"batch": 1, "iterations": iterations, "fp32_p50_ms": round_sig(fp32), "all_int8_p50_ms": round_sig(q),
            "result_p50_ms": round_sig(res), "ratio_vs_fp32": round_sig(res / fp32), "all_int8_ratio_vs_fp32": round_sig(q / fp32),
            "overhead_ms": round_sig(max(res - q, 0.0))}
