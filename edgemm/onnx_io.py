"""ONNX files and ONNX Runtime sessions at compile time: one home for each shared tool (after
Polygraphy's ``SaveOnnx`` / ``SessionFromOnnx``).

- ``cpu_session``: an ORT CPU session, opened as the bundle runtime opens it (all graph optimizations).
- ``save_onnx``: write a model atomically, with its weights in ``<name>.data`` when protobuf cannot hold
  them; ``copy_inline``: a self-contained copy of a model whose weights may be external.
- ``load_graph`` / ``graph_outputs``: the graph without its weights, and its outputs as the manifest
  lists them.

The deployable runtime (``edgemm/runtime/``) opens its own sessions: it must not import compile-time code.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from .errors import InputError, first_line

# Models above this many bytes are saved with external data: protobuf refuses messages over 2 GB, and a
# model's serialized size grows a little on save (one limit for every writer; there were two, 1.5 and 1.8 GB).
EXTERNAL_DATA_BYTES = 1_500_000_000


def cpu_session(model: Path | str | bytes, *, spinning: bool = True, disabled_optimizers: Sequence[str] = (),
                intra_op_threads: int = 0, inter_op_threads: int = 0):
    """An ORT CPU session with all graph optimizations (less ``disabled_optimizers``), as the runtime
    would open it. ``model``: a path or the serialized bytes; thread counts 0 are ORT's defaults."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = intra_op_threads
    so.inter_op_num_threads = inter_op_threads
    so.log_severity_level = 3
    if not spinning:
        # Idle-spinning pools of the other interleaved sessions steal the cores (measured ~3x on 2 cores).
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, so, providers=["CPUExecutionProvider"],
                                disabled_optimizers=list(disabled_optimizers) or None)


def is_large(model) -> bool:
    """Whether ``model`` (a ModelProto) must be saved with external data."""
    try:
        return model.ByteSize() > EXTERNAL_DATA_BYTES
    except ValueError:  # protobuf refuses to size messages over 2 GB
        return True


def save_onnx(model, path: Path, *, external: bool | None = None) -> None:
    """Write ``model`` to ``path`` through a temporary name, so that a reader never sees half a file.

    Weights go to ``<name>.data`` beside it when the model is large (``external`` forces either way); the
    data file is named after the final path, so the reference stays valid after the rename. As with
    ``onnx.save_model``, saving with external data leaves ``model``'s tensors pointing at that file (no
    copy: these models are the ones too big to copy)."""
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    big = is_large(model) if external is None else external
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        onnx.save_model(model, str(tmp), save_as_external_data=big, all_tensors_to_one_file=True,
                        location=f"{path.name}.data" if big else None)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def remove_model(path: Path) -> None:
    """Delete a model ``save_onnx`` wrote: the file and its ``<name>.data``, if any."""
    for p in (Path(path), Path(f"{path}.data")):
        p.unlink(missing_ok=True)


def copy_inline(src: Path, dst: Path) -> None:
    """A self-contained copy of ``src`` (bundles hold one file): external data (already path-checked) is
    pulled inline."""
    import onnx

    try:
        model = onnx.load(str(src), load_external_data=True)
    except (ValueError, OSError, MemoryError, OverflowError) as exc:
        # onnx checks offset/length against the data file only now (ValueError); a length that fits the
        # file but not in memory is a MemoryError. The first line names the tensor.
        detail = first_line(exc)
        raise InputError(f"cannot read its external data ({detail})", file=src, field="external data",
                         fix="re-export the model, or copy its external data files whole next to the .onnx "
                             "file") from exc
    onnx.save(model, str(dst))


def load_graph(path: Path):
    """The ModelProto without its external weights (enough to read nodes, names and shapes)."""
    import onnx

    return onnx.load(str(path), load_external_data=False)


def graph_outputs(path: Path) -> list[dict]:
    """The graph's outputs as the manifest lists them: name, dtype, shape (symbolic dims by name)."""
    from .frontends.onnx_file import ONNX_DTYPES

    outs = []
    for value in load_graph(path).graph.output:
        t = value.type.tensor_type
        shape = []
        for axis, d in enumerate(t.shape.dim):
            shape.append(int(d.dim_value) if d.HasField("dim_value") else (d.dim_param or f"dim{axis}"))
        outs.append({"name": value.name, "dtype": ONNX_DTYPES.get(t.elem_type, str(t.elem_type)), "shape": shape})
    return outs
