"""The TensorRT quantizer: modelopt's explicit Q/DQ placement, executing the planners' plans (quant/plan.py).

``QdqQuantizer.build(out, plan)``: one modelopt pass quantizes to ``plan.precision`` (int8 | fp8) with
``plan.exclude`` as modelopt's ``nodes_to_exclude``; the unquantized layers are ``plan.float_precision``
(modelopt's high-precision type), and when some of them must stay FP32 (``plan.keep_fp32``), the Q/DQ
model is quantized with FP32 elsewhere and then AutoCast to the low type with those nodes excluded
(AutoCast keeps Q/DQ nodes as they are). A plan that quantizes nothing is an AutoCast (or a copy).

``variant(out, exclude)``: a cheap candidate for a search: calibrated once, then the Q/DQ pairs feeding
the ``exclude`` nodes are bypassed (no re-calibration). Runs on ONNX Runtime CPU here (INT8 Q/DQ runs
there; FP8 through ``fp8_sim``); the device build uses ``build``'s own modelopt output.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ..onnx_io import cpu_session, save_onnx
from .exclusions import anchored
from .ort_int8 import runner_of
from .plan import QuantPlan, Runner

__all__ = ["QdqQuantizer", "bypass_qdq", "autocast"]


class QdqQuantizer:
    """modelopt Q/DQ for TensorRT of one FP32 model, calibrated on ``calib``.

    ``mode`` / ``high_precision``: what ``variant`` candidates are quantized to and run elsewhere in;
    ``fixed_exclude``: nodes every variant keeps out of quantization (branches a policy leaves unquantized)."""

    backend = "tensorrt"
    label = "TensorRT (modelopt Q/DQ)"
    modes = ("int8", "fp8")
    exact_variants = False  # variants bypass Q/DQ pairs of one calibration; the build re-places them
    runs_here = False       # the engine's latency is the device's to measure

    @classmethod
    def for_search(cls, fp32_onnx: Path, calib, workdir: Path, *, mode: str = "int8", high_precision: str = "fp16",
                   **_unused):
        return cls(fp32_onnx, calib, workdir, mode=mode, high_precision=high_precision)

    @staticmethod
    def plan_graph(fp32_onnx: Path, workdir: Path) -> Path:
        """The graph a planner reads node names from before building: the FP32 model itself."""
        return Path(fp32_onnx)

    @classmethod
    def build_per_branch(cls, source: Path, out: Path, table: dict, branches, calib, workdir: Path,
                         notes: list[str], *, high_precision: str | None = None, **_unused) -> dict:
        """The per-branch plan (quant/mixed.py) for TensorRT: the quantized branches' precision, every node of
        the other branches excluded; those run in their low float type, FP32 branches held in FP32 when both
        kinds are asked for."""
        from ..precision import LOW_FLOATS, QUANTIZED
        from .branches import COMPUTE_OPS, FUSION
        from .modelopt_qdq import inspect_qdq

        quant = next((v["precision"] for v in table.values() if v["precision"] in QUANTIZED), None)
        rest = {b: v["precision"] for b, v in table.items() if v["precision"] not in QUANTIZED}
        low = sorted({p for p in rest.values() if p in LOW_FLOATS})
        fp32_branches = [b for b, p in rest.items() if p == "fp32"]
        fp32_nodes = [n for b in fp32_branches for n in branches.nodes(b)] if low else []
        excluded = [n for b in rest for n in branches.nodes(b)] if quant else []
        plan = QuantPlan(quant, tuple(excluded), float_precision=low[0] if low else "fp32",
                         keep_fp32=tuple(fp32_nodes), params={"high_precision": high_precision} if high_precision else {})
        recipe = cls(source, calib).build(out, plan)
        if quant is None:
            return {"recipe": recipe}
        recipe.pop("excluded_nodes")   # the branch table lists them; nodes_to_exclude below says how many
        if recipe.get("autocast"):
            notes.append(f"unquantized branches: {', '.join(b for b, p in rest.items() if p != 'fp32')} in "
                         f"{low[0]} (AutoCast), {', '.join(fp32_branches)} in fp32")
        import onnx

        quantized_model = onnx.load(str(out), load_external_data=False)
        dq_out = {o for n in quantized_model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
        counts = {b: 0 for b in table}
        for node in quantized_model.graph.node:
            if node.op_type in COMPUTE_OPS and dq_out & set(node.input):
                branch = branches.branch_of.get(node.name, FUSION)
                counts[branch] = counts.get(branch, 0) + 1
        recipe["qdq"] = inspect_qdq(quantized_model)
        recipe["nodes_to_exclude"] = f"{len(excluded)} nodes of the {', '.join(rest) or 'no'} branches"
        return {"quantized_nodes": counts, "recipe": recipe}

    def __init__(self, fp32_onnx: Path, calib: Mapping[str, np.ndarray] | None, workdir: Path | None = None, *,
                 mode: str = "int8", high_precision: str = "fp16", fixed_exclude: Sequence[str] = ()):
        self.reference_path = Path(fp32_onnx)
        self.calib = calib
        self.workdir = Path(workdir) if workdir is not None else None
        self.mode = mode
        self.high_precision = high_precision
        self.simulated = mode == "fp8"
        self.fixed_exclude = list(fixed_exclude)   # read when first calibrated (units, variant)
        self.notes: list[str] = []
        self._full = None
        self._n = 0

    # -- building ----------------------------------------------------------------------------------
    def build(self, out: Path, plan: QuantPlan) -> dict:
        """Write ``out`` as ``plan`` says; returns the manifest recipe (modelopt's, plus what was excluded)."""
        from .modelopt_qdq import quantize_qdq

        out = Path(out)
        low = plan.float_precision
        if plan.precision is None:
            if low == "fp32":
                shutil.copyfile(self.reference_path, out)
                return {"tool": "none"}
            save_onnx(autocast(self.reference_path, low, plan.keep_fp32, self.calib), out)
            return {"tool": "modelopt.onnx.autocast.convert_to_mixed_precision", "low_precision": low,
                    "fp32_nodes": len(plan.keep_fp32)}
        high = plan.params.get("high_precision") or ("fp32" if plan.keep_fp32 else low)
        recipe = quantize_qdq(self.reference_path, out, self.calib, plan.precision,
                              exclude_nodes=anchored(plan.exclude), high_precision=high,
                              target_dla=bool(plan.params.get("target_dla")))
        if plan.keep_fp32:
            # Quantized + low-float + FP32 nodes: Q/DQ with FP32 elsewhere, then AutoCast all but keep_fp32.
            save_onnx(autocast(out, low, plan.keep_fp32, self.calib), out)
            recipe["autocast"] = {"low_precision": low, "fp32_nodes": len(plan.keep_fp32)}
        recipe["excluded_nodes"] = list(plan.exclude)
        return recipe

    @property
    def units(self) -> list[str]:
        """The nodes a Q/DQ pair feeds in the model calibrated once (``fixed_exclude`` left out)."""
        self._calibrate_once()
        dq_out = {o for n in self._full.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
        return [n.name for n in self._full.graph.node
                if n.op_type not in ("QuantizeLinear", "DequantizeLinear") and dq_out & set(n.input)]

    def _calibrate_once(self) -> None:
        if self._full is None:
            import onnx

            full = self.workdir / f"all_{self.mode}.onnx"
            self.build(full, QuantPlan(self.mode, tuple(self.fixed_exclude), float_precision=self.high_precision))
            self._full = onnx.load(str(full))

    def variant(self, out: Path, exclude: Sequence[str]) -> Path:
        """The calibrated-once model with the Q/DQ pairs feeding ``exclude`` bypassed."""
        import onnx

        self._calibrate_once()
        onnx.save(bypass_qdq(self._full, exclude), str(out))
        return Path(out)

    def plan(self, exclude: Sequence[str]) -> QuantPlan:
        """The plan of a search result: ``mode`` everywhere but ``exclude`` and ``fixed_exclude``."""
        return QuantPlan(self.mode, tuple(exclude) + tuple(self.fixed_exclude), float_precision=self.high_precision)

    def runner(self, path: Path) -> Runner:
        if self.mode == "fp8":
            from .fp8_sim import Fp8Simulator

            return Fp8Simulator(path).run
        return runner_of(cpu_session(path, spinning=False))

    def describe(self) -> dict:
        return {"tool": "modelopt.onnx.quantization.quantize", "mode": self.mode,
                "high_precision_dtype": self.high_precision}


def autocast(onnx_path: Path, low: str, fp32_nodes: Sequence[str], calib):
    """AutoCast to ``low`` with ``fp32_nodes`` kept FP32 (fp16.autocast; 8 real samples for the range check)."""
    from .fp16 import autocast as modelopt_autocast

    return modelopt_autocast(onnx_path, low, keep_io_types=True, calib=calib, max_samples=8,
                             exclude_patterns=anchored(fp32_nodes))


# ------------------------------------------------------------------------------------------------
# Bypassing Q/DQ pairs (search variants without re-calibration)

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
