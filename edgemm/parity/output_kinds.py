"""What each model output is, decided from the graph and the values, never from its name: class scores
(top-1 agreement is checked), embeddings (cosine), or other. Compile records the decision in the manifest
(``output_kinds``) and verify reads it back, so both judge a bundle by the same checks.

Rule: a float output of rank >= 2 whose last axis holds >= 2 values is *scores* when the op that makes
it (looking through reshapes, casts and Q/DQ) is a linear head or a score function (MatMul, Gemm, a bias
Add, a scale Mul/Div, Softmax, LogSoftmax, Sigmoid and their quantized forms) and its rows are not unit
length; otherwise it is an *embedding* (pooled, normalised or sliced features: LayerNorm, ReduceMean,
Gather, L2-normalised rows...). Without a graph, the values alone decide (rows not unit length)."""

from __future__ import annotations

from typing import Mapping

import numpy as np

SCORES, EMBEDDING, OTHER = "scores", "embedding", "other"

_SCORE_OPS = {"MatMul", "Gemm", "Add", "Sub", "Mul", "Div", "Softmax", "LogSoftmax", "Sigmoid", "Einsum",
              # quantized and fused forms of the same heads (ORT INT8 bundles)
              "MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QLinearMatMul", "QGemm",
              "FusedMatMul", "QLinearAdd", "QLinearMul", "QLinearSoftmax", "QLinearSigmoid"}
_LOOK_THROUGH = {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Cast", "CastLike", "Transpose",
                 "QuantizeLinear", "DequantizeLinear"}
_UNIT_NORM_TOL = 1e-3


def graph_score_outputs(model) -> dict[str, bool]:
    """output name -> whether the graph makes it with a linear head or a score function."""
    producer = {o: n for n in model.graph.node for o in n.output}
    out = {}
    for value in model.graph.output:
        node, seen = producer.get(value.name), 0
        while node is not None and node.op_type in _LOOK_THROUGH and node.input and seen < 16:
            node, seen = producer.get(node.input[0]), seen + 1
        out[value.name] = node is not None and node.op_type in _SCORE_OPS
    return out


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
