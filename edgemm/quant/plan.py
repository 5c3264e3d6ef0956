"""One precision pipeline: planners decide, quantizers build.

A **planner** decides, per node, what precision the model is built in, and says so in a ``QuantPlan``:
which precision the quantized nodes take, which nodes stay out of quantization (``exclude``, as
modelopt's ONNX ``quantize(..., nodes_to_exclude=...)`` and ORT's ``nodes_to_exclude``) and what the
unquantized nodes run in. The planners are:

- uniform (``quant.RECIPES``; on CPU ``cpu_int8.select_recipe``): the whole model, less ``--exclude``
  and a recipe's outlier/final-layer guards;
- per branch (``mixed.apply_mixed``, ``--precision vision=int8,...``): the nodes of the branches not
  quantized are excluded;
- accuracy search (``accuracy_search.accuracy_aware``, ``--accuracy-target``): the fewest sensitive
  nodes excluded that meet the target, found by building and measuring plans.

A **quantizer** executes plans for one backend, and nothing else decides: ``build(out, plan)``. Each
backend has one (``quantizer_for``): ONNX Runtime CPU INT8 (``ort_int8.OrtInt8Quantizer``) and
TensorRT's modelopt Q/DQ (``qdq.QdqQuantizer``). Adding a backend's quantizer (e.g. OpenVINO/NNCF for
CPU): a class with the ``Quantizer`` members below, registered in ``QUANTIZERS``; every planner can then
drive it. (``cpu_engines``' NNCF INT8 build, ``nncf.quantize(..., ignored_scope=...)`` with the guarded
rung's nodes, is such a build today, called by the engine search itself: moved behind an "openvino"
quantizer, ``--precision`` per branch and ``--accuracy-target`` could drive it too.)
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Protocol, Sequence

import numpy as np

from ..errors import InputError

__all__ = ["QuantPlan", "Quantizer", "QUANTIZERS", "quantizer_for", "Runner"]

Runner = Callable[[Mapping[str, np.ndarray]], Mapping[str, np.ndarray]]


@dataclass(frozen=True)
class QuantPlan:
    """A planner's decision, per node: quantized to ``precision`` unless in ``exclude``; the unquantized
    nodes run in ``float_precision``, less ``keep_fp32`` (held in FP32 when ``float_precision`` is lower).

    ``params``: the backend's own arguments for the build (an ORT INT8 recipe's ``params``; modelopt's
    ``target_dla``...), chosen by the planner, read only by that backend's quantizer."""

    precision: str | None                    # "int8" | "fp8"; None: nothing quantized
    exclude: tuple[str, ...] = ()            # node names kept out of quantization
    float_precision: str = "fp32"            # what unquantized nodes run in: "fp32" | "fp16" | "bf16"
    keep_fp32: tuple[str, ...] = ()          # unquantized nodes held in FP32 when float_precision is lower
    params: Mapping = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "exclude", tuple(sorted(set(self.exclude))))
        object.__setattr__(self, "keep_fp32", tuple(sorted(set(self.keep_fp32))))

    def excluding(self, nodes: Sequence[str]) -> "QuantPlan":
        """The same plan with ``nodes`` also kept out of quantization."""
        return QuantPlan(self.precision, tuple(self.exclude) + tuple(nodes), self.float_precision,
                         self.keep_fp32, self.params)


class Quantizer(Protocol):
    """What a backend's quantizer offers the planners."""

    backend: str
    label: str                  # for messages: "ONNX Runtime CPU"
    modes: tuple[str, ...]      # quantized precisions it builds
    reference_path: Path        # the FP32 graph whose node names plans use
    units: list[str]            # the nodes a plan may quantize (MatMul / Conv with weights ...)
    high_precision: str         # what excluded nodes run in by default
    simulated: bool             # its builds cannot run here; accuracy is estimated
    exact_variants: bool        # a variant is the build itself (else the build is measured again)
    runs_here: bool             # its builds run here at deployment speed (latency measurable here)
    fixed_exclude: list[str]    # nodes every variant keeps out (set by a planner before the first)
    notes: list[str]            # what the user should know about its builds

    @classmethod
    def for_search(cls, fp32_onnx: Path, calib, workdir: Path, **options) -> "Quantizer": ...
    def plan(self, exclude: Sequence[str]) -> QuantPlan: ...      # its own recipe, ``exclude`` kept out
    def build(self, out: Path, plan: QuantPlan) -> dict: ...     # write ``out``; facts for the recipe
    def variant(self, out: Path, exclude: Sequence[str]) -> Path: ...   # a candidate to measure
    def runner(self, path: Path) -> Runner: ...                   # run a built file here
    def describe(self) -> dict: ...                               # the manifest's recipe fields
    # the per-branch planner (mixed.py): the graph its branch table names nodes of, then that table built
    @staticmethod
    def plan_graph(fp32_onnx: Path, workdir: Path) -> Path: ...
    @classmethod
    def build_per_branch(cls, source: Path, out: Path, table: dict, branches, calib, workdir: Path,
                         notes: list[str], **options) -> dict: ...


# backend -> "module:Class" (imported on first use: each pulls in its quantization toolkit)
QUANTIZERS: dict[str, str] = {
    "onnxruntime": "edgemm.quant.ort_int8:OrtInt8Quantizer",
    "tensorrt": "edgemm.quant.qdq:QdqQuantizer",
}


def quantizer_for(backend: str):
    """The quantizer class of ``backend`` (see ``QUANTIZERS``; a backend that ``quantizes_as`` another
    uses that one's)."""
    from ..backends import registry

    if backend not in QUANTIZERS and backend in registry.names():
        backend = registry.get(backend).quantizes_as or backend
    if backend not in QUANTIZERS:
        raise InputError(f"no quantizer for backend {backend!r}", field="backend",
                         fix=f"use one of {', '.join(QUANTIZERS)}")
    module, _, name = QUANTIZERS[backend].partition(":")
    return getattr(importlib.import_module(module), name)
