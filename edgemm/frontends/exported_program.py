"""torch.export archives (.pt2): carry example inputs and dynamic shapes."""

from __future__ import annotations

import pickle
from pathlib import Path

from ..errors import InputError, SecurityError, first_line
from ..iospec import DimRange, TensorSpec
from .base import LoadedModel, LoadOptions, logged_error, sha256_of, torch_logs_collected
from ..signature import from_program
from .pt2_pytree import register_types
from .pt2_guard import check_archive, weights_only_unpickling


def load(spec: str, options: LoadOptions) -> LoadedModel:
    import torch

    path = Path(spec)
    # torch.export.load can run code from the file (see pt2_guard); unless the user trusts the file,
    # vet it first and keep every unpickling weights-only.
    if not options.trust_pickle:
        check_archive(path)
    register_types(path)  # output types of allow-listed libraries (Hugging Face ModelOutput), else one line
    try:
        with torch_logs_collected() as records, weights_only_unpickling(not options.trust_pickle):
            program = torch.export.load(str(path))
    except pickle.UnpicklingError as exc:
        raise SecurityError("holds pickled Python objects (weights, constants or sample inputs) that would run "
                            "code when loaded", file=path,
                            fix="re-export it from a model with plain tensors, or pass --trust-pickle if you "
                                "trust its author") from exc
    except Exception as exc:  # corrupt zip, unknown schema version, ...
        detail = logged_error(records) or first_line(exc, None)
        raise InputError(f"cannot load torch.export archive ({detail})", file=path,
                         fix="re-save it with torch.export.save(torch.export.export(model, args), path)") from exc
    loaded = LoadedModel(source=spec, format="exported_program", sha256=sha256_of(path), name=path.stem,
                         module=program.module())
    loaded.exported_program = program  # type: ignore[attr-defined]
    _check_no_training_ops(program, loaded)
    user_inputs = list(program.graph_signature.user_inputs)
    loaded.signature = from_program(program, user_inputs, file=path)
    # Keyword arguments are named by their keys (what callers pass), positional ones by their graph inputs.
    names = loaded.signature.names
    examples = _example_leaves(program, len(user_inputs))
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    specs = []
    for graph_name, name, example in zip(user_inputs, names, examples):
        node = placeholders.get(graph_name)
        val = node.meta.get("val") if node is not None else None
        if val is None or not hasattr(val, "shape"):
            raise InputError(f"input {name!r} is not a tensor", file=path, field=name,
                             fix="export a model whose inputs are tensors")
        shape, ranges = [], {}
        for axis, dim in enumerate(val.shape):
            if isinstance(dim, int):
                shape.append(dim)
                continue
            dim_name = "batch" if axis == 0 else f"{name}_dim{axis}"
            shape.append(dim_name)
            rc = program.range_constraints.get(getattr(dim.node, "expr", None)) if hasattr(dim, "node") else None
            lo = max(1, int(rc.lower)) if rc is not None and str(rc.lower).lstrip("-").isdigit() else 1
            hi = int(rc.upper) if rc is not None and str(rc.upper).isdigit() else max(lo, 64)
            hi = min(hi, 4096)  # int_oo means unbounded; cap for optimization profiles
            seen = example.shape[axis] if hasattr(example, "shape") else None
            opt = lo if axis == 0 else max(lo, min(hi, int(seen or lo)))
            ranges[dim_name] = DimRange(lo, max(lo, opt), max(hi, opt, lo))
        specs.append(TensorSpec(name, str(val.dtype).replace("torch.", ""), tuple(shape), ranges))
    loaded.input_specs = specs
    loaded.input_names = [s.name for s in specs]
    args, kwargs = program.example_inputs if program.example_inputs is not None else ((), {})
    if args and not kwargs:
        loaded.example_inputs = tuple(args)
    return loaded


def _example_leaves(program, count: int) -> list:
    """The archive's example inputs in graph-input order (positional, then keyword in in_spec order);
    None where the archive carries none."""
    if program.example_inputs is None:
        return [None] * count
    from torch.utils import _pytree as pytree

    leaves = pytree.tree_leaves(program.example_inputs)
    return leaves if len(leaves) == count else [None] * count


def _check_no_training_ops(program, loaded: LoadedModel) -> None:
    """A .pt2 has no .eval(): training behaviour is baked in at export. Refuse dropout in train mode."""
    import torch

    for node in program.graph.nodes:
        if node.op == "call_function" and node.target in (
                torch.ops.aten.dropout.default, torch.ops.aten.native_dropout.default):
            train = node.args[2] if len(node.args) > 2 else True
            if train:
                raise InputError("the program was exported in training mode (dropout is active)", file=loaded.source,
                                 fix="call model.eval() before torch.export.export and re-save")
