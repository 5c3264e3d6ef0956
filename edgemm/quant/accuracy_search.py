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

CPU target: ONNX Runtime INT8 (``mixed.OrtInt8Builder``), end to end, latency measured here. TensorRT
targets: modelopt Q/DQ calibrated once; variants are made by bypassing the Q/DQ pairs that feed the kept
units (no re-calibration), measured on ONNX Runtime CPU (INT8 Q/DQ runs there; FP8 through
``fp8_sim``), and the final file is modelopt's own output with the kept units as ``exclude_nodes``:
the Q/DQ placement for the device build. Its latency is the device's to measure (``edgemm verify``).
"""

from __future__ import annotations

import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from statistics import NormalDist
from typing import Callable, Mapping, Sequence

import numpy as np

from ..errors import InputError, ParityError
from ..onnx_io import cpu_session
from . import PrecisionResult

__all__ = ["Condition", "AccuracyTarget", "TargetCheck", "parse_accuracy_target", "accuracy_aware",
           "TARGET_METRICS", "estimate_macs", "bypass_qdq"]

# metric -> (comparison, what it measures)
TARGET_METRICS = {
    "cosine": (">=", "mean per-sample cosine vs FP32 (every float output, or @OUTPUT)"),
    "min-cosine": (">=", "worst-sample cosine vs FP32"),
    "top1-agreement": (">=", "fraction of samples whose argmax matches FP32 (logits outputs, or @OUTPUT)"),
    "top1-drop": ("<=", "top-1 accuracy drop vs FP32 in percentage points (needs labels)"),
    "recall@1-drop": ("<=", "recall@1 drop vs FP32 in percentage points (needs labels)"),
    "metric-drop": ("<=", "drop of the model's task metric in points (needs labels)"),
}
_DROP_METRIC = {"top1-drop": "top1", "recall@1-drop": "recall@1"}
# Known metric names first (longest first: "recall@1-drop" holds an "@"), then any word for the error.
_COND_RE = re.compile(r"^\s*(" + "|".join(re.escape(m) for m in sorted(TARGET_METRICS, key=len, reverse=True))
                      + r"|[a-z0-9\-]+)(?:@([A-Za-z0-9_.:/\-]+))?\s*(>=|<=|>|<|==|=)\s*([-+0-9.eEnaif]+)\s*$")
_EXAMPLE = "e.g. --accuracy-target 'cosine>=0.998' or 'top1-drop<=0.5'"


@dataclass(frozen=True)
class Condition:
    metric: str
    op: str
    threshold: float
    output: str | None = None

    def __str__(self) -> str:
        return f"{self.metric}{'@' + self.output if self.output else ''}{self.op}{self.threshold:g}"

    @property
    def needs_labels(self) -> bool:
        return self.metric.endswith("-drop")

    def holds(self, value: float) -> bool:
        return value >= self.threshold if self.op == ">=" else value <= self.threshold


@dataclass(frozen=True)
class AccuracyTarget:
    conditions: tuple[Condition, ...]

    def __str__(self) -> str:
        return ",".join(str(c) for c in self.conditions)

    @property
    def needs_labels(self) -> bool:
        return any(c.needs_labels for c in self.conditions)

    def to_dict(self) -> dict:
        return {"expression": str(self), "conditions": [
            {"metric": c.metric, "op": c.op, "threshold": c.threshold, **({"output": c.output} if c.output else {})}
            for c in self.conditions]}


@dataclass
class TargetCheck:
    met: bool
    values: dict[str, float]            # condition text -> measured value (mean over the samples)
    failures: list[str] = field(default_factory=list)
    bounds: dict[str, float] = field(default_factory=dict)  # cosine conditions: the lower bound decided on

    def to_dict(self) -> dict:
        out = {"met": self.met, "values": {k: _round(v) for k, v in self.values.items()}, "failures": self.failures}
        if self.bounds:
            out["lower_bounds"] = {k: _round(v) for k, v in self.bounds.items()}
        return out


def _round(v: float) -> float:
    return float(f"{v:.6g}")


def parse_accuracy_target(expr: str) -> AccuracyTarget:
    """``"cosine>=0.998"``, ``"top1-drop<=0.5"``, ``"cosine@text_embeds>=0.999,top1-agreement>=0.99"``.

    Conditions are joined by ``,`` or ``and``; all must hold. One-line InputError on bad syntax."""
    if not isinstance(expr, str) or not expr.strip():
        raise InputError("empty accuracy target", field="--accuracy-target", fix=_EXAMPLE)
    parts = [p for p in re.split(r",|\band\b", expr) if p.strip()]
    conditions = []
    for part in parts:
        m = _COND_RE.match(part)
        if not m:
            raise InputError(f"cannot read {part.strip()!r}", field="--accuracy-target",
                             fix=f"write METRIC[@OUTPUT]>=VALUE or METRIC<=VALUE, {_EXAMPLE}")
        metric, output, op, number = m.groups()
        if metric not in TARGET_METRICS:
            raise InputError(f"unknown metric {metric!r}", field="--accuracy-target",
                             fix=f"use one of {', '.join(TARGET_METRICS)}")
        want = TARGET_METRICS[metric][0]
        if op != want:
            raise InputError(f"{metric} takes {want} (it is a {'floor' if want == '>=' else 'ceiling'}), not {op}",
                             field="--accuracy-target", fix=f"write {metric}{want}{number}")
        try:
            value = float(number)
        except ValueError:
            raise InputError(f"{number!r} is not a number", field="--accuracy-target", fix=_EXAMPLE) from None
        if not np.isfinite(value):
            raise InputError(f"{number!r} is not finite", field="--accuracy-target", fix=_EXAMPLE)
        if metric in ("cosine", "min-cosine") and not -1.0 <= value <= 1.0:
            raise InputError(f"{metric} {value} is outside [-1, 1]", field="--accuracy-target", fix="e.g. cosine>=0.998")
        if metric == "top1-agreement" and not 0.0 <= value <= 1.0:
            raise InputError(f"top1-agreement {value} is a fraction in [0, 1]", field="--accuracy-target",
                             fix="e.g. top1-agreement>=0.99")
        if metric.endswith("-drop") and value < 0:
            raise InputError(f"{metric} {value} is negative", field="--accuracy-target",
                             fix=f"e.g. {metric}<=0.5 (percentage points)")
        conditions.append(Condition(metric, op, value, output))
    return AccuracyTarget(tuple(conditions))


# ------------------------------------------------------------------------------------------------
# Measuring a candidate against the FP32 reference

Runner = Callable[[Mapping[str, np.ndarray]], Mapping[str, np.ndarray]]


@dataclass
class Measurement:
    check: TargetCheck
    errors: dict[str, float]   # output -> 1 - mean cosine (float outputs)


class Evaluator:
    """FP32 reference outputs computed once; ``measure(runner)`` scores a candidate against ``target``."""

    def __init__(self, reference: Runner, feeds: Mapping[str, np.ndarray], target: AccuracyTarget, *,
                 output_names: Sequence[str], labels: np.ndarray | None = None,
                 task: tuple[str, list[str]] | None = None, batch_size: int = 16, check_target: bool = True,
                 confidence: float | None = 0.95, heads: Mapping[str, bool] | None = None):
        n = next(iter(feeds.values())).shape[0]
        self.heads = dict(heads or {})   # output -> made by a linear head (parity/output_kinds.py)
        self.batches = [{k: np.ascontiguousarray(v[i:i + batch_size]) for k, v in feeds.items()}
                        for i in range(0, n, batch_size)]
        self.target = target
        self.labels = labels
        self.output_names = list(output_names)
        self.task = task
        self.samples = n
        self.reference = [{k: np.asarray(v) for k, v in reference(b).items()} for b in self.batches]
        float_outs = [o for o in self.output_names if self.reference[0][o].dtype.kind == "f"]
        self.float_outputs = float_outs
        self._agreement_outputs: dict[Condition, list[str]] = {}
        self._cos_outputs: dict[Condition, list[str]] = {}
        self._task_for: dict[Condition, tuple[str, list[str]]] = {}
        self.ref_task: dict[tuple, float] = {}
        self.checks_target = check_target   # False: output errors only (sensitivity on unlabelled data)
        # Mean-cosine conditions are decided on a one-sided lower confidence bound of the mean, so that a
        # result chosen on these samples also holds on others (without it, a search that stops right at
        # the threshold lands below it on fresh data about half of the time).
        if confidence is not None and not 0.5 <= confidence < 1.0:
            raise InputError(f"confidence {confidence} is outside [0.5, 1)", field="confidence", fix="e.g. 0.95")
        self.confidence = confidence
        self.z = NormalDist().inv_cdf(confidence) if confidence else 0.0
        if check_target:
            self._plan()

    def _plan(self) -> None:
        from ..parity.metrics import is_logits
        from ..task import compute, guess as guess_task

        for c in self.target.conditions:
            if c.output and c.output not in self.output_names:
                raise InputError(f"the model has no output {c.output!r}", field="--accuracy-target",
                                 fix=f"outputs are {', '.join(self.output_names)}")
            if c.metric in ("cosine", "min-cosine"):
                outs = [c.output] if c.output else self.float_outputs
                if any(o not in self.float_outputs for o in outs) or not outs:
                    raise InputError(f"{c} needs float outputs", field="--accuracy-target",
                                     fix=f"float outputs are {', '.join(self.float_outputs) or 'none'}")
                self._cos_outputs[c] = outs
            elif c.metric == "top1-agreement":
                outs = [c.output] if c.output else [o for o in self.float_outputs
                                                     if is_logits(self.reference[0][o], self.heads.get(o))]
                if not outs:
                    raise InputError("no logits output to compare argmax on", field="--accuracy-target",
                                     fix=f"name one: top1-agreement@OUTPUT>=0.99 (outputs: {', '.join(self.output_names)})")
                self._agreement_outputs[c] = outs
            else:
                if self.labels is None:
                    raise InputError(f"{c} needs labels", field="--accuracy-target",
                                     fix="pass evaluation data with a 'labels' array, or use a cosine target")
                self._task_for[c] = self._resolve_task(c, guess_task)
        for c, (metric, outs) in self._task_for.items():
            ref = {o: np.concatenate([r[o] for r in self.reference]) for o in outs}
            self.ref_task[(metric, tuple(outs))] = compute(metric, ref, self.labels, outs)

    def _resolve_task(self, c: Condition, guess_task) -> tuple[str, list[str]]:
        from ..parity.metrics import is_logits
        from ..task import outputs_for as task_outputs_for

        wanted = _DROP_METRIC.get(c.metric)
        task = self.task
        if isinstance(task, str):
            task = (task, None)
        if c.metric == "metric-drop":
            if task is None:
                task = guess_task(self.output_names, self.heads)
            if task is None or not task[0]:
                raise InputError("cannot tell the model's task metric", field="--accuracy-target",
                                 fix="use top1-drop or recall@1-drop, or pass the metric")
            wanted = task[0]
        outs = [c.output] if c.output else task_outputs_for(
            wanted, self.output_names, known=task, heads=self.heads,
            top1_fallback=[o for o in self.float_outputs if is_logits(self.reference[0][o], self.heads.get(o))])
        if not outs:
            raise InputError(f"cannot tell which outputs {wanted} reads", field="--accuracy-target",
                             fix=f"name it: {c.metric}@OUTPUT (outputs: {', '.join(self.output_names)})")
        return wanted, outs

    def outputs_of(self, c: Condition) -> list[str]:
        return self._cos_outputs.get(c) or self._agreement_outputs.get(c) or self._task_for[c][1]

    def measure(self, runner: Runner) -> Measurement:
        from ..parity.metrics import per_sample_cosine
        from ..task import compute

        cosines: dict[str, list] = {o: [] for o in self.float_outputs}
        agree_hits: dict[str, int] = {}
        agree_total: dict[str, int] = {}
        agreement_outs = {o for outs in self._agreement_outputs.values() for o in outs}
        task_outs = {o for _, outs in self._task_for.values() for o in outs}
        collected: dict[str, list] = {o: [] for o in task_outs}
        for batch, ref in zip(self.batches, self.reference):
            got = {k: np.asarray(v) for k, v in runner(batch).items()}
            for o in self.float_outputs:
                if got[o].shape != ref[o].shape:
                    raise InputError(f"output {o!r} has shape {list(got[o].shape)}, FP32 gives {list(ref[o].shape)}",
                                     field=o, fix="report this model to edgemm")
                cos = per_sample_cosine(ref[o], got[o])
                cosines[o].append(np.where(np.isfinite(got[o].reshape(len(cos), -1)).all(1), cos, -1.0))
            for o in agreement_outs:
                agree_hits[o] = agree_hits.get(o, 0) + int((ref[o].argmax(-1) == got[o].argmax(-1)).sum())
                agree_total[o] = agree_total.get(o, 0) + int(np.prod(ref[o].shape[:-1]))
            for o in task_outs:
                collected[o].append(got[o])
        cos = {o: np.concatenate(v) for o, v in cosines.items()}
        errors = {o: float(1.0 - c.mean()) for o, c in cos.items()}
        values, bounds, failures = {}, {}, []
        for c in (self.target.conditions if self.checks_target else ()):
            decide = None
            if c.metric == "cosine":
                value = min(float(cos[o].mean()) for o in self._cos_outputs[c])
                if self.z:
                    decide = min(float(cos[o].mean() - self.z * _stderr(cos[o])) for o in self._cos_outputs[c])
                    bounds[str(c)] = decide
            elif c.metric == "min-cosine":
                value = min(float(cos[o].min()) for o in self._cos_outputs[c])
            elif c.metric == "top1-agreement":
                value = min(agree_hits[o] / max(agree_total[o], 1) for o in self._agreement_outputs[c])
            else:
                metric, outs = self._task_for[c]
                got = {o: np.concatenate(collected[o]) for o in outs}
                value = self.ref_task[(metric, tuple(outs))] - compute(metric, got, self.labels, outs)
            values[str(c)] = float(value)
            if not c.holds(value if decide is None else decide):
                extra = "" if decide is None else f" ({self.confidence:.0%} lower bound {decide:.6g})"
                failures.append(f"{c}: measured {value:.6g}{extra}")
        return Measurement(TargetCheck(not failures, values, failures, bounds), errors)


def _stderr(values: np.ndarray) -> float:
    return float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else 0.0


# ------------------------------------------------------------------------------------------------
# Cost model and Q/DQ variants

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


def bypass_qdq(model, keep: Sequence[str]):
    """Copy of a Q/DQ model in which the nodes ``keep`` read their inputs unquantized: every input that
    comes from a DequantizeLinear is rewired to what its QuantizeLinear read (or, for a quantized
    constant, to the dequantized value). Q/DQ pairs no one reads any more are removed."""
    import onnx
    from onnx import numpy_helper

    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    inits = {t.name: t for t in graph.initializer}
    keep = set(keep)
    added = {}
    for node in graph.node:
        if node.name not in keep:
            continue
        for idx, name in enumerate(node.input):
            dq = producer.get(name)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            q = producer.get(dq.input[0])
            if q is not None and q.op_type == "QuantizeLinear":
                node.input[idx] = q.input[0]
            elif dq.input[0] in inits:
                folded = name + "/fp_value"
                if folded not in added:
                    added[folded] = _dequantize_const(inits, dq, numpy_helper)
                node.input[idx] = folded
    graph.initializer.extend(numpy_helper.from_array(v, k) for k, v in added.items())
    _drop_dead_qdq(graph)
    return model


def _dequantize_const(inits, dq, numpy_helper) -> np.ndarray:
    from .fp8_sim import _broadcast_scale

    q = numpy_helper.to_array(inits[dq.input[0]]).astype(np.float32)
    scale = numpy_helper.to_array(inits[dq.input[1]])
    zp = numpy_helper.to_array(inits[dq.input[2]]).astype(np.float32) if len(dq.input) > 2 and dq.input[2] in inits \
        else np.zeros((), np.float32)
    axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
    s = _broadcast_scale(scale.astype(np.float32), q.ndim, axis)
    z = _broadcast_scale(zp, q.ndim, axis)
    return ((q - z) * s).astype(scale.dtype)


def _drop_dead_qdq(graph) -> None:
    outputs = {o.name for o in graph.output}
    while True:
        used = {i for n in graph.node for i in n.input} | outputs
        dead = [n for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                and not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    used = {i for n in graph.node for i in n.input} | outputs
    for t in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(t)


# ------------------------------------------------------------------------------------------------
# Backends: how a candidate is built and run

def _ort_session(path: Path, threads: int | None = None):
    # Same as the bundle runtime: no idle spinning, which would steal cores from interleaved timings.
    return cpu_session(path, spinning=False, intra_op_threads=threads or 0)


def _runner_of(session) -> Runner:
    names = [o.name for o in session.get_outputs()]
    inputs = [i.name for i in session.get_inputs()]
    return lambda feeds: dict(zip(names, session.run(names, {n: feeds[n] for n in inputs})))


class _CpuBackend:
    """ONNX Runtime INT8 variants, rebuilt per candidate (dynamic quantization needs no calibration;
    static ranges are cached by the builder)."""

    simulated = False
    high_precision = "fp32"

    def __init__(self, fp32_onnx: Path, calib, workdir: Path, recipe: str | None):
        from .mixed import OrtInt8Builder

        self.builder = OrtInt8Builder(fp32_onnx, calib, workdir / "int8", recipe=recipe)
        self.reference_path = self.builder.base
        self.units = list(self.builder.units)
        self.workdir = workdir
        self._n = 0

    def make(self, keep: Sequence[str]) -> Path:
        self._n += 1
        path = self.workdir / f"candidate_{self._n}.onnx"
        self.builder.build(path, keep)
        return path

    def runner(self, path: Path):
        return _runner_of(_ort_session(path))

    def finalize(self, keep: Sequence[str], out: Path) -> dict:
        self.builder.build(out, keep)
        return {**self.builder.describe(), "nodes_kept_fp32": sorted(keep)}

    def describe(self) -> dict:
        return self.builder.describe()


class _QdqBackend:
    """modelopt Q/DQ for TensorRT: calibrated once; candidates bypass Q/DQ pairs of the kept units."""

    def __init__(self, fp32_onnx: Path, calib, workdir: Path, mode: str, high_precision: str,
                 always_keep: Sequence[str]):
        import onnx

        from .exclusions import anchored as _anchored
        from .modelopt_qdq import quantize_qdq

        self.fp32 = Path(fp32_onnx)
        self.calib = calib
        self.mode = mode
        self.high_precision = high_precision
        self.simulated = mode == "fp8"
        self.workdir = workdir
        self.always_keep = list(always_keep)
        full = workdir / f"all_{mode}.onnx"
        self.recipe = quantize_qdq(self.fp32, full, calib, mode, exclude_nodes=_anchored(self.always_keep),
                                   high_precision=high_precision)
        self.full = onnx.load(str(full))
        dq_out = {o for n in self.full.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
        self.units = [n.name for n in self.full.graph.node
                      if n.op_type not in ("QuantizeLinear", "DequantizeLinear") and dq_out & set(n.input)]
        self.reference_path = self.fp32
        self._n = 0

    def make(self, keep: Sequence[str]) -> Path:
        import onnx

        self._n += 1
        path = self.workdir / f"candidate_{self._n}.onnx"
        onnx.save(bypass_qdq(self.full, keep), str(path))
        return path

    def runner(self, path: Path):
        if self.mode == "fp8":
            from .fp8_sim import Fp8Simulator

            return Fp8Simulator(path).run
        return _runner_of(_ort_session(path))

    def finalize(self, keep: Sequence[str], out: Path) -> dict:
        from .exclusions import anchored as _anchored
        from .modelopt_qdq import quantize_qdq

        exclude = sorted(set(keep) | set(self.always_keep))
        recipe = quantize_qdq(self.fp32, out, self.calib, self.mode, exclude_nodes=_anchored(exclude),
                              high_precision=self.high_precision)
        recipe["exclude_nodes_plain"] = exclude
        return recipe

    def describe(self) -> dict:
        return {"tool": "modelopt.onnx.quantization.quantize", "mode": self.mode,
                "high_precision_dtype": self.high_precision, "calibrated_once": True}


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

    from .branches import find_branches, node_module_paths, parse_branch_overrides
    from .mixed import _backend_and_target, normalize_for_ort, parse_precision_policy, resolve_policy

    started = time.perf_counter()
    fp32_onnx, out_onnx, workdir = Path(fp32_onnx), Path(out_onnx), Path(workdir)
    target = parse_accuracy_target(target) if isinstance(target, str) else target
    backend_name, profile = _backend_and_target(backend, None)
    if granularity not in ("layer", "block"):
        raise InputError(f"unknown granularity {granularity!r}", field="granularity", fix="layer or block")
    if backend_name == "onnxruntime" and mode != "int8":
        raise InputError(f"{mode} does not run on ONNX Runtime CPU", field="--accuracy-target",
                         fix="the CPU search uses int8; use a TensorRT target with compute capability >= 8.9 for fp8")
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

    # Which branches are searched: those the policy quantizes (all of them without a policy).
    source = fp32_onnx
    if backend_name == "onnxruntime":
        source = workdir / "fp32_ort.onnx"
        normalize_for_ort(fp32_onnx, source)
    modules = node_module_paths(onnx.load(str(source), load_external_data=False))
    branches = find_branches(source, overrides=parse_branch_overrides(branch_overrides))   # for the report too
    branch_of, branch_table, fixed_nodes = branches.branch_of, None, []
    if policy is not None:
        policy = parse_precision_policy(policy) if isinstance(policy, str) else dict(policy)
        branch_table, _ = resolve_policy(policy, branches, backend_name, profile)
        searched = {b for b, v in branch_table.items() if v["precision"] in ("int8", "fp8")}
        fixed_nodes = [n for n, b in branch_of.items() if b not in searched]

    log(f"accuracy-aware {mode}: target {target} on {backend_name}")
    if backend_name == "onnxruntime":
        be = _CpuBackend(source, calib, workdir, int8_recipe)
    else:
        be = _QdqBackend(fp32_onnx, calib, workdir, mode, high_precision, fixed_nodes)
    fixed = set(fixed_nodes)
    always_keep = [u for u in be.units if u in fixed]   # units of branches the policy does not quantize
    searchable = [u for u in be.units if u not in set(always_keep)]
    if not searchable:
        raise InputError("nothing to quantize: no MatMul/Conv layer outside the branches kept in high precision",
                         file=fp32_onnx, fix="quantize a branch that holds MatMul/Conv layers")

    ref_runner = be.runner(be.reference_path) if backend_name == "onnxruntime" else _runner_of(_ort_session(fp32_onnx))
    from ..parity.output_kinds import graph_score_outputs

    fp32_model = onnx.load(str(fp32_onnx), load_external_data=False)
    output_names = [o.name for o in fp32_model.graph.output]
    evaluator = Evaluator(ref_runner, eval_feeds, target, output_names=output_names, labels=labels, task=metric,
                          batch_size=batch_size, confidence=confidence, heads=graph_score_outputs(fp32_model))
    del fp32_model
    sens_feeds = _sample(calib, sensitivity_samples)
    sensor = Evaluator(ref_runner, sens_feeds, target, output_names=output_names, batch_size=batch_size,
                       check_target=False)
    builds = {"n": 0}
    measured: dict[tuple, Measurement] = {}

    def candidate(keep_units: Sequence[str], ev: Evaluator = evaluator) -> Measurement:
        """Build the variant keeping ``keep_units`` unquantized and measure it (cached by unit set)."""
        key = (frozenset(keep_units), id(ev))
        if key not in measured:
            path = be.make(sorted(set(keep_units) | set(always_keep)))
            builds["n"] += 1
            try:
                measured[key] = ev.measure(be.runner(path))
            finally:
                _remove(path)   # candidates of a large model would fill the disk
        return measured[key]

    full_path = be.make(list(always_keep))
    full_runner = be.runner(full_path)
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
                           "bought": {k: _round(final_check.values[k] - m.check.values[k]) for k in final_check.values}}
    keep_final = sorted({u for g in kept for u in g.nodes} | set(always_keep))
    log(f"  keeping {len(kept)} of {len(groups)} {granularity}s in {be.high_precision}; building the result")

    recipe_backend = be.finalize(keep_final, out_onnx)
    result_check = final_check
    notes = []
    if backend_name == "tensorrt":
        m = evaluator.measure(be.runner(out_onnx))
        result_check = m.check
        if not m.check.met:
            notes.append("modelopt's final placement (kept layers as exclude_nodes) measures below the target "
                         f"that the bypassed variant met: {'; '.join(m.check.failures)}")

    # Cost: measured latency (CPU), split over kept groups by MACs.
    macs = estimate_macs(be.reference_path, eval_feeds)
    op_of = {n.name: n.op_type for n in onnx.load(str(be.reference_path), load_external_data=False).graph.node}
    latency = None
    if backend_name == "onnxruntime":
        latency = _latency(be, full_path, out_onnx, eval_feeds, timing_iterations)
    total_macs = sum(macs.get(u, 0.0) for u in searchable) or 1.0
    kept_macs = sum(macs.get(u, 0.0) for g in kept for u in g.nodes) or 1.0
    kept_table = []
    for g in kept:
        g_macs = sum(macs.get(u, 0.0) for u in g.nodes)
        row = {"unit": g.name, "nodes": g.nodes, "module": g.module,
               "ops": sorted({op_of.get(u, "?") for u in g.nodes}),
               **({"branch": branch_of[g.nodes[0]]} if g.nodes[0] in branch_of else {}), "sensitivity": _round(g.score),
               "macs_share": _round(g_macs / total_macs), **loo.get(g.name, {})}
        if latency:
            row["latency_cost_ms_est"] = _round(latency["overhead_ms"] * g_macs / kept_macs)
        kept_table.append(row)
    ranking = [{"unit": g.name, "module": g.module, "sensitivity": _round(g.score)}
               for g in sorted(groups, key=lambda g: -g.score)[:20]]
    precisions = [mode] + ([be.high_precision] if keep_final else [])
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
        "kept_precision": be.high_precision,
        "kept": kept_table,
        "exclude_nodes": keep_final,
        "search": {"granularity": granularity, "units": len(groups), "builds": builds["n"],
                   "eval_samples": evaluator.samples, "sensitivity_samples": sensor.samples,
                   "seconds": round(time.perf_counter() - started, 1), "steps": steps, "most_sensitive": ranking},
        "backend": recipe_backend,
        **({"branches": branch_table} if branch_table else {}),
        **({"latency": latency} if latency else {"latency": "measure on the device (edgemm verify)"}),
    }
    if be.simulated:
        from .fp8_sim import SIMULATED_NOTE

        notes.append(SIMULATED_NOTE)
    if backend_name == "onnxruntime" and not result_check.met:
        notes.append("the built model misses the target: " + "; ".join(result_check.failures))
    log(f"accuracy-aware done in {recipe['search']['seconds']:.0f} s: kept {len(kept)} {granularity}(s); "
        + ", ".join(f"{k} = {v:.6g}" for k, v in result_check.values.items())
        + (f"; p50 {latency['ratio_vs_fp32']:.3f}x FP32" if latency else ""))
    shutil.rmtree(workdir / "int8", ignore_errors=True)
    _remove(full_path)
    return PrecisionResult(out_onnx, mixed_mode_name(precisions), recipe, notes=notes, simulated=be.simulated,
                           per_branch={b: v["precision"] for b, v in branch_table.items()} if branch_table else None)


def _remove(path: Path) -> None:
    for p in (Path(path), Path(str(path) + ".data")):
        try:
            p.unlink()
        except FileNotFoundError:
            pass


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


def _latency(be: _CpuBackend, all_path: Path, final_path: Path, feeds, iterations: int) -> dict:
    """p50 at batch 1 of FP32, all-INT8 and the result, timed interleaved in one run."""
    from ..parity.latency import measure_interleaved

    one = {k: np.ascontiguousarray(np.asarray(v)[:1]) for k, v in feeds.items()}
    sessions = {"fp32": _ort_session(be.reference_path), "all_int8": _ort_session(all_path),
                "result": _ort_session(final_path)}
    fns = {k: (lambda s=s: s.run(None, one)) for k, s in sessions.items()}
    stats = measure_interleaved(fns, warmup=5, iterations=iterations)
    fp32, q, res = stats["fp32"].p50_ms, stats["all_int8"].p50_ms, stats["result"].p50_ms
    return {"batch": 1, "iterations": iterations, "fp32_p50_ms": _round(fp32), "all_int8_p50_ms": _round(q),
            "result_p50_ms": _round(res), "ratio_vs_fp32": _round(res / fp32), "all_int8_ratio_vs_fp32": _round(q / fp32),
            "overhead_ms": _round(max(res - q, 0.0))}
