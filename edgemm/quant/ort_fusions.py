"""Graph preparation before ONNX Runtime INT8 quantization.

Measured on the MiniLM fused model exported with ``torch.onnx.export(dynamo=True)`` + onnxslim
(onnxruntime 1.32, onnxscript 0.7, 2-core AVX-512 VNNI CPU):

* ``onnxruntime.transformers.optimizer.optimize_model(model_type="bert")`` fuses **no** Attention and no
  SkipLayerNormalization on such graphs (its patterns follow the TorchScript exporter); only Gelu.
* onnxscript's ``optimize_for_ort`` (written for dynamo exports) fuses 6 MultiHeadAttention and 12
  SkipLayerNormalization, but ORT's own ORT_ENABLE_ALL session fusions already cover most of it:
  FP32 p50 ratio 0.96-1.00 and INT8 within noise of unfused INT8 with default sessions. Worse, its
  SkipLayerNormalization nodes are baked into the file, and that ORT CPU kernel is slow (see cpu_int8):
  once the unfused model runs with SkipLayerNormFusion disabled, the fused INT8 model is slower
  (0.58 vs 0.47 of FP32). Hence fusion is an opt-in recipe parameter (``fuse=True``), not a default.
* ``onnxruntime.quantization.quant_pre_process`` crashes in symbolic shape inference on these exports
  (``Expand``), and with ``skip_symbolic_shape=True`` its optimisation step fuses MatMul+Add back into
  Gemm, which then escapes ``op_types_to_quantize=["MatMul"]``: it is not used.
* onnxslim rewrites 3-D ``MatMul + Add`` into ``Reshape + Gemm(transB=1) + Reshape``. ORT's dynamic
  quantizer converts Gemm to MatMul internally and renames the node ``<name>_MatMul``, so node
  exclusion lists computed on the input graph would silently miss. ``normalize_gemm`` applies ORT's own
  conversion up front so that names are stable for every recipe.
"""

from __future__ import annotations

from pathlib import Path

import onnx


def normalize_gemm(model: onnx.ModelProto) -> onnx.ModelProto:
    """Gemm with a constant B (alpha=beta=1, no transA) -> MatMul + Add, in place, using ORT's pass."""
    from onnxruntime.quantization.onnx_model import ONNXModel

    transposed_sources = ONNXModel(model).replace_gemm_with_matmul()
    # The pass keeps the untransposed originals "for other consumers"; drop those nobody reads (subgraphs
    # included: ORT's own remove_unused_constant only looks at the main graph).
    originals = set(transposed_sources.values()) - _referenced_names(model.graph)
    kept = [init for init in model.graph.initializer if init.name not in originals]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    return model


def _referenced_names(graph) -> set[str]:
    names = {o.name for o in graph.output}
    for node in graph.node:
        names.update(node.input)
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                names |= _referenced_names(sub)
    return names


def fuse_for_ort(src: Path, dst: Path) -> dict[str, int]:
    """Apply onnxscript's ORT transformer fusions (MHA, SkipLayerNorm, BiasGelu...). Returns fusion counts."""
    import onnx_ir as ir
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    model = ir.load(str(src))
    model, counts = optimize_for_ort(model)
    ir.save(model, str(dst))
    return {name: int(n) for name, n in counts.items() if n}
