"""edgemm.quant.cpu_int8 on a tiny 2-layer text + image model exported with the dynamo exporter."""

import collections
import json

import numpy as np
import onnx
import pytest

from edgemm.errors import InputError, ParityError
from edgemm.quant import cpu_int8
from edgemm.quant.cpu_int8 import (ALL_RECIPES, Int8Recipe, apply_recipe, candidate_recipes, cpu_session,
                                   output_agreement, select_recipe)
from edgemm.quant.ort_recipes import dominated_by

torch = pytest.importorskip("torch")

VOCAB, SEQ, DIM, FFN = 200, 16, 64, 256


class TinyFused(torch.nn.Module):
    """2 pre-norm MLP blocks over token embeddings + one conv over an image, a fused head, and an int64
    output (token count) that quantization must leave exactly equal."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, DIM)
        self.blocks = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.LayerNorm(DIM), torch.nn.Linear(DIM, FFN), torch.nn.GELU(),
                                torch.nn.Linear(FFN, DIM)) for _ in range(2))
        self.conv = torch.nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.head = torch.nn.Linear(DIM + 16, 4)

    def forward(self, input_ids, image):
        x = self.embed(input_ids)
        for block in self.blocks:
            x = x + block(x)
        text = x.mean(dim=1)
        img = torch.relu(self.conv(image)).mean(dim=(2, 3))
        logits = self.head(torch.cat([text, img], dim=-1))
        return text, logits, (input_ids != 0).sum(dim=1)


def make_data(n, seed):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, VOCAB, size=(n, SEQ), dtype=np.int64)
    ids[:, SEQ // 2:] *= rng.integers(0, 2, size=(n, 1))  # some samples padded with 0
    return {"input_ids": ids, "image": rng.standard_normal((n, 3, 16, 16)).astype(np.float32)}


@pytest.fixture(scope="module")
def fp32_onnx(tmp_path_factory):
    torch.manual_seed(0)
    model = TinyFused().eval()
    example = make_data(2, seed=0)
    path = tmp_path_factory.mktemp("cpu_int8") / "tiny.onnx"
    batch = torch.export.Dim("batch", min=1, max=64)
    torch.onnx.export(model, (torch.from_numpy(example["input_ids"]), torch.from_numpy(example["image"])),
                      str(path), dynamo=True, input_names=["input_ids", "image"],
                      output_names=["text_embeds", "logits", "lengths"],
                      dynamic_shapes=({0: batch}, {0: batch}), external_data=False, verbose=False)
    return path


def op_counts(path):
    return collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def test_recipes_are_json_serialisable_and_round_trip():
    assert {r.name for r in candidate_recipes()} <= set(ALL_RECIPES)
    for recipe in ALL_RECIPES.values():
        text = json.dumps(recipe.to_dict())
        assert Int8Recipe.from_dict(json.loads(text)) == recipe


def test_apply_recipe_quantizes_matmuls_and_runs(fp32_onnx, tmp_path):
    out = tmp_path / "int8.onnx"
    apply_recipe(ALL_RECIPES["dynamic_per_channel"], fp32_onnx, out, make_data(8, seed=1))
    ops = op_counts(out)
    assert ops["DynamicQuantizeLinear"] > 0 and ops["MatMulInteger"] >= 4  # 4 linears in the blocks
    assert ops["QLinearConv"] == 1  # Conv quantized statically (ConvInteger is slow on ORT CPU)
    assert "MatMulInteger" not in op_counts(fp32_onnx)
    assert out.stat().st_size < 0.6 * fp32_onnx.stat().st_size
    feeds = make_data(3, seed=2)
    ref = cpu_session(fp32_onnx).run(None, feeds)
    got = cpu_session(out).run(None, feeds)
    assert [g.shape for g in got] == [r.shape for r in ref]
    assert output_agreement(ref[0], got[0])[1] > 0.9
    assert not np.array_equal(ref[0], got[0])  # it really is a different (quantized) computation
    np.testing.assert_array_equal(ref[2], got[2])
    assert not list(tmp_path.glob(".*"))  # no staging leftovers next to the output


def test_exclude_final_keeps_the_head_in_fp32(fp32_onnx, tmp_path):
    out = tmp_path / "guarded.onnx"
    recipe = Int8Recipe("head_fp32", {**ALL_RECIPES["dynamic_per_channel"].params, "exclude_final": True})
    apply_recipe(recipe, fp32_onnx, out, make_data(8, seed=1))
    plain = tmp_path / "plain.onnx"
    apply_recipe(ALL_RECIPES["dynamic_per_channel"], fp32_onnx, plain, make_data(8, seed=1))
    # The head (logits) is the only final projection here; it stays a float MatMul.
    assert op_counts(out)["MatMul"] == op_counts(plain)["MatMul"] + 1


def test_select_recipe_picks_an_accurate_candidate(fp32_onnx, tmp_path):
    lines = []
    candidates = [ALL_RECIPES["dynamic_per_channel"], ALL_RECIPES["dynamic_per_channel_guarded"],
                  ALL_RECIPES["static_u8s8_per_channel"]]
    sel = select_recipe(fp32_onnx, make_data(24, seed=3), tmp_path / "search", min_cosine=0.99,
                        candidates=candidates, log=lines.append, timing_iterations=5)
    assert sel.path.is_file()
    base = next(c for c in candidates if c.name == sel.recipe.name)
    chosen = next(r for r in sel.table if r.status == "selected")
    # a session setting may be added (timed against FP32 under the same setting); nothing else changes
    extra = {k: v for k, v in sel.recipe.params.items() if k not in base.params}
    assert {k: sel.recipe.params[k] for k in base.params} == base.params
    assert extra == ({} if chosen.session == "default"
                     else {"ort_disabled_optimizers": list(cpu_int8.SESSION_VARIANTS[chosen.session])})
    assert chosen.name == sel.recipe.name and chosen.ok and chosen.min_agreement >= 0.99
    assert chosen.agreement["lengths"] == {"metric": "equal", "value": 1.0}
    assert chosen.agreement["logits"]["metric"] == "cosine"
    assert chosen.p50_ratio > 0 and sel.fp32_p50_ms > 0
    # the fastest accurate candidate wins
    timed = [r for r in sel.table if r.p50_ms is not None]
    assert chosen.p50_ms == min(r.p50_ms for r in timed)
    # the guarded rung only adds FP32 nodes: skipped once the plain rung passed
    guarded = next(r for r in sel.table if r.name == "dynamic_per_channel_guarded")
    assert guarded.status == "dominated"
    json.dumps(sel.to_dict())
    assert lines and "selected" in lines[-1]
    # only the chosen model is left in the work dir
    assert [p.name for p in (tmp_path / "search").iterdir()] == [sel.path.name]
    got = cpu_session(sel.path).run(None, make_data(2, seed=9))
    assert got[1].shape == (2, 4)


def test_impossible_min_cosine_raises_parity_error(fp32_onnx, tmp_path):
    with pytest.raises(ParityError) as info:
        select_recipe(fp32_onnx, make_data(12, seed=3), tmp_path / "search", min_cosine=1.0001,
                      candidates=[ALL_RECIPES["dynamic_per_channel"]], timing_iterations=3)
    message = str(info.value)
    assert "best dynamic_per_channel" in message and "--fp16" in message and "\n" not in message
    assert not list((tmp_path / "search").glob("*.onnx"))


def test_search_judges_class_scores_by_top1_like_the_gate(fp32_onnx, tmp_path):
    """A recipe inside min_cosine whose class-score output (the head's logits; not the pooled text
    features) misses the top-1 bar is not picked: the compile gate would refuse it afterwards."""
    candidates = [ALL_RECIPES["dynamic_per_channel"]]
    sel = select_recipe(fp32_onnx, make_data(24, seed=3), tmp_path / "ok", min_cosine=0.9, candidates=candidates,
                        timing_iterations=3)
    row = next(r for r in sel.table if r.status == "selected")
    assert 0.0 <= row.agreement["logits"]["top1"] <= 1.0 and "top1" not in row.agreement["text_embeds"]
    with pytest.raises(ParityError) as info:
        select_recipe(fp32_onnx, make_data(24, seed=3), tmp_path / "search", min_cosine=0.9, min_top1=1.0001,
                      candidates=candidates, timing_iterations=3)
    message = str(info.value)
    assert "top-1 agreement" in message and "'logits'" in message and "\n" not in message


def test_held_out_samples_are_judged_in_calls_of_the_gates_size():
    """A [B, B] similarity judged one sample per call is [1, 1] (its cosine is only a sign: convnext_bert's
    search read 0.9375 where the gate's calls of 16 read 0.9995); calls of 16, equal-sized, as the gate."""
    from edgemm.quant.cpu_int8 import JUDGE_BATCH, _judge_calls

    one = [{"x": np.full((1, 3), i, np.float32)} for i in range(40)]
    calls = _judge_calls(one, {"x": (np.float32, [None, 3])})
    assert [c["x"].shape for c in calls] == [(JUDGE_BATCH, 3)] * 2 and calls[1]["x"][0, 0] == JUDGE_BATCH
    assert [c["x"].shape for c in _judge_calls(one[:5], {"x": (np.float32, [None, 3])})] == [(5, 3)]
    assert _judge_calls(one, {"x": (np.float32, [1, 3])}) == one  # a fixed batch is called as it is


def test_calibration_must_cover_every_input(fp32_onnx, tmp_path):
    data = make_data(4, seed=1)
    del data["image"]
    with pytest.raises(InputError, match=r"calib\['image'\]"):
        apply_recipe(ALL_RECIPES["dynamic_per_channel"], fp32_onnx, tmp_path / "x.onnx", data)
    data = make_data(4, seed=1)
    data["input_ids"] = data["input_ids"].astype(np.float32)
    with pytest.raises(InputError, match="cannot feed"):
        apply_recipe(ALL_RECIPES["dynamic_per_channel"], fp32_onnx, tmp_path / "x.onnx", data)


def test_output_agreement_metrics():
    a = np.array([[1.0, 0.0], [0.0, 2.0]], np.float32)
    assert output_agreement(a, a) == ("cosine", pytest.approx(1.0))
    assert output_agreement(a, np.array([[0.0, 1.0], [0.0, 2.0]], np.float32))[1] == pytest.approx(0.5)
    assert output_agreement(a, np.full_like(a, np.nan))[1] == 0.0
    assert output_agreement(np.array([1, 2, 3, 4]), np.array([1, 2, 0, 4])) == ("equal", 0.75)


def test_dominance_only_between_guard_levels_of_one_family():
    plain, guarded, strict = (ALL_RECIPES[n] for n in ("dynamic_per_channel", "dynamic_per_channel_guarded",
                                                         "dynamic_per_channel_strict"))
    static = ALL_RECIPES["static_u8s8_per_channel_strict"]
    assert dominated_by(guarded, [plain]) == plain.name
    assert dominated_by(strict, [guarded]) == guarded.name
    assert dominated_by(guarded, [strict]) is None
    assert dominated_by(static, [plain, guarded]) is None


def test_guarded_recipe_keeps_outlier_inputs_in_fp32(tmp_path):
    """A MatMul fed by an activation with one huge channel stays FP32; a well-behaved one is quantized."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    scale = np.ones(512, np.float32)
    scale[3] = 50.0  # one outlier channel among 512, as in BERT's FFN activations: max/rms ~ 60 vs ~ 4
    inits = [numpy_helper.from_array(rng.standard_normal((16, 512)).astype(np.float32), "w1"),
             numpy_helper.from_array(scale, "scale"),
             numpy_helper.from_array(rng.standard_normal((512, 8)).astype(np.float32), "w2")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="calm"),
             helper.make_node("Mul", ["h", "scale"], ["hs"], name="spike"),
             helper.make_node("MatMul", ["hs", "w2"], ["y"], name="outlier_fed"),
             helper.make_node("Relu", ["y"], ["out"], name="act")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 32, 16])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["b", 32, 8])], inits)
    src = tmp_path / "spiky.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), src)
    calib = {"x": rng.standard_normal((8, 32, 16)).astype(np.float32)}

    out = tmp_path / "guarded.onnx"
    recipe = Int8Recipe("outliers_only", {**ALL_RECIPES["dynamic_per_channel"].params, "outlier_ratio": 25.0})
    apply_recipe(recipe, src, out, calib)
    model = onnx.load(str(out))
    float_matmuls = [n for n in model.graph.node if n.op_type == "MatMul"]
    assert [n.input[1] for n in float_matmuls] == ["w2"]
    assert any(n.op_type == "MatMulInteger" for n in model.graph.node)
