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
