"""Which outputs are class scores (top-1 checked) is read from the graph: heads nothing reads on.

The case that drove it: a CLIP-style model returns its text projection (a Linear) as an output *and*
normalises it into another output; the projection was judged as class scores and failed top-1 on
near-tied features. Residual sums (a transformer's last hidden state) were judged as heads too.
"""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
torch = pytest.importorskip("torch")

from edgemm.parity.output_kinds import graph_score_outputs  # noqa: E402


class _TwoTowerOutputs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = torch.nn.Linear(8, 8)
        self.proj = torch.nn.Linear(8, 4, bias=False)
        self.classifier = torch.nn.Linear(8, 3)
        self.logit_scale = torch.nn.Parameter(torch.tensor(2.0))

    def forward(self, x, y):
        hidden = x + self.mlp(x)                       # residual stream: features
        projected = self.proj(hidden)                  # projection, then normalised: features
        embeds = projected / projected.norm(dim=-1, keepdim=True)
        other = self.proj(y)
        other = other / other.norm(dim=-1, keepdim=True)
        sim = self.logit_scale.exp() * embeds @ other.t()   # scaled similarity: scores
        logits = self.classifier(hidden)                     # classifier: scores
        return {"hidden": hidden, "projected": projected, "embeds": embeds, "sim": sim, "sim_t": sim.t(),
                "logits": logits, "probs": logits.softmax(-1)}


def _export(tmp_path):
    from edgemm.model_outputs import name_outputs

    model = _TwoTowerOutputs().eval()
    path = tmp_path / "m.onnx"
    args = (torch.randn(2, 8), torch.randn(2, 8))
    torch.onnx.export(model, args, str(path), dynamo=True, input_names=["x", "y"], verbose=False)
    proto = onnx.load(str(path))
    name_outputs(proto, ["hidden", "projected", "embeds", "sim", "sim_t", "logits", "probs"])
    return proto


def test_heads_that_the_graph_reads_on_are_features_and_residual_sums_are_not_heads(tmp_path):
    heads = graph_score_outputs(_export(tmp_path))
    assert heads == {"hidden": False, "projected": False, "embeds": False, "sim": True, "sim_t": True,
                     "logits": True, "probs": True}


def _graph(nodes, outputs, inits=()):
    vi = [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in outputs]
    inputs = [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 4])]
    return onnx.helper.make_model(onnx.helper.make_graph(nodes, "g", inputs, vi, list(inits)))


def test_dequantized_integer_matmul_is_a_head_and_a_gate_is_not():
    w = onnx.numpy_helper.from_array(np.ones((4, 3), np.int8), "w")
    ws = onnx.numpy_helper.from_array(np.array(0.1, np.float32), "ws")
    h = onnx.helper.make_node
    nodes = [h("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"]),
             h("MatMulInteger", ["xq", "w", "xz"], ["acc"]),
             h("Cast", ["acc"], ["accf"], to=onnx.TensorProto.FLOAT),
             h("Mul", ["xs", "ws"], ["scale"]),                     # activation scale x weight scale
             h("Mul", ["accf", "scale"], ["logits"]),
             h("Sigmoid", ["x"], ["g"]),
             h("Mul", ["x", "g"], ["gated"])]                       # two activations: not a head
    assert graph_score_outputs(_graph(nodes, ["logits", "gated"], [w, ws])) == {"logits": True, "gated": False}
