"""A model's outputs: names users recognise, and those names in the exported ONNX graph.

``flatten_outputs`` turns what forward() returns (a tensor, tuple, dict, Hugging Face ``ModelOutput``,
nested) into named tensors: dict keys and ``ModelOutput`` fields by name, nested ones joined with
``SEP`` (``vision_model_output.pooler_output``), top-level tuple positions as ``output_<i>``; ``None``
fields are dropped. ``name_outputs`` gives the ONNX graph those names whatever the
exporter did: the same tensor returned twice gets an Identity per extra name (ONNX outputs need distinct
values), and an internal value (a parameter, a node output) that already bears an output's name is
renamed so the graph stays in SSA form (``{"cls": y}`` beside a parameter ``self.cls``).
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

from .errors import InputError

SEP = "."


def flatten_outputs(out) -> tuple[list[str], list]:
    """(names, tensors) of a model's output pytree."""
    import torch
    from torch.utils import _pytree as pytree

    if isinstance(out, torch.Tensor):
        return ["output"], [out]
    leaves_with_path, _ = pytree.tree_flatten_with_path(out)
    names, leaves = [], []
    for path, leaf in leaves_with_path:
        if leaf is None:  # an absent optional output (a ModelOutput field, a dict value)
            continue
        if not isinstance(leaf, torch.Tensor):
            raise InputError(f"model output {pytree.keystr(path)} is a {type(leaf).__name__}, not a tensor",
                             field="outputs", fix="return tensors (or a dict/tuple of tensors) from forward()")
        parts = []
        for key in path:
            if isinstance(key, pytree.MappingKey):
                parts.append(str(key.key))
            elif isinstance(key, pytree.SequenceKey):
                parts.append(f"output_{key.idx}" if not parts else str(key.idx))
            elif isinstance(key, pytree.GetAttrKey):
                parts.append(key.name)
            else:
                parts.append(str(key))
        names.append(SEP.join(parts) or "output")
        leaves.append(leaf)
    if len(set(names)) != len(names):
        names = [f"output_{i}" for i in range(len(names))]
    return names, leaves


def name_outputs(model, names: Sequence[str], *, source: str | None = None) -> None:
    """Give ``model``'s graph outputs ``names`` (in order), in place."""
    import onnx

    graph = model.graph
    if len(graph.output) != len(names):
        raise InputError(f"the exported graph has {len(graph.output)} outputs but the model returns {len(names)} "
                         f"({', '.join(names)})", file=source, field="outputs",
                         fix="return each output tensor once, or export ONNX yourself and pass the .onnx file")
    real_inputs = {v.name for v in graph.input} - {i.name for i in graph.initializer}
    clash = next((n for n in names if n in real_inputs), None)
    if clash is not None:
        raise InputError(f"output {clash!r} has the name of a model input", file=source, field="outputs",
                         fix="rename it with --output-names")
    taken = _all_value_names(graph)
    fresh = _FreshNames(taken | set(names))
    # 1. every output its own node output: an Identity where a value is output twice, or is an input/weight
    graph_inputs = {v.name for v in graph.input} | {i.name for i in graph.initializer}
    seen: set[str] = set()
    for out in graph.output:
        if out.name in seen or out.name in graph_inputs:
            new = fresh("output")
            graph.node.append(onnx.helper.make_node("Identity", [out.name], [new], name=fresh("Identity")))
            out.name = new
        seen.add(out.name)
    # 2. outputs to temporary names, 3. internal values in the way out of it, 4. outputs to their names
    temps = []
    for out in graph.output:
        temp = fresh("output")
        _rename_value(graph, out.name, temp)
        temps.append(temp)
    wanted = set(names)
    for name in sorted(_all_value_names(graph) & wanted):
        _rename_value(graph, name, fresh(f"{name}__internal"))
    for temp, name in zip(temps, names):
        _rename_value(graph, temp, name)


def name_output_dims(model, input_dims: Iterable[str], batch_sizes: Mapping[str, tuple[int, ...]] | None = None,
                     batches: tuple[int, ...] = ()) -> None:
    """Symbolic output dims the exporter named by an expression (``floor(Flatten_216_o0__d1*batch/128)``,
    ``s3``): ``batch`` where the dim followed the batch in ``batch_sizes`` (output name -> that axis'
    sizes at ``batches``), else ``<output>_dim<i>``. Dims named after an input's dims are kept."""
    known = set(input_dims)
    for value in model.graph.output:
        for axis, dim in enumerate(value.type.tensor_type.shape.dim):
            if dim.HasField("dim_value") or (dim.dim_param and dim.dim_param in known):
                continue
            sizes = (batch_sizes or {}).get(value.name, ())
            followed = bool(batches) and "batch" in known and axis < len(sizes) and tuple(sizes[axis]) == batches
            dim.dim_param = "batch" if followed else f"{value.name}_dim{axis}"


class _FreshNames:
    def __init__(self, taken: set[str]):
        self.taken = set(taken)

    def __call__(self, stem: str) -> str:
        i = 0
        while f"{stem}__{i}" in self.taken:
            i += 1
        name = f"{stem}__{i}"
        self.taken.add(name)
        return name


def _subgraphs(node):
    import onnx

    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def _all_value_names(graph) -> set[str]:
    names = {v.name for v in graph.input} | {i.name for i in graph.initializer}
    names |= {v.name for v in graph.value_info} | {v.name for v in graph.output}
    for node in graph.node:
        names.update(n for n in node.output if n)
        for sub in _subgraphs(node):
            names |= _all_value_names(sub)
    return names


def _rename_value(graph, old: str, new: str) -> None:
    """Rename a value everywhere it appears, subgraphs included (they may read outer values)."""
    for seq in (graph.input, graph.output, graph.value_info):
        for v in seq:
            if v.name == old:
                v.name = new
    for init in graph.initializer:
        if init.name == old:
            init.name = new
    for node in graph.node:
        for i, n in enumerate(node.input):
            if n == old:
                node.input[i] = new
        for i, n in enumerate(node.output):
            if n == old:
                node.output[i] = new
        for sub in _subgraphs(node):
            _rename_value(sub, old, new)
