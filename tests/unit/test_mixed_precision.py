"""Per-modality precision: policy parsing, branch detection on the zoo's fused models (module paths from
the dynamo exporter, and data flow alone), overrides, and per-branch builds for CPU and TensorRT."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")

from onnx import TensorProto  # noqa: E402

from edgemm.errors import InputError  # noqa: E402
from edgemm.quant.branches import (carry_node_metadata, find_branches, node_module_paths,  # noqa: E402
                                   parse_branch_overrides)
from edgemm.quant.mixed import apply_mixed, mixed_mode_name, parse_precision_policy  # noqa: E402

ZOO = ("dual-encoder", "cross-attention", "early-fusion")


# --- parsing ----------------------------------------------------------------------------------------

def test_parse_precision_policy():
    assert parse_precision_policy("vision=int8, text=fp16,fusion=FP32") == {
        "vision": "int8", "text": "fp16", "fusion": "fp32"}
    assert parse_precision_policy("*=int8,fusion=fp32") == {"default": "int8", "fusion": "fp32"}


@pytest.mark.parametrize("text,match", [("", "empty"), ("vision", "BRANCH=PRECISION"), ("eyes=int8", "unknown branch"),
                                        ("vision=int4", "unknown precision"), ("text=int8,text=fp16", "twice")])
def test_parse_precision_policy_errors_are_one_line(text, match):
    with pytest.raises(InputError, match=match) as err:
        parse_precision_policy(text)
    assert "\n" not in str(err.value) and "--precision" in str(err.value)


def test_parse_branch_overrides():
    assert parse_branch_overrides(["text=text_encoder.*", "fusion=head*,norm"]) == {
        "text": ["text_encoder.*"], "fusion": ["head*", "norm"]}
    for bad, match in (["text"], "BRANCH=PATTERN"), (["eyes=x"], "unknown branch"), (["text="], "empty pattern"):
        with pytest.raises(InputError, match=match):
            parse_branch_overrides(bad)


def test_mode_names_follow_the_lowest_precision_bar():
    from edgemm.parity.thresholds import DEFAULTS, defaults_for

    assert mixed_mode_name(["int8", "fp32", "fp32"]) == "mixed:fp32+int8"
    assert mixed_mode_name(["int8", "int8"]) == "int8"
    assert defaults_for(mixed_mode_name(["fp16", "fp8", "fp32"])) == DEFAULTS["fp8"]


# --- branches on the zoo models ----------------------------------------------------------------------

def _export_zoo(name, folder):
    """Dynamo export + onnxslim, as edgemm's export stage does, with module paths carried over."""
    import onnxslim

    from edgemm.zoo import build, get, make_data

    torch.manual_seed(0)
    model = build(name, pretrained=False)
    card = get(name)
    data = make_data(name, "calib", 2)
    args = tuple(torch.from_numpy(data[k]) for k in card.input_names)
    raw_path = folder / f"{name}-raw.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, args, str(raw_path), input_names=list(card.input_names),
                          output_names=list(card.outputs), dynamic_shapes={k: {0: "batch"} for k in card.input_names},
                          dynamo=True, external_data=False, verbose=False)
    raw = onnx.load(str(raw_path))
    slim = onnxslim.slim(raw)
    bare = folder / f"{name}-bare.onnx"
    onnx.save(slim, str(bare))               # what onnxslim leaves: no module paths
    carry_node_metadata(raw, slim)
    path = folder / f"{name}.onnx"
    onnx.save(slim, str(path))
    return {"path": path, "bare": bare, "calib": {k: v for k, v in make_data(name, "calib", 24).items()
                                                   if k in card.input_names}}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    folder = tmp_path_factory.mktemp("zoo")
    return {name: _export_zoo(name, folder) for name in ZOO}


def _compute(bmap, branch):
    return set(bmap.nodes(branch, compute_only=True))


def test_module_paths_survive_slim_only_when_carried(zoo):
    with_paths = node_module_paths(onnx.load(str(zoo["dual-encoder"]["path"])))
    bare = node_module_paths(onnx.load(str(zoo["dual-encoder"]["bare"])))
    assert any(p and p.startswith("text_blocks.0") for p in with_paths.values())
    assert all(p is None for p in bare.values())


def test_dual_encoder_branches(zoo):
    bmap = find_branches(zoo["dual-encoder"]["path"])
    assert bmap.input_modality == {"image": "vision", "input_ids": "text"}
    assert bmap.present() == ["vision", "text", "fusion"]
    summary = bmap.summary()["branches"]
    assert {"patches", "image_blocks", "image_proj"} <= set(summary["vision"]["modules"])
    assert {"tokens", "text_blocks", "text_proj"} <= set(summary["text"]["modules"])
    for node in _compute(bmap, "vision"):
        assert bmap.module_of[node].startswith(("patches", "image_")), node
    for node in _compute(bmap, "text"):
        assert bmap.module_of[node].startswith(("tokens", "text_")), node
    # image @ text.T (the similarity logits) reads both towers.
    assert [bmap.op_of[n] for n in _compute(bmap, "fusion")] == ["MatMul"]


def test_cross_attention_blocks_are_fusion(zoo):
    bmap = find_branches(zoo["cross-attention"]["path"])
    fusion_modules = {bmap.module_of[n].split(".")[0] for n in _compute(bmap, "fusion")}
    assert fusion_modules == {"cross_blocks", "head"}
    assert {bmap.module_of[n].split(".")[0] for n in _compute(bmap, "text")} == {"question_block"}
    assert {bmap.module_of[n].split(".")[0] for n in _compute(bmap, "vision")} == {"patches", "image_blocks"}


def test_early_fusion_audio_image_and_classifier(zoo):
    bmap = find_branches(zoo["early-fusion"]["path"])
    assert bmap.input_modality == {"image": "vision", "audio": "audio"}
    assert bmap.summary()["branches"]["audio"]["modules"] == ["audio_tower"]
    assert bmap.summary()["branches"]["vision"]["modules"] == ["image_tower"]
    assert {bmap.module_of[n] for n in _compute(bmap, "fusion")} == {"classifier.0", "classifier.2"}


def test_data_flow_alone_separates_the_towers(zoo):
    """Without module paths (other exporters, hand-made ONNX) the towers still come apart."""
    with_paths = find_branches(zoo["dual-encoder"]["path"])
    bare = find_branches(zoo["dual-encoder"]["bare"])
    assert bare.source == "data flow"
    for branch in ("vision", "text", "fusion"):
        assert _compute(bare, branch) == _compute(with_paths, branch)


def test_overrides_move_modules_and_typos_fail(zoo):
    path = zoo["dual-encoder"]["path"]
    bmap = find_branches(path, overrides=parse_branch_overrides(["fusion=text_proj", "fusion=image_proj.*"]))
    moved = {bmap.module_of[n] for n in _compute(bmap, "fusion")}
    assert {"text_proj", "image_proj"} <= moved
    assert all(not bmap.module_of[n].startswith(("text_proj", "image_proj")) for n in _compute(bmap, "text"))
    with pytest.raises(InputError, match="text_encodr.*matches no module") as err:
        find_branches(path, overrides={"text": ["text_encodr.*"]})
    assert "image_blocks" in str(err.value)   # the fix lists the real top-level modules
    # Node names work too (globs), which is what graphs without module paths offer.
    gemms = [n.name for n in onnx.load(str(zoo["dual-encoder"]["bare"])).graph.node if n.op_type == "Gemm"]
    bare = find_branches(zoo["dual-encoder"]["bare"], overrides={"fusion": [gemms[0][:-1] + "?", gemms[1]]})
    assert set(gemms) <= _compute(bare, "fusion")


# --- builds -------------------------------------------------------------------------------------------

def _run(path, feeds):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))


def test_cpu_policy_quantizes_only_the_int8_branch(zoo, tmp_path):
    case = zoo["dual-encoder"]
    out = tmp_path / "mixed.onnx"
    result = apply_mixed(case["path"], out, "vision=int8,text=fp16,fusion=fp32", case["calib"], "onnxruntime",
                         target="cpu")
    table = result.recipe["branches"]
    assert result.mode == "mixed:fp32+int8"
    assert table["text"] == {**table["text"], "requested": "fp16", "precision": "fp32", "quantized_nodes": 0}
    assert any("fp16 runs as fp32" in n for n in result.notes)
    assert 0 < table["vision"]["quantized_nodes"] <= table["vision"]["compute_nodes"]
    # The built graph: vision MatMuls became integer ops, text MatMuls are still float.
    bmap = find_branches(case["path"])
    source = onnx.load(str(case["path"]))
    weights = {t.name for t in source.graph.initializer}
    weighted = {n.name for n in source.graph.node if n.op_type == "MatMul" and n.input[1] in weights}
    names = {n.name: n.op_type for n in onnx.load(str(out)).graph.node}
    text_mm = [n for n in _compute(bmap, "text") if n in weighted]
    vision_mm = [n for n in _compute(bmap, "vision") if n in weighted]   # attention's x @ x stays float
    assert text_mm and all(names.get(n) == "MatMul" for n in text_mm)
    assert vision_mm and not any(names.get(n) == "MatMul" for n in vision_mm)
    # Text untouched: its embeddings equal FP32's; the vision tower moved.
    ref, got = _run(case["path"], case["calib"]), _run(out, case["calib"])
    np.testing.assert_allclose(got["text_embeds"], ref["text_embeds"], atol=1e-5)
    assert not np.allclose(got["image_embeds"], ref["image_embeds"], atol=1e-5)


@pytest.mark.parametrize("name", ZOO)
def test_per_branch_policy_on_every_zoo_model(zoo, tmp_path, name):
    case = zoo[name]
    result = apply_mixed(case["path"], tmp_path / f"{name}.onnx", "default=int8,fusion=fp32", case["calib"],
                         "onnxruntime")
    table = result.recipe["branches"]
    assert table["fusion"]["precision"] == "fp32" and table["fusion"]["quantized_nodes"] == 0
    towers = [b for b in table if b != "fusion"]
    assert len(towers) == 2 and all(table[b]["precision"] == "int8" for b in towers)
    assert sum(table[b]["quantized_nodes"] for b in towers) > 0
    outs = _run(result.path, case["calib"])
    assert all(np.isfinite(v).all() for v in outs.values())


def test_tensorrt_policy_places_qdq_only_in_the_quantized_branch(zoo, tmp_path):
    pytest.importorskip("modelopt.onnx.quantization")
    from edgemm.quant.modelopt_qdq import inspect_qdq

    case = zoo["cross-attention"]
    out = tmp_path / "trt.onnx"
    result = apply_mixed(case["path"], out, "vision=int8,text=fp16,fusion=fp16", case["calib"], "tensorrt",
                         target="jetson-orin-nx")
    table = result.recipe["branches"]
    assert table["vision"]["quantized_nodes"] > 0
    assert table["text"]["quantized_nodes"] == 0 and table["fusion"]["quantized_nodes"] == 0
    assert result.recipe["high_precision_dtype"] == "fp16"
    model = onnx.load(str(out))
    assert set(inspect_qdq(model)["quantized_dtypes"]) == {"INT8"}
    assert TensorProto.FLOAT16 in {t.data_type for t in model.graph.initializer}   # the fp16 branches


@pytest.mark.parametrize("policy,backend,target,match", [
    ("audio=int8", "onnxruntime", "cpu", "no audio branch"),
    ("vision=fp8", "onnxruntime", "cpu", "does not support fp8"),
    ("vision=int8,text=fp8", "tensorrt", "h100", "int8 and fp8"),
    ("vision=bf16", "onnxruntime", "cpu", "does not support bf16"),
])
def test_refusals(zoo, tmp_path, policy, backend, target, match):
    case = zoo["dual-encoder"]
    with pytest.raises(InputError, match=match):
        apply_mixed(case["path"], tmp_path / "x.onnx", policy, case["calib"], backend, target=target)
    assert not (tmp_path / "x.onnx").exists()


def test_int8_branch_without_calibration_is_refused(zoo, tmp_path):
    with pytest.raises(InputError, match="calibration"):
        apply_mixed(zoo["dual-encoder"]["path"], tmp_path / "x.onnx", "vision=int8", None, "onnxruntime")


@pytest.mark.parametrize("rnn", ["LSTM", "GRU", "RNN"])
def test_a_recurrent_text_tower_is_a_branch(rnn):
    """Embedding + LSTM/GRU text tower (no MatMul in it) beside a conv image tower: text is a branch that
    --precision can name (it was reported as absent: 'the model has no text branch')."""
    h = onnx.helper
    gates = {"LSTM": 4, "GRU": 3, "RNN": 1}[rnn]
    inits = [onnx.numpy_helper.from_array(np.zeros(shape, np.float32), name) for name, shape in (
        ("table", (10, 4)), ("W", (1, gates * 4, 4)), ("R", (1, gates * 4, 4)), ("k", (4, 3, 1, 1)),
        ("head", (8, 2)))]
    nodes = [h.make_node("Gather", ["table", "input_ids"], ["tok"], name="embed"),
             h.make_node("Transpose", ["tok"], ["seq"], perm=[1, 0, 2], name="to_seq"),
             h.make_node(rnn, ["seq", "W", "R"], ["all", "last"], hidden_size=4, name="text_rnn"),
             h.make_node("Squeeze", ["last"], ["text"], name="text_vec"),
             h.make_node("Conv", ["image", "k"], ["fmap"], name="image_conv"),
             h.make_node("ReduceMean", ["fmap"], ["pooled"], axes=[2, 3], keepdims=0, name="image_pool"),
             h.make_node("Concat", ["pooled", "text"], ["both"], axis=1, name="join"),
             h.make_node("MatMul", ["both", "head"], ["logits"], name="classifier")]
    graph = h.make_graph(nodes, "g", [h.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", 5]),
                                       h.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 8, 8])],
                         [h.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 2])], inits)
    branches = find_branches(h.make_model(graph))
    assert branches.present() == ["vision", "text", "fusion"]
    assert branches.nodes("text", compute_only=True) == ["text_rnn"]


def test_a_policy_branch_the_inputs_rule_out_is_refused_before_the_export(tiny, tmp_path, monkeypatch):
    """--precision audio=int8 on an image + text model was refused only after the export (and, with
    --split, the graph cut): the input specs already tell there is no audio branch."""
    import edgemm.export
    from edgemm.config import CompileConfig
    from edgemm.pipeline import compile_model

    def no_export(*a, **k):
        raise AssertionError("the export ran before the policy was checked")

    monkeypatch.setattr(edgemm.export, "export_onnx", no_export)
    for split in (False, True):
        cfg = CompileConfig(model=str(tiny["pt2"]), output=str(tmp_path / f"b{split}"), calib=str(tiny["calib"]),
                            precision_policy="vision=int8,audio=int8", split=split)
        with pytest.raises(InputError) as err:
            compile_model(cfg, say=lambda m: None)
        assert str(err.value) == ("--precision: the model has no audio branch (its inputs: vision: image; text: "
                                  "input_ids) (fix: name only branches the model has (vision, text, fusion), or "
                                  "assign nodes with --branch audio=MODULE_PATTERN)")
        assert not (tmp_path / f"b{split}").exists()


def test_the_early_branch_check_waits_for_the_graph_when_the_inputs_do_not_tell():
    from edgemm.iospec import TensorSpec
    from edgemm.quant.mixed import check_policy_branches

    known = [TensorSpec("image", "float32", ("batch", 3, 8, 8)), TensorSpec("attention_mask", "int64", ("batch", 4)),
             TensorSpec("input_ids", "int64", ("batch", 4))]
    check_policy_branches("vision=int8,text=fp32,fusion=fp32", known)
    with pytest.raises(InputError, match="no audio branch"):
        check_policy_branches("audio=int8", known)
    check_policy_branches("audio=int8", known, overrides=["audio=encoder.*"])   # --branch may make one
    unknown = known + [TensorSpec("x", "float32", ("batch", 8))]                # modules may label x
    check_policy_branches("audio=int8", unknown)
