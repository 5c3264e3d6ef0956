"""What each model output is, decided from the graph and the values, never from its name: class scores
(top-1 agreement is checked), embeddings (cosine), or other. Compile records the decision in the manifest
(``output_heads``, read from the FP32 graph) and verify reads it back, so both judge a bundle by the same
checks.

Rule: a float output of rank >= 2 whose last axis holds >= 2 values is *scores* when the graph makes it
with a linear head or a score function and nothing in the graph reads it on; otherwise it is an
*embedding* (pooled, normalised or projected features). Walking back from the output (through reshapes,
casts and Q/DQ): MatMul/Gemm/Einsum (and their quantized forms) and Softmax/LogSoftmax/Sigmoid are heads;
an Add/Sub/Mul/Div with one operand computed from weights alone (a bias, a logit scale) is looked
through to the other operand; one with two activation operands is a residual sum, a gate or a
normalisation (``x / ||x||``), not a head - unless one operand is an integer MatMul being dequantized
(ORT's dynamic INT8). An output the graph itself goes on computing with (a projection that is then
normalised into another output, a hidden state fed to a pooler) is a feature, whatever makes it; only
score functions and reshapes may read it. Without a graph, the values alone decide (rows not unit
length)."""

from __future__ import annotations

from typing import Mapping

import numpy as np

SCORES, EMBEDDING, OTHER = "scores", "embedding", "other"

_HEAD_OPS = {"MatMul", "Gemm", "Einsum", "Softmax", "LogSoftmax", "Sigmoid",
             # quantized and fused forms of the same heads (ORT INT8 bundles)
             "MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QLinearMatMul", "QGemm",
             "FusedMatMul", "QLinearSoftmax", "QLinearSigmoid"}
_INTEGER_MATMULS = {"MatMulInteger", "ConvInteger"}  # their float result is Cast then Mul by a scale
_ARITHMETIC = {"Add", "Sub", "Mul", "Div", "QLinearAdd", "QLinearMul"}
_LOOK_THROUGH = {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Cast", "CastLike", "Transpose",
                 "QuantizeLinear", "DequantizeLinear"}
# What may read a class-score output inside the graph: score functions and what picks a class.
_SCORE_READERS = {"Softmax", "LogSoftmax", "Sigmoid", "ArgMax", "TopK", "QLinearSoftmax", "QLinearSigmoid"}
_UNIT_NORM_TOL = 1e-3
_MAX_WALK = 32


def graph_score_outputs(model) -> dict[str, bool]:
    """output name -> whether the graph makes it as class scores (a head nothing in the graph reads on)."""
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output if o}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            if name:
                consumers.setdefault(name, []).append(node)
    constant = _weight_values(graph)
    return {value.name: (_made_by_head(value.name, producer, constant)
                         and not _read_on(value.name, consumers))
            for value in graph.output}


def _weight_values(graph) -> set[str]:
    """Values computed from initializers and constants alone (a bias, ``logit_scale.exp()``)."""
    known = {i.name for i in graph.initializer}
    for node in graph.node:  # ONNX nodes are in topological order
        if node.op_type == "Constant" or (node.input and all(not i or i in known for i in node.input)):
            known.update(o for o in node.output if o)
    return known


def _operands(node) -> list[str]:
    if node.op_type.startswith("QLinear"):  # (A, A_scale, A_zp, B, B_scale, B_zp, ...)
        return [node.input[i] for i in (0, 3) if i < len(node.input)]
    return list(node.input[:2])


def _through(name: str, producer) -> object:
    node, seen = producer.get(name), 0
    while node is not None and node.op_type in _LOOK_THROUGH and node.input and seen < _MAX_WALK:
        node, seen = producer.get(node.input[0]), seen + 1
    return node


def _made_by_head(name: str, producer, constant: set[str]) -> bool:
    for _ in range(_MAX_WALK):
        node = _through(name, producer)
        if node is None:
            return False
        if node.op_type in _HEAD_OPS:
            return True
        if node.op_type not in _ARITHMETIC:
            return False
        live = [i for i in _operands(node) if i and i not in constant]
        if len(live) == 1:  # a bias or a scale on one activation: what is biased or scaled decides
            name = live[0]
            continue
        # two activations: a residual sum, a gate, x / ||x||; or an integer MatMul being dequantized
        return any((op := _through(i, producer)) is not None and op.op_type in _INTEGER_MATMULS for i in live)
    return False


def _read_on(name: str, consumers) -> bool:
    """Whether the graph computes on with this value (beyond reshapes and score functions)."""
    frontier, seen = [name], set()
    while frontier:
        value = frontier.pop()
        if value in seen:
            continue
        seen.add(value)
        for node in consumers.get(value, ()):
            if node.op_type in _LOOK_THROUGH:
                frontier.extend(o for o in node.output if o)
            elif node.op_type not in _SCORE_READERS:
                return True
    return False


def value_kind(array: np.ndarray, made_by_head: bool | None = None) -> str:
    """The kind of one output from a batch of its reference values (and the graph's verdict, if known)."""
    arr = np.asarray(array)
    if arr.dtype.kind != "f" or arr.ndim < 2 or arr.shape[-1] < 2:
        return OTHER
    rows = arr.reshape(-1, arr.shape[-1]).astype(np.float64)
    unit = rows.size and bool(np.all(np.abs(np.linalg.norm(rows, axis=1) - 1.0) < _UNIT_NORM_TOL))
    if unit or made_by_head is False:
        return EMBEDDING
    return SCORES


def output_kinds(reference: Mapping[str, np.ndarray], model=None) -> dict[str, str]:
    """Each output's kind from one batch of reference outputs and, when given, the ONNX model."""
    heads = graph_score_outputs(model) if model is not None else {}
    return {name: value_kind(value, heads.get(name)) for name, value in reference.items()}
