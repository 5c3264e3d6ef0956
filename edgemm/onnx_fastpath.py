"""ONNX forms of torch's fused transformer fast-path ops, for the TorchScript exporter.

Why: a model traced in eval mode under ``no_grad`` records ``nn.TransformerEncoderLayer`` as one
``aten::_transformer_encoder_layer_fwd`` call and a self-attention ``nn.MultiheadAttention`` as
``aten::_native_multi_head_attention``; a TorchScript archive keeps those calls, and torch's TorchScript
ONNX exporter has no symbolic for them ("Exporting the operator ... is not supported"). The archive
cannot be re-traced through the slow path (its Python code is gone), so the ops are given ONNX forms
here - the same math as torch's slow path, written with standard ONNX ops (opset >= 17 for
LayerNormalization, 20 for Gelu) - and registered only while edgemm's TorchScript export runs.

A *cross*-attention ``nn.MultiheadAttention`` (key != query) is traced on the slow path, whose packed
key/value projection is ``kv.unflatten(-1, (2, E)).unsqueeze(0).transpose(0, -2)``: torch's symbolic for
``aten::unflatten`` builds the new shape at run time, so the exporter loses the tensor's rank and refuses
the ``transpose`` ("transpose for tensor of unknown rank"). ``_unflatten`` below is torch's own symbolic
with the output rank restored (input rank + number of sizes - 1), which the rank-dependent ops after it need.

Not covered (the export still fails with edgemm's one-line error): the padded-batch path with a
``src_key_padding_mask`` (torch turns it into nested tensors, ``aten::_nested_tensor_from_mask``).
"""

from __future__ import annotations

import contextlib
import math

OPSET = 20
_OPS = ("aten::_transformer_encoder_layer_fwd", "aten::_native_multi_head_attention", "aten::unflatten")


@contextlib.contextmanager
def fastpath_symbolics():
    """Register the symbolics for the duration of one TorchScript export."""
    import torch

    registered = []
    try:
        for name, fn in zip(_OPS, (_encoder_layer, _multi_head_attention, _unflatten)):
            torch.onnx.register_custom_op_symbolic(name, fn, OPSET)
            registered.append(name)
        yield
    finally:
        for name in registered:
            torch.onnx.unregister_custom_op_symbolic(name, OPSET)


def _unflatten(g, x, dim, sizes):
    """torch's ``aten::unflatten`` symbolic, with the output's rank set when the sizes are a list."""
    from torch.onnx import symbolic_helper as sym

    try:
        from torch.onnx._internal.torchscript_exporter import symbolic_opset13 as torch_symbolics
    except ImportError:  # torch < 2.9 kept the TorchScript exporter's symbolics at the top level
        from torch.onnx import symbolic_opset13 as torch_symbolics
    out = torch_symbolics.unflatten(g, x, dim, sizes)
    rank = sym._get_tensor_rank(x)
    parts = len(list(sizes.node().inputs())) if sizes.node().kind() == "prim::ListConstruct" else None
    if rank is not None and parts and out.type().kind() == "TensorType":
        out.setType(x.type().with_sizes([None] * (rank + parts - 1)))
    return out


def _const(g, value, dtype=None):
    import torch

    return g.op("Constant", value_t=torch.tensor(value, dtype=dtype or torch.int64))


def _arg(node_value, kind: str):
    """A constant argument of the traced call (ints, floats, bools arrive as graph constants)."""
    from torch.onnx import symbolic_helper as sym

    return sym._maybe_get_const(node_value, kind)


def _is_none(value) -> bool:
    from torch.onnx import symbolic_helper as sym

    return sym._is_none(value)


def _linear(g, x, weight, bias):
    y = g.op("MatMul", x, g.op("Transpose", weight, perm_i=[1, 0]))
    return y if bias is None or _is_none(bias) else g.op("Add", y, bias)


def _attention(g, query, key, value, embed_dim: int, heads: int, qkv_weight, qkv_bias, proj_weight, proj_bias,
               mask, mask_type):
    """torch's slow-path multi-head attention, batch-first [B, T, E]: packed q/k/v weights split in three."""
    head_dim = embed_dim // heads
    w_q, w_k, w_v = g.op("Split", qkv_weight, _const(g, [embed_dim] * 3), axis_i=0, outputs=3)
    b_q, b_k, b_v = g.op("Split", qkv_bias, _const(g, [embed_dim] * 3), axis_i=0, outputs=3)
    split_heads = _const(g, [0, -1, heads, head_dim])
    q = g.op("Transpose", g.op("Reshape", _linear(g, query, w_q, b_q), split_heads), perm_i=[0, 2, 1, 3])
    k = g.op("Transpose", g.op("Reshape", _linear(g, key, w_k, b_k), split_heads), perm_i=[0, 2, 3, 1])
    v = g.op("Transpose", g.op("Reshape", _linear(g, value, w_v, b_v), split_heads), perm_i=[0, 2, 1, 3])
    import torch

    scale = g.op("Constant", value_t=torch.tensor(1.0 / math.sqrt(head_dim), dtype=torch.float32))
    scores = g.op("Mul", g.op("MatMul", q, k), scale)                     # [B, H, T, S]
    if mask is not None and not _is_none(mask):
        kind = _arg(mask_type, "i") if mask_type is not None and not _is_none(mask_type) else None
        if kind == 1:  # key padding [B, S] -> [B, 1, 1, S]
            mask = g.op("Unsqueeze", mask, _const(g, [1, 2]))
        elif kind is None or kind not in (0, 2):
            raise RuntimeError(f"fast-path attention mask type {kind!r} has no ONNX form here")
        scores = _masked(g, scores, mask)
    probs = g.op("Softmax", scores, axis_i=-1)
    context = g.op("Transpose", g.op("MatMul", probs, v), perm_i=[0, 2, 1, 3])  # [B, T, H, D]
    context = g.op("Reshape", context, _const(g, [0, -1, embed_dim]))
    return _linear(g, context, proj_weight, proj_bias)


def _masked(g, scores, mask):
    """A bool mask is True where attention is *not* allowed (torch's convention); a float mask is added."""
    import torch

    kind = getattr(mask.type(), "scalarType", lambda: None)()
    if kind == "Bool":
        neg = g.op("Constant", value_t=torch.tensor(float("-inf"), dtype=torch.float32))
        return g.op("Where", mask, neg, scores)
    if kind in ("Float", "Half", "BFloat16", "Double"):
        return g.op("Add", scores, mask)
    raise RuntimeError(f"fast-path attention mask of type {kind} has no ONNX form here")


def _layer_norm(g, x, weight, bias, eps: float):
    return g.op("LayerNormalization", x, weight, bias, axis_i=-1, epsilon_f=eps)


def _encoder_layer(g, src, embed_dim, num_heads, qkv_weight, qkv_bias, proj_weight, proj_bias, use_gelu,
                   norm_first, eps, norm_weight_1, norm_bias_1, norm_weight_2, norm_bias_2, ffn_weight_1,
                   ffn_bias_1, ffn_weight_2, ffn_bias_2, mask=None, mask_type=None):
    """nn.TransformerEncoderLayer (batch_first, eval): its fast path's arguments, its slow path's math."""
    e, h = _arg(embed_dim, "i"), _arg(num_heads, "i")
    gelu, first, eps_f = bool(_arg(use_gelu, "b")), bool(_arg(norm_first, "b")), float(_arg(eps, "f"))

    def attend(x):
        return _attention(g, x, x, x, e, h, qkv_weight, qkv_bias, proj_weight, proj_bias, mask, mask_type)

    def feed_forward(x):
        hidden = _linear(g, x, ffn_weight_1, ffn_bias_1)
        hidden = g.op("Gelu", hidden) if gelu else g.op("Relu", hidden)
        return _linear(g, hidden, ffn_weight_2, ffn_bias_2)

    x = src
    if first:
        x = g.op("Add", x, attend(_layer_norm(g, x, norm_weight_1, norm_bias_1, eps_f)))
        return g.op("Add", x, feed_forward(_layer_norm(g, x, norm_weight_2, norm_bias_2, eps_f)))
    x = _layer_norm(g, g.op("Add", x, attend(x)), norm_weight_1, norm_bias_1, eps_f)
    return _layer_norm(g, g.op("Add", x, feed_forward(x)), norm_weight_2, norm_bias_2, eps_f)


def _multi_head_attention(g, query, key, value, embed_dim, num_head, qkv_weight, qkv_bias, proj_weight, proj_bias,
                          mask=None, need_weights=None, average_attn_weights=None, mask_type=None):
    """nn.MultiheadAttention's fast path (need_weights=False: the weights output is not computed)."""
    if need_weights is not None and not _is_none(need_weights) and bool(_arg(need_weights, "b")):
        raise RuntimeError("fast-path attention with need_weights=True has no ONNX form here")
    out = _attention(g, query, key, value, _arg(embed_dim, "i"), _arg(num_head, "i"), qkv_weight, qkv_bias,
                     proj_weight, proj_bias, mask, mask_type)
    import torch

    return out, g.op("Constant", value_t=torch.zeros(0, dtype=torch.float32))
