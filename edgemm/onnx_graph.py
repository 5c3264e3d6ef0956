"""Reading an ONNX graph's real inputs (initializers listed as inputs are weights, not inputs).

One reader for the frontends (input specs), CPU INT8 (calibration checks) and modelopt Q/DQ (calibration
checks), which each map the raw dims to their own convention.
"""

from __future__ import annotations

def graph_inputs(model) -> dict[str, tuple[int, list]]:
    """name -> (ONNX elem_type, dims); a dim is its dim_value (int, when set), else its dim_param (str,
    when non-empty), else None."""
    inits = {i.name for i in model.graph.initializer}
    out = {}
    for value in model.graph.input:
        if value.name in inits:
            continue
        ttype = value.type.tensor_type
        dims = []
        for d in ttype.shape.dim:
            if d.HasField("dim_value"):
                dims.append(int(d.dim_value))
            elif d.HasField("dim_param") and d.dim_param:
                dims.append(d.dim_param)
            else:
                dims.append(None)
        out[value.name] = (ttype.elem_type, dims)
    return out


# Ops a token-id tensor passes through unchanged on its way to an embedding's Gather.
_PASS_THROUGH = frozenset({"Cast", "Identity", "Unsqueeze", "Squeeze", "Reshape", "Flatten"})


def embedding_sizes(model) -> dict[str, int]:
    """Graph input -> rows of the smallest embedding table it indexes (a Gather on axis 0 whose data is
    an initializer and whose indices come from the input, through casts and reshapes only). An id must
    lie in [0, rows) for every table it indexes; inputs feeding no such Gather are absent."""
    import onnx

    tables = {i.name: list(i.dims) for i in model.graph.initializer}
    for node in model.graph.node:  # Constant nodes hold tables too (some exporters fold weights so)
        if node.op_type == "Constant" and node.output:
            for attr in node.attribute:
                if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                    tables[node.output[0]] = list(attr.t.dims)
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    sizes = {}
    for name in graph_inputs(model):
        frontier, seen = [name], {name}
        while frontier:
            tensor = frontier.pop()
            for node in consumers.get(tensor, []):
                if node.op_type == "Gather" and len(node.input) > 1 and node.input[1] == tensor:
                    axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
                    dims = tables.get(node.input[0])
                    if axis == 0 and dims:
                        sizes[name] = min(sizes.get(name, dims[0]), dims[0])
                elif node.op_type in _PASS_THROUGH and node.input and node.input[0] == tensor:
                    for out in node.output:
                        if out not in seen:
                            seen.add(out)
                            frontier.append(out)
    return sizes
