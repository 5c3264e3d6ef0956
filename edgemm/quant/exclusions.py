"""Which nodes stay out of quantization: the user's ``--exclude`` patterns, and the nodes no calibration
can serve (attention-mask arithmetic and any tensor whose range is non-finite or a sentinel).

Why the automatic part exists: transformer towers turn an integer attention mask into an additive float
mask holding ``finfo(float32).min`` (-3.4e38) or ``-inf`` (Hugging Face BERT: ``(1 - mask) * min``, or
``Where(mask, 0, min)`` once exported through SDPA). Histogram calibration cannot bin such a range
(modelopt: "Too many bins for data range"), and a mask quantized to 8 bits stops masking. Two rules find
these nodes, because neither alone is enough:

* data flow: float tensors computed only from integer/bool graph inputs and constants (the mask
  arithmetic), and the nodes that combine one with an activation (the mask application);
* a probe: every float tensor's range on a few calibration samples, plus the same samples with padding
  forced into 0/1 inputs (a calibration set without padding would never show the sentinel); a tensor
  beyond ``SENTINEL_ABS`` or non-finite excludes the nodes that read or write it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

from ..errors import InputError

__all__ = ["parse_exclude", "resolve_exclude", "unquantizable_nodes", "anchored", "SENTINEL_ABS"]

# No real activation reaches 1e9; mask sentinels (-1e9, -3.4e38, -inf) do.
SENTINEL_ABS = 1e9
_GATHERS = {"Gather", "GatherElements", "GatherND"}
_APPLY_OPS = {"Add", "Sub", "Mul", "Div", "Where", "Max", "Min"}       # how a mask meets activations
_NON_FLOAT_RESULT = {"Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "Not", "And", "Or", "Xor",
                     "IsNaN", "IsInf", "ArgMax", "ArgMin", "Shape", "Size", "NonZero"}
_PROBE_SAMPLES = 4
EXCLUDE_SYNTAX = ("op:TYPE (every node of an ONNX op type, e.g. op:Softmax), module:GLOB (nodes exported from "
                  "matching torch modules, e.g. module:text.encoder.layer.1.*), or a regular expression "
                  "matching whole node names, e.g. '/text/.*'")


def anchored(names: Iterable[str]) -> list[str]:
    """modelopt and AutoCast read node-name regexes: match each name exactly."""
    return ["^" + re.escape(n) + "$" for n in sorted(names)]


def parse_exclude(items: Iterable[str] | None) -> list[str]:
    """``["op:Softmax,/text/.*", "module:head"]`` -> one pattern per entry; bad syntax is a one-line error."""
    patterns: list[str] = []
    for item in items or []:
        for raw in str(item).split(","):
            pattern = raw.strip()
            if not pattern:
                raise InputError(f"empty pattern in {item!r}", field="--exclude", fix=f"use {EXCLUDE_SYNTAX}")
            kind, sep, body = pattern.partition(":")
            if sep and kind in ("op", "module"):
                if not body.strip():
                    raise InputError(f"{pattern!r} names no {kind}", field="--exclude", fix=f"use {EXCLUDE_SYNTAX}")
            else:
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise InputError(f"{pattern!r} is not a regular expression ({exc})", field="--exclude",
                                     fix=f"use {EXCLUDE_SYNTAX}") from exc
            patterns.append(pattern)
    return patterns


def resolve_exclude(model, patterns: Iterable[str], *, strict: bool = True) -> list[str]:
    """Node names of ``model`` (an onnx.ModelProto) that the patterns select. With ``strict``, a pattern
    that selects no node is an error: a typo would otherwise quantize what the user asked to keep."""
    import fnmatch

    from .branches import node_module_paths

    patterns = list(patterns)
    if not patterns:
        return []
    nodes = [n for n in model.graph.node if n.name]
    modules = node_module_paths(model) if any(p.startswith("module:") for p in patterns) else {}
    selected: set[str] = set()
    for pattern in patterns:
        kind, _, body = pattern.partition(":")
        if kind == "op":
            hits = {n.name for n in nodes if n.op_type == body.strip()}
        elif kind == "module":
            glob = body.strip()
            hits = {n.name for n in nodes if modules.get(n.name) is not None
                    and (fnmatch.fnmatchcase(modules[n.name], glob)
                         or fnmatch.fnmatchcase(modules[n.name], glob + ".*"))}
        else:
            regex = re.compile(pattern)
            hits = {n.name for n in nodes if regex.fullmatch(n.name)}
        if not hits and strict:
            ops = sorted({n.op_type for n in nodes})
            raise InputError(f"{pattern!r} matches no node of the exported graph", field="--exclude",
                             fix=f"use {EXCLUDE_SYNTAX}; e.g. node {nodes[0].name if nodes else '?'!r}, "
                                 f"op types {', '.join(ops[:12])}")
        selected |= hits
    return sorted(selected)


# --------------------------------------------------------------------------------------------------
# Automatic exclusions

def _constants(model) -> set[str]:
    names = {i.name for i in model.graph.initializer}
    names.update(o for n in model.graph.node if n.op_type == "Constant" for o in n.output)
    names.add("")  # an omitted optional input
    return names


def mask_arithmetic_nodes(model) -> dict[str, str]:
    """node name -> reason, for nodes producing float tensors computed only from integer/bool graph inputs,
    constants and shapes (the mask arithmetic), and the arithmetic nodes that apply such a mask to an
    activation. An embedding lookup (a Gather of a constant table by token ids) yields activations."""
    from onnx import TensorProto

    from ..onnx_graph import graph_inputs

    float_types = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}
    typed = {v.name: v.type.tensor_type.elem_type for v in (*model.graph.value_info, *model.graph.output)}
    static = _constants(model)                              # constants and shapes: no data in them
    origin = {name: name for name, (elem, _) in graph_inputs(model).items() if elem not in float_types}
    is_float: dict[str, bool] = {}
    out: dict[str, str] = {}
    for node in model.graph.node:   # ONNX graphs are topologically sorted
        inputs = list(node.input)
        derived = [i for i in inputs if i in origin]
        if node.op_type in ("Shape", "Size") or all(i in static for i in inputs):
            static.update(node.output)
        elif derived and all(i in origin or i in static for i in inputs) and not (
                node.op_type in _GATHERS and inputs[0] in static):
            source = origin[derived[0]]
            float_out = any(typed.get(o) in float_types for o in node.output) or _cast_to_float(node) or (
                node.op_type not in _NON_FLOAT_RESULT and any(is_float.get(i) for i in derived))
            for o in node.output:
                origin[o], is_float[o] = source, bool(float_out)
            if float_out and node.name:
                out[node.name] = f"mask arithmetic on input {source!r}"
        elif derived and node.name and node.op_type in _APPLY_OPS:
            floats = [i for i in derived if is_float.get(i) or node.op_type == "Where"]
            if floats:
                out[node.name] = f"applies a mask computed from input {origin[floats[0]]!r}"
    return out


def _cast_to_float(node) -> bool:
    from onnx import TensorProto

    if node.op_type != "Cast":
        return False
    to = next((a.i for a in node.attribute if a.name == "to"), None)
    return to in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE)


def _padded(feed: Mapping[str, np.ndarray], float_inputs: set[str]) -> dict[str, np.ndarray] | None:
    """The feed with the last position of every 0/1 integer or bool input set to 0 (padding), or None
    when no input looks like a mask."""
    out, changed = dict(feed), False
    for name, arr in feed.items():
        if name in float_inputs or arr.ndim < 2 or arr.shape[-1] < 2:
            continue
        values = np.unique(arr)
        if arr.dtype == bool or (arr.dtype.kind in "iu" and set(values.tolist()) <= {0, 1}):
            padded = arr.copy()
            padded[..., -1] = 0
            out[name], changed = padded, True
    return out if changed else None


def sentinel_range_nodes(model, calib: Mapping[str, np.ndarray], workdir: Path) -> dict[str, str]:
    """node name -> reason, for nodes reading or writing a float tensor that is non-finite or beyond
    ``SENTINEL_ABS`` on a few calibration samples (and on the same samples with padding forced).
    ``model`` carries inferred value types (``onnx.shape_inference``): they say which tensors to watch."""
    import onnx
    from onnx import TensorProto

    from ..onnx_graph import graph_inputs
    from ..onnx_io import cpu_session, save_onnx

    inferred = model
    float_types = {TensorProto.FLOAT, TensorProto.FLOAT16}
    present = {o.name for o in inferred.graph.output}
    watched = [v for v in inferred.graph.value_info
               if v.type.tensor_type.elem_type in float_types and v.name not in present]
    probe = onnx.ModelProto()
    probe.CopyFrom(inferred)
    probe.graph.output.extend(watched)
    path = Path(workdir) / "sentinel_probe.onnx"
    save_onnx(probe, path)
    del probe
    inputs = graph_inputs(model)
    float_inputs = {n for n, (elem, _) in inputs.items() if elem in float_types}
    static = [dims[0] for _, dims in inputs.values() if dims and isinstance(dims[0], int) and dims[0] > 0]
    batch = static[0] if static else 1
    n = next(iter(calib.values())).shape[0]
    feeds = [{k: np.ascontiguousarray(v[i:i + batch]) for k, v in calib.items()}
             for i in range(0, min(n, _PROBE_SAMPLES * batch) - batch + 1, batch)]
    feeds += [p for p in (_padded(f, float_inputs) for f in feeds) if p is not None]
    peak: dict[str, float] = {}
    try:
        sess = cpu_session(path)
        names = [o.name for o in sess.get_outputs()]
        for feed in feeds:
            for name, value in zip(names, sess.run(None, feed)):
                arr = np.asarray(value)
                if arr.dtype.kind != "f" or not arr.size:
                    continue
                top = float(np.abs(arr).max()) if np.isfinite(arr).all() else float("inf")
                peak[name] = max(peak.get(name, 0.0), top)
        del sess
    finally:
        path.unlink(missing_ok=True)
        path.with_name(path.name + ".data").unlink(missing_ok=True)
    bad = {name: top for name, top in peak.items() if not top < SENTINEL_ABS}
    out: dict[str, str] = {}
    for node in model.graph.node:
        hit = next((t for t in (*node.input, *node.output) if t in bad), None)
        if hit is not None and node.name:
            top = bad[hit]
            out[node.name] = (f"tensor {hit!r} is non-finite" if top == float("inf") else
                              f"tensor {hit!r} reaches {top:.3g}") + " on calibration data (a mask sentinel?)"
    return out


def unquantizable_nodes(model_path: Path, calib: Mapping[str, np.ndarray], workdir: Path) -> dict[str, str]:
    """Both rules above: node name -> why it stays in high precision."""
    import onnx

    model = onnx.load(str(model_path))
    try:
        typed = onnx.shape_inference.infer_shapes(model)
    except Exception:  # best effort: without value types the probe watches nothing, data flow still works
        typed = model
    found = mask_arithmetic_nodes(typed)
    for name, why in sentinel_range_nodes(typed, calib, workdir).items():
        found.setdefault(name, why)
    return dict(sorted(found.items()))
