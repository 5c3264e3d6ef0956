"""The ONNX Runtime CPU quantizer: the one INT8 build every planner drives (quant/plan.py).

``OrtInt8Quantizer.build(out, plan)`` quantizes every MatMul (constant weights) and Conv of the graph
but the plan's ``exclude`` nodes, with a ``cpu_int8`` recipe's arguments (``plan.params``: method,
per-channel, Conv handling, format, types, ``fuse``). Which nodes stay FP32 (``--exclude``, a recipe's
outlier/final-layer guards, other branches, the layers an accuracy search found sensitive) is the
planners' decision, never made here.

Why calibration is cached: ORT calibrates on the FP32 graph's tensors for the op types it quantizes,
whatever ``nodes_to_exclude`` holds, so the ranges of one (graph, op set, feeds) serve every plan; the
per-branch and accuracy searches rebuild the same graph dozens of times (ORT's
``calibration_cache_path``).

Everything quantization-related is done by ``onnxruntime.quantization``; this module chooses its
arguments and feeds calibration data.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ..errors import InputError
from ..onnx_io import cpu_session, is_large, remove_model, save_onnx
from .ort_calib import FeedReader, check_calib, input_specs, split_feeds
from .plan import QuantPlan, Runner

__all__ = ["OrtInt8Quantizer", "normalize_for_ort", "quiet_ort_quantizer_logs", "runner_of"]


@contextlib.contextmanager
def quiet_ort_quantizer_logs():
    """ORT's quantizer logs "Please consider to run pre-processing..." through the root logger at WARNING
    on every call; a library user with no logging set up would see each on stderr."""
    import logging

    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def normalize_for_ort(model, out: Path) -> None:
    """ORT's Gemm -> MatMul + Add rewrite (its quantizers apply it anyway and rename the node), done up
    front so node names are stable for every plan; the new nodes keep the Gemm's module path.
    ``model``: a ModelProto (changed in place) or a path."""
    import onnx

    from .ort_fusions import normalize_gemm

    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model))
    meta = {n.name: list(n.metadata_props) for n in model.graph.node if n.op_type == "Gemm"}
    normalize_gemm(model)
    for node in model.graph.node:
        for suffix in ("_MatMul", "_Add"):
            base = node.name[: -len(suffix)] if node.name.endswith(suffix) else None
            if base in meta and not len(node.metadata_props):
                for p in meta[base]:
                    node.metadata_props.add(key=p.key, value=p.value)
    save_onnx(model, out)


def runner_of(session) -> Runner:
    names = [o.name for o in session.get_outputs()]
    inputs = [i.name for i in session.get_inputs()]
    return lambda feeds: dict(zip(names, session.run(names, {n: feeds[n] for n in inputs})))


def _qtype(name: str):
    from onnxruntime.quantization import QuantType

    return {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}[name]


class _StagedOutput:
    """A private folder next to ``dst`` to write into; ``commit`` moves the model (and data file) in place.

    The quantizers write ``<name>.onnx`` (+ ``<name>.onnx.data`` for large models, referenced by file name),
    so staging under the final name keeps that reference valid after the move.
    """

    def __init__(self, dst: Path):
        self.dst = Path(dst)
        self.dir = Path(tempfile.mkdtemp(prefix=f".{self.dst.name}.", dir=self.dst.parent))
        self.path = self.dir / self.dst.name

    def commit(self) -> None:
        data = self.path.with_name(self.path.name + ".data")
        if data.exists():
            os.replace(data, self.dst.with_name(self.dst.name + ".data"))
        os.replace(self.path, self.dst)

    def cleanup(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


class OrtInt8Quantizer:
    """ONNX Runtime CPU INT8 of one FP32 model, calibrated on ``calib``; ``build`` executes plans.

    ``recipe``: the ``cpu_int8`` recipe whose arguments ``variant`` builds with and ``describe`` reports
    (planners that pass their own ``plan.params`` to ``build`` may leave it out)."""

    backend = "onnxruntime"
    label = "ONNX Runtime CPU"
    modes = ("int8",)
    high_precision = "fp32"
    simulated = False
    exact_variants = True   # a variant is a full build: what the search measures is what ships
    runs_here = True        # built files run here at deployment speed: latency is measured here

    @classmethod
    def for_search(cls, fp32_onnx: Path, calib, workdir: Path, *, int8_recipe: str | None = None, **_unused):
        """The quantizer a search (accuracy-aware) drives: ``--int8-recipe``'s arguments (or the default
        recipe's) without its guards, which the search replaces by measurement."""
        from .ort_recipes import search_recipe

        recipe, notes = search_recipe(int8_recipe)
        quantizer = cls(fp32_onnx, calib, Path(workdir) / "int8", recipe=recipe)
        quantizer.notes = notes
        return quantizer

    @staticmethod
    def plan_graph(fp32_onnx: Path, workdir: Path) -> Path:
        """The graph a planner reads node names from before building: Gemm-normalized (as ``reference_path``)."""
        source = Path(workdir) / "fp32_ort.onnx"
        normalize_for_ort(fp32_onnx, source)
        return source

    @classmethod
    def build_per_branch(cls, source: Path, out: Path, table: dict, branches, calib, workdir: Path,
                         notes: list[str], *, int8_recipe: str | None = None, **_unused) -> dict:
        """The per-branch plan (quant/mixed.py) on ONNX Runtime CPU: every unit outside the int8 branches kept
        FP32, with ``--int8-recipe``'s arguments (or the default recipe's). ``source``: ``plan_graph``'s."""
        int8 = [b for b, v in table.items() if v["precision"] == "int8"]
        if not int8:
            shutil.copyfile(source, out)
            notes.append("no branch is int8 on this target: the bundle is FP32")
            return {"recipe": {"tool": "none"}}
        from .ort_recipes import search_recipe

        recipe, recipe_notes = search_recipe(int8_recipe)
        quantizer = cls(source, calib, Path(workdir) / "int8", recipe=recipe)
        keep = [u for u in quantizer.units if branches.branch_of.get(u) not in int8]
        quantizer.build(out, QuantPlan("int8", tuple(keep), params=recipe.params))
        notes.extend(recipe_notes)
        counts = {b: sum(1 for u in quantizer.units if branches.branch_of.get(u) == b and u not in keep)
                  for b in table}
        return {"quantized_nodes": counts, "recipe": {**quantizer.describe(), "kept_fp32_nodes": len(keep)}}

    def __init__(self, fp32_onnx: Path, calib: Mapping[str, np.ndarray], workdir: Path, *, recipe=None):
        import onnx

        self.source = Path(fp32_onnx)
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            model = onnx.load(str(self.source))
        except Exception as exc:  # onnx raises several types for unreadable files
            raise InputError(f"cannot read ONNX model: {exc}", file=self.source,
                             fix="pass an ONNX file written by `edgemm compile` or torch.onnx.export") from exc
        self.specs = input_specs(model)
        self.feeds = split_feeds(check_calib(calib, self.specs, self.source), self.specs)
        self._calib_feeds = self.feeds
        self.large = is_large(model)
        self.reference_path = self.workdir / "fp32_ort.onnx"
        normalize_for_ort(model, self.reference_path)
        del model
        self.recipe = recipe
        self.notes: list[str] = []
        self.fixed_exclude: list[str] = []   # nodes every variant keeps FP32 (set by a planner)
        self._fused: Path | None = None
        self._graphs: dict[Path, tuple[list[str], dict[str, str]]] = {}
        self.units, self.op_types = self._graph(self.reference_path)

    # -- what plans refer to ---------------------------------------------------------------------
    @property
    def calib_feeds(self) -> list[dict]:
        """The feeds calibration runs on (all of ``calib`` unless a planner holds some out)."""
        return self._calib_feeds

    @calib_feeds.setter
    def calib_feeds(self, feeds: Sequence[dict]) -> None:
        self._calib_feeds = list(feeds)
        for cache in self.workdir.glob("ranges_*.json"):   # ranges of other feeds
            cache.unlink()

    def base_model(self, fuse: bool = False) -> Path:
        """The graph a build starts from: the normalized FP32 model, or its ORT-fused form (``fuse``)."""
        if not fuse:
            return self.reference_path
        if self._fused is None:
            from .ort_fusions import fuse_for_ort

            fused = self.workdir / "fp32_fused.onnx"
            fuse_for_ort(self.reference_path, fused)
            self._fused = fused
        return self._fused

    def _graph(self, path: Path) -> tuple[list[str], dict[str, str]]:
        """(quantizable units, op type by node name) of a base graph."""
        if path not in self._graphs:
            import onnx

            model = onnx.load(str(path), load_external_data=False)
            inits = {i.name for i in model.graph.initializer}
            units = [n.name for n in model.graph.node
                     if (n.op_type == "MatMul" and n.input[1] in inits) or n.op_type == "Conv"]
            self._graphs[path] = (units, {n.name: n.op_type for n in model.graph.node})
        return self._graphs[path]

    # -- building ----------------------------------------------------------------------------------
    def build(self, out_onnx: Path, plan: QuantPlan) -> dict:
        """Write ``out_onnx``: the base graph quantized as ``plan`` says; returns {"excluded_nodes": [...]}."""
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_dynamic, quantize_static

        params = dict(plan.params or (self.recipe.params if self.recipe else {}))
        method = params.get("method")
        if method not in ("dynamic", "static"):
            raise InputError(f"unknown INT8 method {method!r}", field="recipe.method", fix="use 'dynamic' or 'static'")
        if plan.precision not in (None, "int8"):
            raise InputError(f"ONNX Runtime CPU quantizes to int8, not {plan.precision}", field="precision",
                             fix="use int8 for CPU targets")
        fuse = bool(params.get("fuse"))
        base = self.base_model(fuse)
        units, op_types = self._graph(base)
        keep = list(plan.exclude)
        kept = set(keep) | ({*units} if plan.precision is None else set())
        quantized = {op_types[u] for u in units if u not in kept}
        stage = _StagedOutput(Path(out_onnx))
        tmp = stage.path
        common = {"per_channel": bool(params.get("per_channel", True)), "nodes_to_exclude": keep,
                  "use_external_data_format": self.large}
        tag = "fused" if fuse else "plain"
        try:
            with contextlib.redirect_stdout(sys.stderr), quiet_ort_quantizer_logs():
                if method == "dynamic":
                    src = base
                    if "Conv" in quantized and params.get("conv", "static_u8s8") == "static_u8s8":
                        # ConvInteger (dynamic) ran ~4x slower than FP32 Conv here; QLinearConv is fast.
                        src = stage.dir / "conv_quantized.onnx"
                        quantize_static(base, src, FeedReader(self._calib_feeds), quant_format=QuantFormat.QOperator,
                                        op_types_to_quantize=["Conv"], activation_type=_qtype("uint8"),
                                        weight_type=_qtype("int8"),
                                        calibration_cache_path=self.workdir / f"ranges_{tag}_conv.json", **common)
                    if "MatMul" in quantized:
                        # MatMul only: Gather (embeddings) and Conv are left to the lines above on purpose.
                        quantize_dynamic(src, tmp, op_types_to_quantize=["MatMul"], weight_type=_qtype("int8"),
                                         extra_options={"MatMulConstBOnly": True}, **common)
                    else:  # nothing left for the dynamic pass (e.g. one Conv quantized alone)
                        shutil.copyfile(src, tmp)
                elif quantized:
                    fmt = {"qoperator": QuantFormat.QOperator, "qdq": QuantFormat.QDQ}[params.get("format", "qoperator")]
                    quantize_static(base, tmp, FeedReader(self._calib_feeds), quant_format=fmt,
                                    op_types_to_quantize=["MatMul", "Conv"],
                                    activation_type=_qtype(params.get("activation_type", "uint8")),
                                    weight_type=_qtype(params.get("weight_type", "int8")),
                                    calibrate_method=CalibrationMethod.MinMax,
                                    calibration_cache_path=self.workdir / f"ranges_{tag}_all.json",
                                    # Activation x activation MatMuls (attention) stay FP32: ranges too wide.
                                    extra_options={"MatMulConstBOnly": True}, **common)
                else:
                    shutil.copyfile(base, tmp)
            stage.commit()
        finally:
            stage.cleanup()
        return {"excluded_nodes": sorted(keep)}

    def variant(self, out: Path, exclude: Sequence[str]) -> Path:
        """A candidate for a search: the quantizer's recipe with ``exclude`` kept FP32 (a full build:
        ORT's INT8 has no cheaper way to leave a node out)."""
        self.build(out, self.plan(exclude))
        return Path(out)

    def plan(self, exclude: Sequence[str]) -> QuantPlan:
        """The plan of a search result: the quantizer's recipe with ``exclude`` (and ``fixed_exclude``) FP32."""
        units = set(self.units)   # only nodes ORT would quantize are worth listing
        return QuantPlan("int8", tuple(exclude) + tuple(u for u in self.fixed_exclude if u in units),
                         params=self.recipe.params)

    def runner(self, path: Path) -> Runner:
        return runner_of(cpu_session(path, spinning=False))

    def describe(self) -> dict:
        return {"tool": "onnxruntime.quantization", "base_recipe": self.recipe.name,
                "params": dict(self.recipe.params), "calibration_feeds": len(self._calib_feeds)}

    def cleanup(self) -> None:
        """Remove the FP32 working copies and cached ranges (the source model is never touched)."""
        for path in (self.reference_path, self._fused):
            if path is not None:
                remove_model(path)
        for cache in self.workdir.glob("ranges_*.json"):
            cache.unlink()
