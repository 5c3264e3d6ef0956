"""ONNX Runtime CPU INT8 recipes, and the uniform planner that turns one into a plan.

A recipe is a named set of ``onnxruntime.quantization`` arguments plus guards: which nodes its plan keeps
in FP32 (``--exclude``, projections feeding an output, MatMuls whose input has activation outliers).
``RecipePlanner.plan`` decides that set for a model; ``ort_int8.OrtInt8Quantizer`` builds it. Why these
recipes and guards: see ``cpu_int8``'s module docstring (measurements).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..errors import InputError
from ..onnx_io import cpu_session, remove_model, save_onnx
from .plan import QuantPlan

__all__ = ["Int8Recipe", "ALL_RECIPES", "candidate_recipes", "DEFAULT_CPU_RECIPE", "RecipePlanner",
           "final_projections", "outlier_ratios", "dominated_by", "search_recipe", "NORMALIZATION_OPS",
           "WEIGHTED_OPS"]

# Ops whose output counts as a "weighted" layer when looking for final projections.
WEIGHTED_OPS = {"MatMul", "Gemm", "Conv", "ConvTranspose", "Attention", "MultiHeadAttention", "LSTM",
                 "GRU", "RNN", "MatMulInteger", "ConvInteger", "QLinearMatMul", "QLinearConv",
                 "DynamicQuantizeMatMul", "MatMulIntegerToFloat"}
NORMALIZATION_OPS = {"LayerNormalization", "SkipLayerNormalization", "SimplifiedLayerNormalization",
                      "SkipSimplifiedLayerNormalization", "RMSNormalization", "GroupNormalization",
                      "InstanceNormalization", "BatchNormalization", "EmbedLayerNormalization"}


@dataclass(frozen=True)
class Int8Recipe:
    """A named set of ``onnxruntime.quantization`` arguments; ``params`` is JSON-serialisable.

    params keys: ``method`` ("dynamic" | "static"), ``per_channel``, ``format`` ("qoperator" | "qdq",
    static), ``activation_type``/``weight_type`` ("uint8" | "int8", static), ``conv`` ("static_u8s8" |
    "fp32" for dynamic), ``outlier_ratio`` (MatMuls whose input max|x|/rms exceeds it stay FP32; None =
    off), ``exclude_final`` (projections feeding an output stay FP32), ``fuse`` (onnxscript ORT fusions).
    ``select_recipe`` may add ``ort_disabled_optimizers``: ORT graph optimizers the runtime must disable
    when it opens the quantized model (``InferenceSession(..., disabled_optimizers=...)``).
    """

    name: str
    params: dict

    def to_dict(self) -> dict:
        return {"name": self.name, "params": dict(self.params)}

    @classmethod
    def from_dict(cls, d: dict) -> "Int8Recipe":
        return cls(str(d["name"]), dict(d["params"]))


def _dynamic(name: str, *, per_channel=True, outlier_ratio=None, exclude_final=False, fuse=False,
             conv="static_u8s8") -> Int8Recipe:
    return Int8Recipe(name, {"method": "dynamic", "per_channel": per_channel, "conv": conv,
                             "outlier_ratio": outlier_ratio, "exclude_final": exclude_final, "fuse": fuse})


def _static(name: str, *, fmt="qoperator", activation_type="uint8", per_channel=True, outlier_ratio=None,
            exclude_final=False, fuse=False) -> Int8Recipe:
    return Int8Recipe(name, {"method": "static", "format": fmt, "activation_type": activation_type,
                             "weight_type": "int8", "per_channel": per_channel, "calibrate": "minmax",
                             "outlier_ratio": outlier_ratio, "exclude_final": exclude_final, "fuse": fuse})


ALL_RECIPES: dict[str, Int8Recipe] = {r.name: r for r in (
    _dynamic("dynamic_per_channel"),
    _dynamic("dynamic_per_channel_guarded", outlier_ratio=50.0, exclude_final=True),
    _dynamic("dynamic_per_channel_strict", outlier_ratio=25.0, exclude_final=True),
    _static("static_u8s8_per_channel"),
    _static("static_u8s8_per_channel_guarded", outlier_ratio=50.0, exclude_final=True),
    _static("static_u8s8_per_channel_strict", outlier_ratio=25.0, exclude_final=True),
    # Measured dominated (see the module docstring); available by name, not tried by default.
    _dynamic("dynamic_per_tensor", per_channel=False),
    _dynamic("dynamic_per_channel_fused", fuse=True),
    _static("static_qdq_s8s8_per_channel", fmt="qdq", activation_type="int8"),
)}

_DEFAULT_CANDIDATES = ("dynamic_per_channel", "dynamic_per_channel_guarded", "dynamic_per_channel_strict",
                       "static_u8s8_per_channel", "static_u8s8_per_channel_guarded",
                       "static_u8s8_per_channel_strict")


def candidate_recipes() -> list[Int8Recipe]:
    """The recipes worth trying on ORT CPU, cheapest-guard first within each family."""
    return [ALL_RECIPES[name] for name in _DEFAULT_CANDIDATES]


# The plain CPU recipe the per-branch and accuracy-aware planners start from: it measured the fastest
# (dynamic MatMul, per-channel weights, Conv as static QLinearConv); its guards are replaced there by an
# explicit list of FP32 nodes.
DEFAULT_CPU_RECIPE = "dynamic_per_channel"


def search_recipe(name: str | None) -> tuple[Int8Recipe, list[str]]:
    """The recipe the per-branch and accuracy-aware planners build with (``--int8-recipe`` or the default),
    without its guards and fusions: those planners choose the FP32 nodes themselves. Returns it and a note
    when something of the named recipe is not applied."""
    name = name or DEFAULT_CPU_RECIPE
    if name not in ALL_RECIPES:
        raise InputError(f"unknown INT8 recipe {name!r}", field="--int8-recipe",
                         fix=f"use one of {', '.join(ALL_RECIPES)}")
    params = dict(ALL_RECIPES[name].params)
    notes = []
    if params.get("outlier_ratio") or params.get("exclude_final") or params.get("fuse"):
        notes.append(f"recipe {name}: its outlier/final-layer guards and fusions are not applied here; "
                     "the FP32 nodes are chosen per branch / by measurement instead")
    params.update(outlier_ratio=None, exclude_final=False, fuse=False)
    return Int8Recipe(name, params), notes


class RecipePlanner:
    """The uniform planner on ONNX Runtime CPU: a recipe's plan for the quantizer's model, i.e. every unit
    quantized but the ``--exclude`` nodes and the recipe's guarded ones."""

    def __init__(self, quantizer, exclude: Sequence[str] = ()):
        import onnx

        from .exclusions import resolve_exclude

        self.quantizer = quantizer
        self.exclude = list(exclude)
        source = onnx.load(str(quantizer.source), load_external_data=False)
        self.user_keep = set(resolve_exclude(source, exclude))   # --exclude, on the source graph's names
        self._ratios: dict[Path, dict[str, float]] = {}

    def plan(self, recipe: Int8Recipe, calib_feeds: Sequence[dict]) -> QuantPlan:
        params = recipe.params
        if params.get("method") not in ("dynamic", "static"):
            raise InputError(f"unknown INT8 method {params.get('method')!r}", field=f"recipe '{recipe.name}'.method",
                             fix="use 'dynamic' or 'static'")
        base = self.quantizer.base_model(bool(params.get("fuse")))
        excluded: set[str] = set(self.user_excluded(base))
        if params.get("exclude_final"):
            excluded.update(final_projections(base))
        threshold = params.get("outlier_ratio")
        if threshold:
            if base not in self._ratios:
                self._ratios[base] = outlier_ratios(base, calib_feeds[:4], self.quantizer.workdir)
            excluded.update(name for name, ratio in self._ratios[base].items() if ratio > threshold)
        return QuantPlan("int8", tuple(excluded), params=params)

    def user_excluded(self, model_path: Path) -> list[str]:
        """--exclude's nodes in ``model_path``: what the patterns select there, and the nodes ORT's Gemm
        rewrite made of selected source nodes (``<name>_MatMul`` / ``<name>_Add``, ort_fusions.normalize_gemm)."""
        if not self.user_keep:
            return []
        import onnx

        from .exclusions import resolve_exclude

        model = onnx.load(str(model_path), load_external_data=False)
        renamed = {n.name for n in model.graph.node if n.name.rpartition("_")[0] in self.user_keep}
        return sorted(set(resolve_exclude(model, self.exclude, strict=False)) | renamed
                      | (self.user_keep & {n.name for n in model.graph.node}))


def final_projections(model_path: Path) -> list[str]:
    """The last weighted nodes before each graph output: output heads and embedding projections.

    Walks back from every output through weight-free ops and stops at the first MatMul/Conv (collected),
    and without collecting at normalisations and residual Adds: behind those lies the residual stream,
    whose projections are not "final" although a weight-free path leads from them to the output.
    """
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    producer = {out: node for node in model.graph.node for out in node.output}
    constants = {i.name for i in model.graph.initializer}
    constants.update(out for node in model.graph.node if node.op_type == "Constant" for out in node.output)

    def is_residual_add(node) -> bool:
        return node.op_type in ("Add", "Sum") and sum(1 for i in node.input if i and i not in constants) >= 2

    final, seen = [], set()
    frontier = [o.name for o in model.graph.output]
    while frontier:
        node = producer.get(frontier.pop())
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if node.op_type in ("MatMul", "Conv"):
            if node.name:
                final.append(node.name)
        elif not (node.op_type in WEIGHTED_OPS or node.op_type in NORMALIZATION_OPS or is_residual_add(node)):
            frontier.extend(node.input)
    return sorted(final)


def outlier_ratios(model_path: Path, feeds: Sequence[dict], workdir: Path) -> dict[str, float]:
    """max|x| / rms(x) of the activation input of each constant-weight MatMul, by node name."""
    import onnx

    model = onnx.load(str(model_path))
    inits = {i.name for i in model.graph.initializer}
    targets = {n.name: n.input[0] for n in model.graph.node
               if n.op_type == "MatMul" and n.name and n.input[1] in inits}
    present = {o.name for o in model.graph.output}
    for tensor in sorted(set(targets.values()) - present):
        model.graph.output.append(onnx.helper.make_tensor_value_info(tensor, onnx.TensorProto.FLOAT, None))
    augmented = Path(workdir) / "fp32_activation_probe.onnx"
    save_onnx(model, augmented)
    del model
    try:
        sess = cpu_session(augmented)
        names = [o.name for o in sess.get_outputs()]
        wanted = set(targets.values())
        peak: dict[str, float] = {}
        sq_sum: dict[str, float] = {}
        count: dict[str, int] = {}
        for feed in feeds:
            for name, value in zip(names, sess.run(None, feed)):
                if name not in wanted:
                    continue
                v = np.asarray(value, dtype=np.float64)
                peak[name] = max(peak.get(name, 0.0), float(np.abs(v).max(initial=0.0)))
                sq_sum[name] = sq_sum.get(name, 0.0) + float((v * v).sum())
                count[name] = count.get(name, 0) + v.size
        del sess
    finally:
        remove_model(augmented)
    ratios = {}
    for node, tensor in targets.items():
        rms = np.sqrt(sq_sum.get(tensor, 0.0) / max(count.get(tensor, 0), 1))
        ratios[node] = float(peak.get(tensor, 0.0) / rms) if rms > 0 else 0.0
    return ratios


def dominated_by(recipe: Int8Recipe, passed: Iterable[Int8Recipe]) -> str | None:
    """Name of a passing recipe equal to ``recipe`` but with a subset of its FP32 guards, if any.

    Guards only keep more nodes in FP32, so such a recipe is at least as fast and already accurate enough.
    """
    def rest(p):
        return {k: v for k, v in p.items() if k not in ("outlier_ratio", "exclude_final")}

    def guards_subset(small, big):  # every node ``small`` keeps in FP32, ``big`` keeps too
        ratio_ok = not small.get("outlier_ratio") or (
            bool(big.get("outlier_ratio")) and big["outlier_ratio"] <= small["outlier_ratio"])
        return ratio_ok and (not small.get("exclude_final") or bool(big.get("exclude_final")))

    for other in passed:
        if rest(other.params) == rest(recipe.params) and guards_subset(other.params, recipe.params) \
                and other.params != recipe.params:
            return other.name
    return None
