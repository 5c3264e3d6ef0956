"""INT8 for ONNX Runtime on CPU: named recipes, how to apply them, and how to pick one by measurement.

Why a selection and not one fixed recipe (measured on a MiniLM-L6 + conv fused model with real
pretrained text weights, 2-core AVX-512 VNNI CPU, ORT 1.32; ratios are INT8 p50 / FP32 p50):

* ``quantize_dynamic`` with its defaults also quantizes Conv (ConvInteger: ~4x slower than FP32 Conv here)
  and the embedding Gather: ratio ~0.87-0.95, text cosine 0.936. Restricting it to MatMul: ratio ~0.5.
* Per-tensor weights: text cosine 0.935; per-channel weights: 0.990-0.991 at the same speed, so
  per-tensor is dominated and not a default candidate.
* The remaining error comes from activation outliers: inputs of the FFN down-projections have
  max|x|/rms(x) of 60-100 (BERT's outlier channels) and one dynamic per-tensor activation scale cannot
  serve them. Leaving the MatMuls whose input ratio exceeds 50 (and the output heads) in FP32 brings the
  text cosine to 0.996 for ~+0.06-0.16 of the FP32 time: the "guarded" rung, built only when the plain
  one misses ``min_cosine``. Embedding Gathers are never quantized (no speed gain, accuracy loss).
* Static QOperator U8S8 per-channel (const-B MatMul + Conv): fast (~0.46-0.6) but text cosine 0.94-0.95
  (calibrated activation ranges); with the FFN down-projections in FP32 it reaches 0.994.
* Static QDQ S8S8: 1.0-1.5x FP32, i.e. no faster (dominated, kept in ``ALL_RECIPES`` only). Dynamic Conv is slow, so the
  dynamic recipes quantize Conv statically (QLinearConv U8S8), calibrated on the calibration samples.
* ORT transformer fusions: see ``ort_fusions``; no measurable gain, opt-in only.
* ORT 1.32's CPU SkipLayerNormalization kernel is several times slower than the Add + LayerNormalization
  it fuses; each accurate candidate (and FP32) is timed with and without that session fusion and the
  winner's setting is recorded in the recipe as ``ort_disabled_optimizers`` for the runtime to apply.
* Timing pitfall: ORT sessions spin their intra-op threads after each run. Interleaving several
  sessions on 2 cores with spinning on inflated every p50 ~3x; timing sessions here disable spinning.

Everything quantization-related is done by ``onnxruntime.quantization``; this module chooses its
arguments, feeds calibration data and measures the result.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np

from ..errors import InputError, ParityError, storage_error
from ..onnx_io import cpu_session, is_large, save_onnx

# Ops whose output counts as a "weighted" layer when looking for final projections.
_WEIGHTED_OPS = {"MatMul", "Gemm", "Conv", "ConvTranspose", "Attention", "MultiHeadAttention", "LSTM",
                 "GRU", "RNN", "MatMulInteger", "ConvInteger", "QLinearMatMul", "QLinearConv",
                 "DynamicQuantizeMatMul", "MatMulIntegerToFloat"}
_NORMALIZATION_OPS = {"LayerNormalization", "SkipLayerNormalization", "SimplifiedLayerNormalization",
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


# --------------------------------------------------------------------------------------------------
# Calibration data

def _input_specs(model) -> dict[str, tuple[np.dtype, list]]:
    import onnx

    from ..onnx_graph import graph_inputs

    return {name: (np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)),
                   [d if isinstance(d, int) else None for d in dims])
            for name, (elem_type, dims) in graph_inputs(model).items()}


def _check_calib(calib: Mapping[str, np.ndarray], specs: dict, source: object) -> dict[str, np.ndarray]:
    """Validated copy of ``calib``: every input present, same sample count, castable dtype, right rank."""
    if not isinstance(calib, Mapping) or not calib:
        raise InputError("calibration data is empty", file=source, field="calib",
                         fix="pass a dict of arrays, one per model input, samples along axis 0")
    out, counts = {}, set()
    for name, (dtype, dims) in specs.items():
        field_name = f"calib['{name}']"
        if name not in calib:
            raise InputError(f"missing model input (have {sorted(calib)})", file=source, field=field_name,
                             fix="provide an array for every model input")
        arr = np.asarray(calib[name])
        if arr.ndim != len(dims):
            raise InputError(f"rank {arr.ndim} does not match the model's rank {len(dims)} (samples along "
                             "axis 0, batch dim kept)", file=source, field=field_name,
                             fix=f"give an array of shape {['N' if d is None else d for d in dims]}")
        if arr.dtype != dtype:
            if not np.can_cast(arr.dtype, dtype, casting="same_kind"):
                raise InputError(f"dtype {arr.dtype} cannot feed a {dtype} input", file=source,
                                 field=field_name, fix=f"store this input as {dtype}")
            arr = arr.astype(dtype)
        for axis, want in enumerate(dims[1:], start=1):
            if want and arr.shape[axis] != want:
                raise InputError(f"axis {axis} has size {arr.shape[axis]}, the model wants {want}",
                                 file=source, field=field_name, fix="match the model's input shape")
        counts.add(arr.shape[0])
        out[name] = arr
    if len(counts) != 1:
        raise InputError(f"inputs have different sample counts {sorted(counts)}", file=source, field="calib",
                         fix="give every input the same number of samples along axis 0")
    if counts.pop() == 0:
        raise InputError("calibration data has zero samples", file=source, field="calib",
                         fix="provide at least one sample")
    return out


def _split_feeds(calib: dict[str, np.ndarray], specs: dict) -> list[dict[str, np.ndarray]]:
    """One feed per model call: a slice of the model's batch size along axis 0 (1 when dynamic)."""
    batch = max((dims[0] for _, dims in specs.values() if dims and dims[0]), default=1)
    n = next(iter(calib.values())).shape[0]
    if n < batch:
        raise InputError(f"{n} calibration samples, but the model's batch size is fixed at {batch}",
                         field="calib", fix=f"provide at least {batch} samples, or export with a dynamic batch")
    return [{k: v[i:i + batch] for k, v in calib.items()} for i in range(0, n - batch + 1, batch)]


class _FeedReader:
    """``onnxruntime.quantization.CalibrationDataReader`` over a list of feeds."""

    def __init__(self, feeds: Sequence[dict]):
        self._feeds = list(feeds)
        self._it = iter(self._feeds)

    def get_next(self):
        return next(self._it, None)

    def rewind(self):
        self._it = iter(self._feeds)


# --------------------------------------------------------------------------------------------------
# Building

# ORT session settings timed for every accurate candidate (and for FP32, so ratios stay fair); the
# winner's non-default setting goes into the recipe as ``ort_disabled_optimizers`` for the runtime.
# Why: ORT 1.32's CPU SkipLayerNormalization kernel ran 6x slower (2 threads; 10x on 1 thread) than the
# Add + LayerNormalization it replaces (12 ops of [1, 128, 384]: 2.3 ms vs 0.4 ms), and in the MiniLM INT8
# model it was the second most expensive op.
SESSION_VARIANTS: dict[str, tuple[str, ...]] = {
    "default": (),
    "no_skip_layernorm_fusion": ("SkipLayerNormFusion",),
}


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


class _StagedOutput:
    """A private folder next to ``dst`` to write into; ``commit`` moves the model (and data file) in place.

    The quantizers write ``<name>.onnx`` (+ ``<name>.onnx.data`` for large models, referenced by file name),
    so staging under the final name keeps that reference valid after the move.
    """

    def __init__(self, dst: Path):
        import tempfile

        self.dst = Path(dst)
        self.dir = Path(tempfile.mkdtemp(prefix=f".{self.dst.name}.", dir=self.dst.parent))
        self.path = self.dir / self.dst.name

    def commit(self) -> None:
        data = self.path.with_name(self.path.name + ".data")
        if data.exists():
            os.replace(data, self.dst.with_name(self.dst.name + ".data"))
        os.replace(self.path, self.dst)

    def cleanup(self) -> None:
        import shutil

        shutil.rmtree(self.dir, ignore_errors=True)


class _Prepared:
    """The FP32 model normalised for quantization, calibration feeds, and cached activation statistics."""

    def __init__(self, fp32_onnx: Path, calib: Mapping[str, np.ndarray], workdir: Path,
                 exclude: Sequence[str] = ()):
        import onnx

        from .ort_fusions import normalize_gemm

        self.source = Path(fp32_onnx)
        self.workdir = Path(workdir)
        try:
            model = onnx.load(str(self.source))
        except Exception as exc:  # onnx raises several types for unreadable files
            raise InputError(f"cannot read ONNX model: {exc}", file=self.source,
                             fix="pass an ONNX file written by `edgemm compile` or torch.onnx.export") from exc
        self.specs = _input_specs(model)
        from .exclusions import resolve_exclude

        self.exclude = list(exclude)
        self.user_keep = set(resolve_exclude(model, exclude))   # --exclude, on the source graph's names
        self.calib = _check_calib(calib, self.specs, self.source)
        self.feeds = _split_feeds(self.calib, self.specs)
        self.large = is_large(model)
        self.normalized = self.workdir / "fp32_normalized.onnx"
        save_onnx(normalize_gemm(model), self.normalized)
        self._fused: Path | None = None
        self._ratios: dict[Path, dict[str, float]] = {}

    def cleanup(self) -> None:
        """Remove the FP32 working copies (the source model is never touched)."""
        for path in (self.normalized, self._fused):
            if path is not None:
                _remove_model(path)

    def base_model(self, fuse: bool) -> Path:
        if not fuse:
            return self.normalized
        if self._fused is None:
            from .ort_fusions import fuse_for_ort

            fused = self.workdir / "fp32_fused.onnx"
            fuse_for_ort(self.normalized, fused)
            self._fused = fused
        return self._fused

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

    def outlier_ratios(self, model_path: Path, feeds: Sequence[dict]) -> dict[str, float]:
        """max|x| / rms(x) of the activation input of each constant-weight MatMul, by node name."""
        if model_path in self._ratios:
            return self._ratios[model_path]
        import onnx

        model = onnx.load(str(model_path))
        inits = {i.name for i in model.graph.initializer}
        targets = {n.name: n.input[0] for n in model.graph.node
                   if n.op_type == "MatMul" and n.name and n.input[1] in inits}
        present = {o.name for o in model.graph.output}
        for tensor in sorted(set(targets.values()) - present):
            model.graph.output.append(onnx.helper.make_tensor_value_info(tensor, onnx.TensorProto.FLOAT, None))
        augmented = self.workdir / "fp32_activation_probe.onnx"
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
            _remove_model(augmented)
        ratios = {}
        for node, tensor in targets.items():
            rms = np.sqrt(sq_sum.get(tensor, 0.0) / max(count.get(tensor, 0), 1))
            ratios[node] = float(peak.get(tensor, 0.0) / rms) if rms > 0 else 0.0
        self._ratios[model_path] = ratios
        return ratios


def _final_projections(model_path: Path) -> list[str]:
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
        elif not (node.op_type in _WEIGHTED_OPS or node.op_type in _NORMALIZATION_OPS or is_residual_add(node)):
            frontier.extend(node.input)
    return sorted(final)


def _excluded_nodes(recipe: Int8Recipe, prep: _Prepared, model_path: Path, calib_feeds) -> list[str]:
    params = recipe.params
    excluded: set[str] = set(prep.user_excluded(model_path))
    if params.get("exclude_final"):
        excluded.update(_final_projections(model_path))
    threshold = params.get("outlier_ratio")
    if threshold:
        ratios = prep.outlier_ratios(model_path, calib_feeds[:4])
        excluded.update(name for name, ratio in ratios.items() if ratio > threshold)
    return sorted(excluded)


def _qtype(name: str):
    from onnxruntime.quantization import QuantType

    return {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}[name]


def _build(recipe: Int8Recipe, prep: _Prepared, out_onnx: Path, calib_feeds: Sequence[dict]) -> dict:
    """Quantize with ORT's tooling as ``recipe`` says; returns facts for the report (excluded nodes)."""
    import onnx
    from onnxruntime.quantization import (CalibrationMethod, QuantFormat, quantize_dynamic,
                                          quantize_static)

    params = recipe.params
    method = params.get("method")
    if method not in ("dynamic", "static"):
        raise InputError(f"unknown INT8 method {method!r}", field=f"recipe '{recipe.name}'.method",
                         fix="use 'dynamic' or 'static'")
    base = prep.base_model(bool(params.get("fuse")))
    excluded = _excluded_nodes(recipe, prep, base, calib_feeds)
    stage = _StagedOutput(Path(out_onnx))
    tmp = stage.path
    has_conv = any(n.op_type == "Conv" for n in onnx.load(str(base), load_external_data=False).graph.node)
    common = {"per_channel": bool(params.get("per_channel", True)), "nodes_to_exclude": excluded,
              "use_external_data_format": prep.large}
    try:
        with quiet_ort_quantizer_logs():  # ORT's quantizer logs a pre-processing hint on every call
            if method == "dynamic":
                src = base
                if has_conv and params.get("conv", "static_u8s8") == "static_u8s8":
                    # ConvInteger (dynamic) ran ~4x slower than FP32 Conv here; QLinearConv is fast.
                    src = stage.dir / "conv_quantized.onnx"
                    quantize_static(base, src, _FeedReader(calib_feeds), quant_format=QuantFormat.QOperator,
                                    op_types_to_quantize=["Conv"], activation_type=_qtype("uint8"),
                                    weight_type=_qtype("int8"), **common)
                # MatMul only: Gather (embeddings) and Conv are left to the lines above on purpose.
                quantize_dynamic(src, tmp, op_types_to_quantize=["MatMul"], weight_type=_qtype("int8"),
                                 extra_options={"MatMulConstBOnly": True}, **common)
            else:
                fmt = {"qoperator": QuantFormat.QOperator, "qdq": QuantFormat.QDQ}[params.get("format", "qoperator")]
                quantize_static(base, tmp, _FeedReader(calib_feeds), quant_format=fmt,
                                op_types_to_quantize=["MatMul", "Conv"],
                                activation_type=_qtype(params.get("activation_type", "uint8")),
                                weight_type=_qtype(params.get("weight_type", "int8")),
                                calibrate_method=CalibrationMethod.MinMax,
                                # Activation x activation MatMuls (attention) stay FP32: ranges too wide.
                                extra_options={"MatMulConstBOnly": True}, **common)
        stage.commit()
    finally:
        stage.cleanup()
    return {"excluded_nodes": excluded}


def _remove_model(path: Path) -> None:
    _unlink(path)
    _unlink(Path(path).with_name(Path(path).name + ".data"))


def _unlink(path: Path) -> None:
    try:
        Path(path).unlink()
    except FileNotFoundError:
        pass


def apply_recipe(recipe: Int8Recipe, fp32_onnx: Path, out_onnx: Path, calib: dict[str, np.ndarray], *,
                 exclude: Sequence[str] = ()) -> dict:
    """Write ``out_onnx``: ``fp32_onnx`` quantized by ``recipe``, calibrated on all of ``calib``, the
    ``exclude`` patterns (quant/exclusions.py) kept in FP32; returns {"excluded_nodes": [...]}."""
    import tempfile

    out_onnx = Path(out_onnx)
    with tempfile.TemporaryDirectory(prefix=".edgemm-int8-", dir=out_onnx.parent) as work:
        prep = _Prepared(Path(fp32_onnx), calib, Path(work), exclude)
        return _build(recipe, prep, out_onnx, prep.feeds)


# --------------------------------------------------------------------------------------------------
# Accuracy and selection

def output_agreement(ref: np.ndarray, got: np.ndarray) -> tuple[str, float]:
    """("cosine", mean per-sample cosine) for float outputs, ("equal", fraction equal) for the rest."""
    ref, got = np.asarray(ref), np.asarray(got)
    if ref.shape != got.shape:
        return ("cosine" if np.issubdtype(ref.dtype, np.floating) else "equal", 0.0)
    if not np.issubdtype(ref.dtype, np.floating):
        return "equal", float(np.mean(ref == got)) if ref.size else 1.0
    n = ref.shape[0] if ref.ndim else 1
    a = ref.reshape(n, -1).astype(np.float64)
    b = got.reshape(n, -1).astype(np.float64)
    if not np.all(np.isfinite(b)):
        return "cosine", 0.0
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    dot = (a * b).sum(axis=1)
    both_zero = (na == 0) & (nb == 0)
    cos = np.where(both_zero, 1.0, dot / np.maximum(na * nb, 1e-300))
    return "cosine", float(np.mean(cos))


def top1_agreement(ref: np.ndarray, got: np.ndarray) -> float:
    """Fraction of rows (all axes but the last) whose argmax is the same."""
    ref, got = np.asarray(ref), np.asarray(got)
    if ref.shape != got.shape or not ref.size:
        return 0.0 if ref.shape != got.shape else 1.0
    return float(np.mean(ref.argmax(-1) == got.argmax(-1)))


def _scored_outputs(model_path: Path, names: Sequence[str], reference: Sequence[np.ndarray]) -> set[str]:
    """The class-score outputs (parity/output_kinds.py: the graph and the values decide, as the gate does)."""
    import onnx

    from ..parity.output_kinds import SCORES, graph_score_outputs, value_kind

    heads = graph_score_outputs(onnx.load(str(model_path), load_external_data=False))
    return {n for n, ref in zip(names, reference) if value_kind(ref, heads.get(n)) == SCORES}


def _top1_short(row: "CandidateResult", min_top1: float) -> str | None:
    """The first class-score output whose top-1 agreement is under ``min_top1``, if any."""
    return next((n for n, a in row.agreement.items() if "top1" in a and a["top1"] < min_top1), None)


def _run_all(sess, feeds: Sequence[dict]) -> list[np.ndarray]:
    """Outputs over all feeds, concatenated along axis 0 (one array per model output)."""
    runs = [[np.atleast_1d(np.asarray(value)) for value in sess.run(None, feed)] for feed in feeds]
    return [np.concatenate([run[i] for run in runs]) for i in range(len(runs[0]))]


@dataclass
class CandidateResult:
    name: str
    params: dict
    status: str  # "selected" | "ok" | "inaccurate" | "dominated" | "failed" | "out of time"
    ok: bool = False
    min_agreement: float | None = None
    agreement: dict = field(default_factory=dict)  # output -> {"metric": "cosine"|"equal", "value": x[, "top1": t]}
    p50_ms: float | None = None
    p50_ratio: float | None = None  # vs FP32, measured interleaved in the same run
    session: str | None = None  # the SESSION_VARIANTS entry it was fastest with
    build_s: float | None = None
    excluded_nodes: list = field(default_factory=list)
    note: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Selection:
    recipe: Int8Recipe
    path: Path
    table: list[CandidateResult]
    fp32_p50_ms: float
    min_cosine: float
    eval_samples: int
    calib_samples: int
    seconds: float

    def to_dict(self) -> dict:
        return {"recipe": self.recipe.to_dict(), "path": str(self.path), "fp32_p50_ms": self.fp32_p50_ms,
                "min_cosine": self.min_cosine, "eval_samples": self.eval_samples,
                "calib_samples": self.calib_samples, "seconds": self.seconds,
                "table": [row.to_dict() for row in self.table]}


def _split_samples(feeds: list[dict], max_calib: int, max_eval: int) -> tuple[list[dict], list[dict], str]:
    """Calibration feeds first, held-out evaluation feeds last (edgemm.data.hold_out); they overlap
    only with < 2 feeds."""
    from ..data import hold_out

    split = hold_out(len(feeds), max_judge=max_eval)
    return feeds[split.calibrate][:max_calib], feeds[split.judge], split.note


def _time_candidates(fp32_onnx: Path, models: Sequence[tuple[str, Path]], feed: dict,
                     iterations: int) -> tuple[float, dict[str, tuple[float, str]]]:
    """Interleaved p50 of FP32 and each model under each session variant that applies.

    Returns (best FP32 p50 ms, {name: (best p50 ms, variant)}). FP32 gets its best variant too, so that a
    session setting is never credited to quantization.
    """
    import onnx

    from ..parity.latency import measure_interleaved

    has_layernorm = any(n.op_type == "LayerNormalization"
                        for n in onnx.load(str(fp32_onnx), load_external_data=False).graph.node)
    variants = {k: v for k, v in SESSION_VARIANTS.items() if has_layernorm or not v}
    fns, sessions = {}, []
    for name, path in [("fp32", fp32_onnx), *models]:
        for variant, disabled in variants.items():
            sess = cpu_session(path, spinning=False, disabled_optimizers=disabled)
            sessions.append(sess)
            fns[(name, variant)] = (lambda s=sess: s.run(None, feed))
    stats = measure_interleaved(fns, warmup=3, iterations=iterations)
    best: dict[str, tuple[float, str]] = {}
    for (name, variant), st in stats.items():
        if name not in best or st.p50_ms < best[name][0]:
            best[name] = (round(st.p50_ms, 3), variant)
    fp32_ms = best.pop("fp32")[0]
    return fp32_ms, best


def _dominated_by(recipe: Int8Recipe, passed: Iterable[Int8Recipe]) -> str | None:
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


def select_recipe(fp32_onnx: Path, calib: dict[str, np.ndarray], workdir: Path, *, min_cosine: float = 0.99,
                  candidates: Sequence[Int8Recipe] | None = None, log: Callable[[str], None] | None = None,
                  max_calib_samples: int = 16, max_eval_samples: int = 64, timing_iterations: int = 30,
                  time_budget_s: float = 90.0, exclude: Sequence[str] = (),
                  held_out: Mapping[str, np.ndarray] | None = None, min_top1: float | None = None) -> Selection:
    """Build each candidate, keep those whose every output agrees with FP32 to ``min_cosine`` (and whose
    class-score outputs keep FP32's top-1 to ``min_top1``, the INT8 gate's bar by default: the search and
    the compile gate judge alike), time them interleaved with FP32 and return the fastest. Raises
    ``ParityError`` if none is accurate enough.

    ``held_out``: samples to pick on (never calibrated on); without it, the tail of ``calib`` is held out.
    Float outputs are scored by mean per-sample cosine, other outputs by the fraction of equal elements;
    both must reach ``min_cosine``. Guarded variants of a recipe that already passed are skipped (they
    only add FP32 nodes). Candidates not started within ``time_budget_s`` are reported "out of time".
    """
    say = log or (lambda _msg: None)
    started = time.perf_counter()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    candidates = list(candidates if candidates is not None else candidate_recipes())
    if not candidates:
        raise InputError("no INT8 candidate recipes given", field="candidates", fix="omit it to use the defaults")
    names = [c.name for c in candidates]
    if len(set(names)) != len(names) or "fp32" in names:
        raise InputError(f"candidate recipe names must be unique and not 'fp32': {names}", field="candidates",
                         fix="rename the recipes")
    prep = _Prepared(Path(fp32_onnx), calib, workdir, exclude)
    try:
        if held_out is not None:
            calib_feeds, split_note = prep.feeds[:max_calib_samples], ""
            eval_feeds = _split_feeds(_check_calib(held_out, prep.specs, "held-out samples"), prep.specs)
            eval_feeds = eval_feeds[:max_eval_samples]
        else:
            calib_feeds, eval_feeds, split_note = _split_samples(prep.feeds, max_calib_samples, max_eval_samples)
        if split_note:
            say(f"warning: {split_note}")
        fp32_sess = cpu_session(prep.source, spinning=False)
        output_names = [o.name for o in fp32_sess.get_outputs()]
        reference = _run_all(fp32_sess, eval_feeds)
        scored = _scored_outputs(prep.source, output_names, reference)
        if min_top1 is None:
            from ..precision import spec

            min_top1 = spec("int8").min_top1_agreement
        say(f"INT8 selection: {len(candidates)} candidates, {len(calib_feeds)} calibration / "
            f"{len(eval_feeds)} held-out feeds, min cosine {min_cosine}")

        table: list[CandidateResult] = []
        passing: list[tuple[Int8Recipe, Path, object, CandidateResult]] = []  # recipe, file, session, row
        for index, recipe in enumerate(candidates):
            row = CandidateResult(recipe.name, dict(recipe.params), status="failed")
            table.append(row)
            dominated = _dominated_by(recipe, [p[0] for p in passing])
            if dominated:
                row.status, row.note = "dominated", f"{dominated} already met min_cosine with fewer FP32 nodes"
                continue
            if time.perf_counter() - started > time_budget_s:
                row.status, row.note = "out of time", f"time budget {time_budget_s:.0f} s spent"
                continue
            path = workdir / f"int8_{index}_{recipe.name}.onnx"
            t0 = time.perf_counter()
            try:
                facts = _build(recipe, prep, path, calib_feeds)
                sess = cpu_session(path, spinning=False)
                outputs = _run_all(sess, eval_feeds)
            except InputError:
                raise
            except Exception as exc:  # a recipe ORT cannot apply to this graph is a result, not a crash
                if (disk := storage_error(exc)) is not None:
                    raise disk from exc
                row.note = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
                row.build_s = round(time.perf_counter() - t0, 2)
                say(f"  {recipe.name}: failed ({row.note})")
                _remove_model(path)
                continue
            row.build_s = round(time.perf_counter() - t0, 2)
            row.excluded_nodes = facts["excluded_nodes"]
            for name, ref, got in zip(output_names, reference, outputs):
                metric, value = output_agreement(ref, got)
                row.agreement[name] = {"metric": metric, "value": round(value, 6)}
                if name in scored:
                    row.agreement[name]["top1"] = round(top1_agreement(ref, got), 6)
            row.min_agreement = min(v["value"] for v in row.agreement.values())
            short = _top1_short(row, min_top1)
            row.ok = row.min_agreement >= min_cosine and short is None
            row.status = "ok" if row.ok else "inaccurate"
            why = (" - below min_cosine" if row.min_agreement < min_cosine else
                   f" - top-1 agreement {row.agreement[short]['top1']:.4f} < {min_top1} on '{short}'" if short else "")
            say(f"  {recipe.name}: min agreement {row.min_agreement:.5f} ({len(row.excluded_nodes)} nodes kept FP32, "
                f"built in {row.build_s:.1f} s){why}")
            if row.ok:
                passing.append((recipe, path, sess, row))
            else:
                del sess
                _remove_model(path)

        if not passing:
            best = max((r for r in table if r.min_agreement is not None), key=lambda r: r.min_agreement, default=None)
            reached = (f"best {best.name}: {best.min_agreement:.4f} on "
                       f"'{min(best.agreement, key=lambda k: best.agreement[k]['value'])}'") if best else "no candidate ran"
            if best is not None and best.min_agreement >= min_cosine and (short := _top1_short(best, min_top1)):
                reached = f"best {best.name}: top-1 agreement {best.agreement[short]['top1']:.4f} on '{short}'"
            raise ParityError(f"no INT8 recipe reached min cosine {min_cosine} and top-1 agreement {min_top1} on "
                              f"every output ({reached})",
                              file=fp32_onnx, field="int8",
                              fix="compile with --fp16 or --fp32, lower the tolerance, or use a mixed precision")

        del fp32_sess
        fp32_ms, timed = _time_candidates(prep.source, [(r.name, path) for r, path, _, _ in passing],
                                          eval_feeds[0], timing_iterations)
        for _, _, _, row in passing:
            row.p50_ms, row.session = timed[row.name]
            row.p50_ratio = round(row.p50_ms / fp32_ms, 4)
        chosen_recipe, chosen_path, _, chosen_row = min(passing, key=lambda p: p[3].p50_ms)
        chosen_row.status = "selected"
        disabled = SESSION_VARIANTS[chosen_row.session]
        if disabled:
            chosen_recipe = Int8Recipe(chosen_recipe.name,
                                       {**chosen_recipe.params, "ort_disabled_optimizers": list(disabled)})
            chosen_row.params = dict(chosen_recipe.params)
        for _, path, _, row in passing:
            if row is not chosen_row:
                _remove_model(path)
        passing.clear()
        seconds = round(time.perf_counter() - started, 2)
        say(f"INT8 selected {chosen_recipe.name}: p50 {chosen_row.p50_ratio:.3f}x FP32, min agreement "
            f"{chosen_row.min_agreement:.5f} ({seconds:.0f} s)")
        return Selection(chosen_recipe, chosen_path, table, round(fp32_ms, 3), min_cosine, len(eval_feeds),
                         len(calib_feeds), seconds)
    finally:
        prep.cleanup()
