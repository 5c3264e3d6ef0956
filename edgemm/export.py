"""torch -> ONNX: the dynamo exporter first, the TorchScript exporter as fallback; then onnx.checker,
onnxslim, and an FP32 parity check of the ONNX file (ONNX Runtime) against torch."""

from __future__ import annotations

import contextlib
import io
import logging
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from .errors import InputError, ParityError, first_line, storage_error
from .frontends import LoadedModel
from .iospec import TensorSpec, dynamic_batch_input
from .model_outputs import name_output_dims, name_outputs
from .parity.metrics import OutputParity, compare
from .reference import Reference

log = logging.getLogger("edgemm")

# FP32 ONNX vs torch: kernels differ in summation order only.
FP32_MIN_COSINE = 0.9999
FP32_ATOL = 1e-3
FP32_RTOL = 1e-3


@dataclass
class ExportResult:
    path: Path
    exporter: str                  # "dynamo" | "torchscript" | "none" (ONNX input)
    output_names: list[str]
    opset: int
    parity: dict[str, OutputParity] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _dynamic_map(specs: Sequence[TensorSpec]) -> dict[str, dict[int, str]]:
    return {s.name: {axis: dim for axis, dim in enumerate(s.shape) if isinstance(dim, str)} for s in specs}


@contextlib.contextmanager
def _silence_fds():
    """The TorchScript exporter's C++ side dumps graphs straight to fd 1/2, past Python's sys.stderr."""
    import tempfile

    from .capture import redirected_fds

    if log.isEnabledFor(logging.INFO):  # --verbose: let it through
        yield
        return
    with tempfile.TemporaryFile() as sink, redirected_fds(sink.fileno()):
        yield


def _quiet():
    """The exporters print progress and warnings on stdout/stderr; keep ours one-line clean."""
    stack = contextlib.ExitStack()
    stack.enter_context(_silence_fds())
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    for name in ("torch.onnx", "torch.export", "torch._dynamo", "torch.fx", "onnxscript"):
        logging.getLogger(name).setLevel(logging.ERROR)
    return stack


def _export_dynamo(module, args, kwargs, input_names, specs, path: Path):
    import torch

    dynamic = _dynamic_map(specs)
    with _quiet():
        if isinstance(module, torch.export.ExportedProgram):
            # An ExportedProgram carries its own dynamic shapes.
            torch.onnx.export(module, args, str(path), kwargs=kwargs or None, input_names=input_names,
                              dynamo=True, external_data=False)
        else:
            # Keyed by forward()'s parameter names, which covers positional and keyword arguments alike.
            torch.onnx.export(module, args, str(path), kwargs=kwargs or None, input_names=input_names,
                              dynamic_shapes={n: dynamic[n] for n in input_names}, dynamo=True,
                              external_data=False)


def _flat_wrapper(module, convention, input_names):
    import torch

    class FlatOutputs(torch.nn.Module):
        # The TorchScript exporter cannot emit dict outputs (prim::DictConstruct) nor pass keywords:
        # take the inputs positionally, call the model its own way, return a flat tuple.
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *inputs):
            from .reference import flatten_outputs
            return tuple(flatten_outputs(convention.call_ordered(self.inner, input_names, inputs))[1])

    wrapper = FlatOutputs(module)
    # DESIGN.md pitfall: a fresh wrapper is in training mode, and export restores it afterwards.
    wrapper.eval()
    return wrapper


def _export_torchscript(module, convention, args, input_names, specs, path: Path):
    import torch

    from .onnx_fastpath import fastpath_symbolics

    dynamic = _dynamic_map(specs)
    with _quiet(), fastpath_symbolics():  # nn.TransformerEncoder / MHA fast-path ops a traced archive holds
        traced = torch.jit.trace(_flat_wrapper(module, convention, input_names), args, strict=False,
                                 check_trace=False)
        torch.onnx.export(traced, args, str(path), input_names=input_names,
                          dynamic_axes={n: dynamic[n] for n in input_names if dynamic[n]}, dynamo=False)


def export_onnx(loaded: LoadedModel, specs: Sequence[TensorSpec], example: Mapping[str, np.ndarray],
                check_feeds: Mapping[str, np.ndarray], out_path: Path, *, prefer: str = "dynamo",
                output_names: Sequence[str] | None = None) -> ExportResult:
    """Export ``loaded`` to ``out_path``. ``example`` must have batch >= 2 (torch.export specializes 1)."""
    import onnx
    import torch

    input_names = [s.name for s in specs]
    reference = Reference(loaded, input_names, output_names)
    ref_example = reference.run(example)
    output_names = list(ref_example)
    tensors = {n: torch.from_numpy(np.ascontiguousarray(example[n])) for n in input_names}
    convention = loaded.calling_convention(tensors)
    call_args, call_kwargs = convention.bind(tensors)
    flat_args = tuple(tensors[n] for n in input_names)
    program = getattr(loaded, "exported_program", None)
    module = program if program is not None else loaded.module
    notes = []
    attempts = ["dynamo", "torchscript"] if prefer == "dynamo" else ["torchscript", "dynamo"]
    if isinstance(loaded.module, torch.jit.ScriptModule):
        notes.append("dynamo exporter skipped: torch.export cannot trace TorchScript modules")
        attempts = ["torchscript"]
    if program is not None:
        attempts = ["dynamo"]
    errors = []
    exporter = None
    for name in attempts:
        try:
            if name == "dynamo":
                _export_dynamo(module, call_args, call_kwargs, input_names, specs, out_path)
            else:
                _export_torchscript(loaded.module, convention, flat_args, input_names, specs, out_path)
            exporter = name
            break
        except Exception as exc:  # exporters raise many types; we report them all below
            if (disk := storage_error(exc)) is not None:
                raise disk from exc
            first = _export_failure(exc)
            errors.append(f"{name}: {first[:300]}")
            notes.append(f"{name} exporter failed: {first[:200]}")
            log.info("export with %s failed: %s", name, exc)
    if exporter is None:
        raise InputError("ONNX export failed (" + "; ".join(errors) + ")", file=loaded.source,
                         fix=_export_fix(errors, loaded.format))
    model = onnx.load(str(out_path))
    onnx.checker.check_model(model)
    model = _slim(model, notes)
    _keep_unused_inputs(model, specs, notes)
    name_outputs(model, output_names, source=loaded.source)
    rename_symbolic_dims(model, specs)
    _name_output_dims(model, specs, example, ref_example, check_feeds, reference)
    onnx.save(model, str(out_path))
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    result = ExportResult(out_path, exporter, output_names, opset, notes=notes)
    result.parity = check_fp32_parity(out_path, reference, check_feeds, source=loaded.source)
    return result


# Ops of nn.MultiheadAttention / nn.TransformerEncoderLayer's fused fast path (taken under no_grad or
# inference_mode), which the TorchScript ONNX exporter has no ONNX form for.
_FAST_PATH_OPS = ("_transformer_encoder_layer_fwd", "_native_multi_head_attention", "_nested_tensor_from_mask")


def _export_failure(exc: BaseException) -> str:
    """The line that says why: torch.onnx wraps torch.export's error in a generic "step 1/3" message
    whose cause (e.g. a data-dependent guard) is the useful part."""
    text = first_line(exc, None)
    cause = exc.__cause__
    while cause is not None and text.startswith("Failed to export the model with torch.export"):
        text = first_line(cause, None)
        cause = cause.__cause__
    return text


def _export_fix(errors: Sequence[str], fmt: str) -> str:
    joined = " ".join(errors)
    op = next((o for o in _FAST_PATH_OPS if o in joined), None)
    attention = op or ("torch.nn.modules.transformer" in joined or "MultiheadAttention" in joined)
    save_pt2 = ("save the model as .pt2 (torch.export.save(torch.export.export(model.eval(), args), 'model.pt2')) "
                "or compile its factory (package.module:function --weights FILE)")
    if fmt == "torchscript" and attention:
        what = f"aten::{op}" if op else "nn.TransformerEncoder / nn.MultiheadAttention"
        return f"the TorchScript exporter cannot export {what} from a TorchScript archive: {save_pt2}"
    unsupported = re.search(r"Exporting the operator '([\w:.]+)'", joined)
    if fmt == "torchscript" and unsupported:
        # e.g. aten::is_autocast_enabled: the fast-path checks of a torch.jit.script-ed nn.TransformerEncoder
        return (f"torch's TorchScript exporter has no ONNX form for {unsupported.group(1)}: {save_pt2}; an archive "
                f"made with torch.jit.script may trace instead (torch.jit.trace(model.eval(), args))")
    if "data-dependent" in joined:
        return ("torch.export cannot trace a shape that depends on the input values (e.g. sampling or nonzero); "
                "make that step static in forward(), or export ONNX yourself and pass the .onnx file")
    return ("make the model exportable with torch.export (see exportdb), or export ONNX yourself and pass the "
            ".onnx file")


def _keep_unused_inputs(model, specs: Sequence[TensorSpec], notes: list[str]) -> None:
    """Both exporters drop inputs the graph never reads (CLAP's ``is_longer`` when fusion is off). The
    bundle keeps the model's inputs, so data that carries them (and the runtime's input check) still fits:
    add them back as graph inputs no node reads."""
    import onnx

    have = {v.name for v in model.graph.input}
    for spec in specs:
        if spec.name in have:
            continue
        elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(spec.dtype))
        model.graph.input.append(onnx.helper.make_tensor_value_info(spec.name, elem, list(spec.shape)))
        notes.append(f"input {spec.name!r} is not used by the model (kept as an input no node reads)")


def _name_output_dims(model, specs, example, ref_example, check_feeds, reference) -> None:
    """Readable output dim names: ``batch`` where the output followed the batch between the example
    (batch 2) and the check feeds (batch 3), else ``<output>_dim<i>``."""
    input_dims = {d for s in specs for d in s.shape if isinstance(d, str)}
    batch_in = dynamic_batch_input(specs)
    sizes, batches = {}, ()
    if batch_in is not None:
        b1, b2 = len(example[batch_in]), len(check_feeds[batch_in])
        if b1 != b2:
            ref_check = reference.run(check_feeds)
            batches = (b1, b2)
            sizes = {n: list(zip(ref_example[n].shape, ref_check[n].shape)) for n in ref_example
                     if n in ref_check and ref_example[n].ndim == ref_check[n].ndim}
    name_output_dims(model, input_dims, sizes, batches)


def name_onnx_file_dims(path: Path, specs: Sequence[TensorSpec]) -> None:
    """An ONNX input file keeps its graph but takes the spec's dim names everywhere: the manifest calls
    its batch axis ``batch`` whatever the file called it (``b``, ``batch_size``), so its outputs must too,
    or they read [b, 7] beside inputs [batch, ...] and a Triton export finds no shared batch axis.
    Exporter expressions left on outputs (``Divembedding_dim_1``) become ``<output>_dim<i>``."""
    import onnx

    model = onnx.load(str(path))
    rename_symbolic_dims(model, specs)
    name_output_dims(model, {d for s in specs for d in s.shape if isinstance(d, str)})
    onnx.save(model, str(path))


def rename_symbolic_dims(model, specs: Sequence[TensorSpec]) -> None:
    """Exporters name dims s0, s40, ...; use the spec's names (batch, ...) everywhere in the graph, so
    output shapes read [batch, 512] in the manifest."""
    by_name = {s.name: s for s in specs}
    mapping: dict[str, str] = {}
    for value in model.graph.input:
        spec = by_name.get(value.name)
        if spec is None:
            continue
        for dim, want in zip(value.type.tensor_type.shape.dim, spec.shape):
            if isinstance(want, str):
                if dim.HasField("dim_param") and dim.dim_param:
                    mapping.setdefault(dim.dim_param, want)
                dim.dim_param = want
    values = list(model.graph.output) + list(model.graph.value_info)
    for value in values:
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_param") and dim.dim_param in mapping:
                dim.dim_param = mapping[dim.dim_param]
    _propagate_output_dims(model)


def _propagate_output_dims(model) -> None:
    """The TorchScript exporter invents output dim names (Gemmlogits_dim_0); ONNX Runtime's symbolic
    shape inference traces them back to the input symbols. Best effort: names only, never the graph."""
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        inferred = SymbolicShapeInference.infer_shapes(model, auto_merge=True, guess_output_rank=False)
    except Exception:  # the inference gives up on some graphs; keep the exporter's names
        return
    if inferred is None:
        return
    shapes = {o.name: o.type.tensor_type.shape for o in inferred.graph.output}
    for out in model.graph.output:
        new = shapes.get(out.name)
        if new is None or len(new.dim) != len(out.type.tensor_type.shape.dim):
            continue
        for dim, src in zip(out.type.tensor_type.shape.dim, new.dim):
            if src.HasField("dim_param") and src.dim_param and not dim.HasField("dim_value"):
                dim.dim_param = src.dim_param


def _slim(model, notes: list[str]):
    """onnxslim folds constants and removes dead nodes; a failure here is not fatal."""
    try:
        import onnxslim

        with _quiet():
            slimmed = onnxslim.slim(model)
        if slimmed is not None:
            from .quant.branches import carry_node_metadata

            carry_node_metadata(model, slimmed)  # onnxslim drops module paths; branch detection needs them
            return slimmed
    except Exception as exc:  # keep the unslimmed graph rather than stop the compile
        notes.append(f"onnxslim skipped: {str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}")
    return model


def check_fp32_parity(onnx_path: Path, reference: Reference, feeds: Mapping[str, np.ndarray], *,
                      source: str) -> dict[str, OutputParity]:
    from .onnx_io import cpu_session

    sess = cpu_session(onnx_path)
    names = [o.name for o in sess.get_outputs()]
    got = dict(zip(names, sess.run(names, dict(feeds))))
    ref = reference.run(feeds)
    if list(ref) != names:
        raise ParityError(f"exported outputs {names} do not match the model's outputs {list(ref)}", file=source,
                          fix="report this model to edgemm")
    parity = compare(ref, got)
    bad = []
    for name, p in parity.items():
        scale = float(np.abs(ref[name]).max()) if ref[name].size else 0.0
        if p.exact_match is not None and p.exact_match < 1.0:
            bad.append(f"{name}: {100 * (1 - p.exact_match):.2f}% of values differ")
        elif p.mean_cosine is not None and (p.min_cosine < FP32_MIN_COSINE
                                            or p.max_abs_error > FP32_ATOL + FP32_RTOL * scale):
            bad.append(f"{name}: max abs error {p.max_abs_error:.3g}, min cosine {p.min_cosine:.6f}")
    if bad:
        raise ParityError("FP32 ONNX does not match torch: " + "; ".join(bad), file=source,
                          fix="check for data-dependent control flow or ops that differ in export; "
                              "try --exporter torchscript")
    return parity
