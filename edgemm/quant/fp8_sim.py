"""Simulated FP8 accuracy on a CPU: run an FP8 (E4M3) Q/DQ model as plain float arithmetic.

FP8 Q/DQ graphs are made for TensorRT on compute capability >= 8.9. ONNX Runtime CPU runs some of them
and rejects others (float8 Transpose, builds without float8 types), so edgemm does not rely on it:
``rewrite_fp8_qdq`` replaces every float8 QuantizeLinear -> DequantizeLinear pair by what it computes,

    y = round_to_fp8(clip(x / s_q, -max, max)) * s_dq

- on weights (constant inputs), folded into a float initializer with ml_dtypes' float8 casts;
- on activations, as float ops: ``round_to_fp8(v) = Round(v / step) * step`` with
  ``step = 2 ** (floor(log2(max(|v|, 2**emin))) - mantissa_bits)``. ``Round`` is round-half-to-even, as
  IEEE casts are, so this equals ml_dtypes' cast (tested); ``log2`` may misjudge the exponent only within
  one float32 ulp of a power of two, where both exponents round to the same power of two.
The rewritten model holds no float8 tensor and runs on any ONNX Runtime. Its numbers are an estimate
of the device's: TensorRT fuses ops and accumulates in its own order, so results are labelled simulated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from ..errors import EdgemmError, InputError

__all__ = ["simulate_fp8", "Fp8Simulator", "rewrite_fp8_qdq", "round_to_fp8", "FP8_FORMATS", "SIMULATED_NOTE"]

SIMULATED_NOTE = ("FP8 accuracy simulated on the CPU: FP8 Q/DQ pairs replaced by float ops rounding to E4M3 "
                  "(ml_dtypes semantics), not measured on a TensorRT engine")


@dataclass(frozen=True)
class Fp8Format:
    name: str
    mantissa_bits: int
    min_normal_exp: int
    max: float

    def np_dtype(self):
        import ml_dtypes

        return {"FLOAT8E4M3FN": ml_dtypes.float8_e4m3fn, "FLOAT8E5M2": ml_dtypes.float8_e5m2}[self.name]


# Saturating formats as TensorRT uses them (QuantizeLinear's saturate=1 clips to +-max).
FP8_FORMATS = {
    "FLOAT8E4M3FN": Fp8Format("FLOAT8E4M3FN", 3, -6, 448.0),
    "FLOAT8E5M2": Fp8Format("FLOAT8E5M2", 2, -14, 57344.0),
}


def round_to_fp8(values: np.ndarray, fmt: str = "FLOAT8E4M3FN") -> np.ndarray:
    """Reference rounding with ml_dtypes (saturating; NaN stays NaN), returned as float32."""
    spec = FP8_FORMATS[fmt]
    v = np.clip(np.asarray(values, dtype=np.float32), -spec.max, spec.max)
    return v.astype(spec.np_dtype()).astype(np.float32)


def _fp8_type_of(elem_type: int) -> str | None:
    from onnx import TensorProto

    name = TensorProto.DataType.Name(elem_type)
    return name if name in FP8_FORMATS else None


@dataclass
class RewriteStats:
    weight_pairs: int = 0          # folded with ml_dtypes
    activation_pairs: int = 0      # replaced by float rounding ops
    dequantize_only: int = 0       # float8 initializers behind a lone DequantizeLinear (folded)
    format: str | None = None

    def to_dict(self) -> dict:
        return {"weight_pairs": self.weight_pairs, "activation_pairs": self.activation_pairs,
                "dequantize_only": self.dequantize_only, "format": self.format}


class _Graph:
    """Lookups over one graph, kept small on purpose."""

    def __init__(self, model):
        from onnx import numpy_helper

        self.model = model
        self.graph = model.graph
        self.inits = {t.name: t for t in self.graph.initializer}
        self.consts = {o: n for n in self.graph.node if n.op_type == "Constant" for o in n.output}
        self._np = numpy_helper
        self.consumers: dict[str, list] = {}
        for n in self.graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)

    def const(self, name: str) -> np.ndarray | None:
        if name in self.inits:
            return self._np.to_array(self.inits[name])
        node = self.consts.get(name)
        if node is not None:
            for a in node.attribute:
                if a.name == "value":
                    return self._np.to_array(a.t)
        return None

    def elem_type(self, name: str) -> int | None:
        if name in self.inits:
            return self.inits[name].data_type
        node = self.consts.get(name)
        if node is not None:
            return next((a.t.data_type for a in node.attribute if a.name == "value"), None)
        return None


def _attr(node, name, default):
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _q_format(g: _Graph, q) -> str | None:
    """float8 format a QuantizeLinear produces (from output_dtype or its zero point), else None."""
    out_dtype = _attr(q, "output_dtype", 0)
    if out_dtype:
        return _fp8_type_of(out_dtype)
    if len(q.input) > 2 and q.input[2]:
        elem = g.elem_type(q.input[2])
        return _fp8_type_of(elem) if elem is not None else None
    return None


def _broadcast_scale(scale: np.ndarray, rank: int, axis: int) -> np.ndarray:
    if scale.ndim == 0 or scale.size == 1:
        return scale.reshape(())
    shape = [1] * rank
    shape[axis % rank] = scale.size
    return scale.reshape(shape)


def rewrite_fp8_qdq(model):
    """Return (float-only copy of ``model``, RewriteStats). Raises InputError on float8 patterns it
    cannot express (blocked quantization, float8 tensors used by other ops)."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.ModelProto.FromString(model.SerializeToString())
    g = _Graph(model)
    stats = RewriteStats()
    drop: set[int] = set()
    new_nodes: dict[int, list] = {}       # index of the removed DQ node -> replacement nodes
    new_inits = []
    node_index = {id(n): i for i, n in enumerate(g.graph.node)}

    for q in list(g.graph.node):
        if q.op_type != "QuantizeLinear":
            continue
        fmt = _q_format(g, q)
        if fmt is None:
            continue
        stats.format = stats.format or fmt
        if _attr(q, "block_size", 0):
            raise InputError("blocked FP8 quantization cannot be simulated yet", field=q.name,
                             fix="quantize FP8 per tensor or per channel")
        dqs = g.consumers.get(q.output[0], [])
        if not dqs or any(d.op_type != "DequantizeLinear" for d in dqs) or q.output[0] in {
                o.name for o in g.graph.output}:
            raise InputError(f"float8 tensor {q.output[0]!r} feeds ops other than DequantizeLinear", field=q.name,
                             fix="export the Q/DQ model with modelopt (TensorRT placement)")
        x_name, s_name = q.input[0], q.input[1]
        s_q = g.const(s_name)
        if s_q is None:
            raise InputError(f"scale {s_name!r} is not a constant", field=q.name, fix="use static FP8 scales")
        x_const = g.const(x_name)
        drop.add(node_index[id(q)])
        for dq in dqs:
            s_dq = g.const(dq.input[1])
            if s_dq is None:
                raise InputError(f"scale {dq.input[1]!r} is not a constant", field=dq.name, fix="use static FP8 scales")
            drop.add(node_index[id(dq)])
            out_type = helper.np_dtype_to_tensor_dtype(s_dq.dtype)
            if x_const is not None:
                value = _fold(x_const, s_q, s_dq, _attr(q, "axis", 1), _attr(dq, "axis", 1), fmt)
                new_inits.append(numpy_helper.from_array(value.astype(s_dq.dtype), dq.output[0]))
                stats.weight_pairs += 1
            else:
                nodes, inits = _rounding_nodes(dq.name, x_name, s_q, s_dq, q, dq, fmt, out_type)
                new_nodes[node_index[id(dq)]] = nodes
                new_inits.extend(inits)
                stats.activation_pairs += 1

    # DequantizeLinear of float8 initializers with no QuantizeLinear (dq_only weights): fold.
    for dq in g.graph.node:
        if dq.op_type != "DequantizeLinear" or node_index[id(dq)] in drop:
            continue
        elem = g.elem_type(dq.input[0])
        fmt = _fp8_type_of(elem) if elem is not None else None
        if fmt is None:
            continue
        q_vals = g.const(dq.input[0]).astype(np.float32)
        s_dq = g.const(dq.input[1])
        scale = _broadcast_scale(s_dq.astype(np.float32), q_vals.ndim, _attr(dq, "axis", 1))
        new_inits.append(numpy_helper.from_array((q_vals * scale).astype(s_dq.dtype), dq.output[0]))
        drop.add(node_index[id(dq)])
        stats.dequantize_only += 1
        stats.format = stats.format or fmt

    rebuilt = []
    for i, node in enumerate(g.graph.node):
        if i in new_nodes:
            rebuilt.extend(new_nodes[i])
        elif i not in drop:
            rebuilt.append(node)
    del g.graph.node[:]
    g.graph.node.extend(rebuilt)
    g.graph.initializer.extend(new_inits)
    _drop_unused_initializers(g.graph)
    leftovers = [t.name for t in g.graph.initializer if _fp8_type_of(t.data_type)]
    leftovers += [n.name for n in g.graph.node if n.op_type == "Cast" and _fp8_type_of(_attr(n, "to", 0) or 0)]
    if leftovers:
        raise InputError(f"float8 tensors remain outside Q/DQ pairs ({', '.join(leftovers[:3])})",
                         fix="simulate models whose FP8 appears only as QuantizeLinear/DequantizeLinear pairs")
    return model, stats


def _fold(x: np.ndarray, s_q: np.ndarray, s_dq: np.ndarray, q_axis: int, dq_axis: int, fmt: str) -> np.ndarray:
    x32 = x.astype(np.float32)
    sq = _broadcast_scale(s_q.astype(np.float32), x32.ndim, q_axis)
    sdq = _broadcast_scale(s_dq.astype(np.float32), x32.ndim, dq_axis)
    return round_to_fp8(x32 / sq, fmt) * sdq


def _rounding_nodes(prefix: str, x_name: str, s_q: np.ndarray, s_dq: np.ndarray, q, dq, fmt: str, out_type: int):
    """Float ops for one activation Q/DQ pair (computed in float32, cast to the DequantizeLinear type)."""
    from onnx import TensorProto, helper, numpy_helper

    spec = FP8_FORMATS[fmt]
    p = f"{prefix}/fp8sim"
    names = lambda s: f"{p}/{s}"  # noqa: E731 - local naming helper
    inits = []

    def const(name: str, value) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value, dtype=np.float32), names(name)))
        return names(name)

    # modelopt's FP8 activations are per tensor; a per-channel activation scale would need the tensor's
    # rank to broadcast, which is not known here, so it is refused rather than guessed.
    for node, scale in ((q, s_q), (dq, s_dq)):
        if np.asarray(scale).size != 1:
            raise InputError("per-channel FP8 activation scales cannot be simulated", field=node.name,
                             fix="use per-tensor activation scales (modelopt's default)")
    sq = const("scale_q", np.asarray(s_q, dtype=np.float32).reshape(()))
    sdq = const("scale_dq", np.asarray(s_dq, dtype=np.float32).reshape(()))
    lo, hi = const("min", -spec.max), const("max", spec.max)
    tiny = const("min_normal", 2.0 ** spec.min_normal_exp)
    inv_ln2 = const("inv_ln2", 1.0 / math.log(2.0))
    mbits = const("mantissa_bits", float(spec.mantissa_bits))
    two = const("two", 2.0)
    nodes = [
        helper.make_node("Cast", [x_name], [names("x")], name=names("cast_in"), to=TensorProto.FLOAT),
        helper.make_node("Div", [names("x"), sq], [names("scaled")], name=names("div")),
        helper.make_node("Clip", [names("scaled"), lo, hi], [names("v")], name=names("saturate")),
        helper.make_node("Abs", [names("v")], [names("abs")], name=names("abs")),
        helper.make_node("Max", [names("abs"), tiny], [names("abs_n")], name=names("max")),
        helper.make_node("Log", [names("abs_n")], [names("ln")], name=names("log")),
        helper.make_node("Mul", [names("ln"), inv_ln2], [names("log2")], name=names("to_log2")),
        helper.make_node("Floor", [names("log2")], [names("exp")], name=names("floor")),
        helper.make_node("Sub", [names("exp"), mbits], [names("step_exp")], name=names("step_exp")),
        helper.make_node("Pow", [two, names("step_exp")], [names("step")], name=names("step")),
        helper.make_node("Div", [names("v"), names("step")], [names("units")], name=names("units")),
        helper.make_node("Round", [names("units")], [names("rounded")], name=names("round")),
        helper.make_node("Mul", [names("rounded"), names("step")], [names("fp8")], name=names("fp8")),
        helper.make_node("Mul", [names("fp8"), sdq], [names("y")], name=names("dequant")),
        helper.make_node("Cast", [names("y")], [dq.output[0]], name=names("cast_out"), to=out_type),
    ]
    return nodes, inits


def _drop_unused_initializers(graph) -> None:
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    used |= _subgraph_inputs(graph)
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def _subgraph_inputs(graph) -> set[str]:
    names = set()
    for n in graph.node:
        for a in n.attribute:
            if a.g is not None and a.g.node:
                names |= {i for sn in a.g.node for i in sn.input}
    return names


class Fp8Simulator:
    """Build once, run many times: ``Fp8Simulator(path).run(feeds) -> {output: array}``."""

    def __init__(self, qdq_onnx, *, threads: int | None = None):
        import onnx

        from ..onnx_io import cpu_session

        path = Path(qdq_onnx)
        if not path.is_file():
            raise InputError("FP8 model not found", file=path, fix="pass the Q/DQ ONNX file of an --fp8 build")
        model = onnx.load(str(path))
        rewritten, stats = rewrite_fp8_qdq(model)
        if not (stats.weight_pairs or stats.activation_pairs or stats.dequantize_only):
            raise InputError("the model holds no float8 Q/DQ nodes", file=path, fix="pass an FP8 (--fp8) model")
        self.stats = stats
        try:
            self._session = cpu_session(rewritten.SerializeToString(), intra_op_threads=threads or 0)
        except Exception as exc:  # ORT's errors vary by op; report them in one line
            raise EdgemmError(f"ONNX Runtime cannot run the simulated FP8 graph ({' '.join(str(exc).split())[:300]})",
                              file=path, fix="report this model to edgemm") from exc
        self.output_names = [o.name for o in self._session.get_outputs()]
        self.input_names = [i.name for i in self._session.get_inputs()]

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise InputError(f"no array for input {missing[0]!r}", field=missing[0],
                             fix=f"the model takes {', '.join(self.input_names)}")
        outs = self._session.run(self.output_names, {n: np.asarray(feeds[n]) for n in self.input_names})
        return dict(zip(self.output_names, outs))

    __call__ = run


def simulate_fp8(qdq_onnx, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Outputs of an FP8 Q/DQ model on ``feeds``, simulated with float ops on the CPU (see module doc)."""
    return Fp8Simulator(qdq_onnx).run(feeds)


def make_runner(qdq_onnx) -> Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]:
    return Fp8Simulator(qdq_onnx).run
