"""Output names users recognise, and the same names in the ONNX graph."""

import onnx
import pytest
import torch
from onnx import TensorProto, helper

from edgemm.model_outputs import flatten_outputs, name_output_dims, name_outputs


def test_nested_dict_tuple_and_none_are_named_by_path():
    t = torch.ones(1)
    names, leaves = flatten_outputs({"logits": t, "vision": {"pooled": t, "hidden": None}, "extra": (t, None, t)})
    assert names == ["logits", "vision.pooled", "extra.0", "extra.2"]
    assert flatten_outputs((t, (t, t)))[0] == ["output_0", "output_1.0", "output_1.1"]


def test_model_output_fields_are_named_like_attributes():
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    out = {"text": BaseModelOutputWithPooling(last_hidden_state=torch.ones(1), pooler_output=torch.ones(1))}
    assert flatten_outputs(out)[0] == ["text.last_hidden_state", "text.pooler_output"]


def _graph(outputs, nodes, inits=()):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["s0", 4])
    outs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, ["s0", "floor(s0*4/128)"]) for o in outputs]
    return helper.make_model(helper.make_graph(nodes, "g", [x], outs, initializer=list(inits)))


def test_same_value_output_twice_gets_distinct_names():
    model = _graph(["y", "y"], [helper.make_node("Relu", ["x"], ["y"])])
    name_outputs(model, ["a", "b"])
    onnx.checker.check_model(model, full_check=True)
    assert [o.name for o in model.graph.output] == ["a", "b"]


def test_output_named_like_a_parameter_renames_the_parameter():
    cls = helper.make_tensor("cls", TensorProto.FLOAT, [4], [1.0] * 4)
    model = _graph(["mul"], [helper.make_node("Mul", ["x", "cls"], ["mul"])], [cls])
    name_outputs(model, ["cls"])
    onnx.checker.check_model(model, full_check=True)
    assert [o.name for o in model.graph.output] == ["cls"]
    assert model.graph.node[0].input[1] != "cls" and model.graph.initializer[0].name == model.graph.node[0].input[1]


def test_output_named_like_an_input_is_refused():
    from edgemm.errors import InputError

    model = _graph(["y"], [helper.make_node("Relu", ["x"], ["y"])])
    with pytest.raises(InputError, match="--output-names"):
        name_outputs(model, ["x"])


def test_expression_dims_become_readable():
    model = _graph(["y"], [helper.make_node("Relu", ["x"], ["y"])])
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    name_output_dims(model, {"batch"}, {"y": [(2, 3), (4, 4)]}, (2, 3))
    dims = [d.dim_param for d in model.graph.output[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "y_dim1"]
