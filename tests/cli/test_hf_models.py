"""Stock Hugging Face models and torch.nn attention towers, saved the way their authors save them:
as factories, keyword- and positionally-exported .pt2, TorchScript; small random-init configs."""

import json

import pytest

from tests.fixtures import io_models

F = io_models.FACTORY


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return io_models.save("clip", tmp_path_factory.mktemp("clip"), formats=("pt2_kw", "pt2_pos"))


def _compile_verify(cli, model, saved, out, *extra):
    r = cli("compile", model, "--calib", saved["calib"], "-o", out, "--force", "--no-thread-tuning", *extra)
    assert r.returncode == 0, r.stdout + r.stderr
    v = cli("verify", out, "--reference", model, "--data", saved["eval"])
    assert v.returncode == 0, v.stdout + v.stderr
    return json.loads((out / "manifest.json").read_text())


CLIP_OUTPUTS = ["logits_per_image", "logits_per_text", "text_embeds", "image_embeds",
                "text_model_output.last_hidden_state", "text_model_output.pooler_output",
                "vision_model_output.last_hidden_state", "vision_model_output.pooler_output"]


@pytest.mark.slow  # 40-150 s on the shared 2-core host
def test_clip_factory_int8(cli, clip, tmp_path):
    """CLIPModel.forward has optional inputs, flags and **kwargs: the data's keys are the inputs."""
    # the recipe is pinned: which recipe the timed search picks varies with the load (quant-gate owns that)
    manifest = _compile_verify(cli, f"{F}:clip", clip, tmp_path / "b", "--int8", "--int8-recipe", "dynamic_per_channel")
    assert [i["name"] for i in manifest["inputs"]] == ["input_ids", "pixel_values", "attention_mask"]
    assert [o["name"] for o in manifest["outputs"]] == CLIP_OUTPUTS
    shapes = {o["name"]: o["shape"] for o in manifest["outputs"]}
    assert shapes["logits_per_image"] == ["batch", "batch"] and shapes["image_embeds"] == ["batch", 16]


@pytest.mark.slow  # 40-150 s on the shared 2-core host
@pytest.mark.parametrize("fmt", ["pt2_kw", "pt2_pos"])
def test_clip_pt2(cli, clip, tmp_path, fmt):
    """A .pt2 returning CLIPOutput loads (its pytree type comes from transformers, allow-listed), and a
    keyword-exported one is called with keywords."""
    manifest = _compile_verify(cli, clip[fmt], clip, tmp_path / "b")
    assert [o["name"] for o in manifest["outputs"]] == CLIP_OUTPUTS
    assert manifest["inputs"][0]["shape"] == ["batch", 7]


def test_pt2_naming_an_unknown_pytree_type_is_refused_in_one_line(cli, clip, tmp_path):
    import zipfile

    bad = tmp_path / "bad.pt2"
    with zipfile.ZipFile(clip["pt2_kw"]) as src, zipfile.ZipFile(bad, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("models/model.json"):
                data = data.replace(b"transformers.models.clip.modeling_clip.CLIPOutput", b"evil.payload.Output")
            dst.writestr(info, data)
    r = cli("compile", bad, "--calib", clip["calib"], "-o", tmp_path / "b")
    assert r.returncode == 2 and "evil.payload.Output" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.slow  # 40-150 s on the shared 2-core host
def test_vilt_factory_inputs_accepted_and_torch_limit_named(cli, tmp_path):
    """ViltForQuestionAnswering's optional parameters are not required inputs; torch cannot export its
    patch sampling (data-dependent multinomial), and the one-line error says so and what to do."""
    saved = io_models.save("vilt", tmp_path / "m", formats=())
    r = cli("compile", f"{F}:vilt", "--calib", saved["calib"], "-o", tmp_path / "b")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert "exporting to ONNX" in r.stdout  # past the inputs: the signature was read right
    assert "data-dependent" in r.stderr and "fix:" in r.stderr


@pytest.fixture(scope="module")
def attention(tmp_path_factory):
    return io_models.save("attention_fusion", tmp_path_factory.mktemp("attn"), formats=("pt2_pos", "torchscript"))


@pytest.mark.slow  # 40-150 s on the shared 2-core host (the default tier: tests/cli/test_torchscript_fastpath.py)
def test_cross_attention_torchscript_compiles_and_verifies(cli, attention, tmp_path):
    """The archive's nn.TransformerEncoder fast path exports (edgemm/onnx_fastpath.py), and so does its
    cross-attention nn.MultiheadAttention on torch's slow path, whose traced unflatten torch's own
    TorchScript exporter loses the rank of ("transpose for tensor of unknown rank"; onnx_fastpath._unflatten
    restores it): the archive compiles and matches itself on held-out data."""
    import torch

    assert "aten::_transformer_encoder_layer_fwd" in str(torch.jit.load(attention["torchscript"]).inlined_graph)
    _compile_verify(cli, attention["torchscript"], attention, tmp_path / "b")


@pytest.mark.slow  # 40-150 s on the shared 2-core host
def test_transformer_encoder_and_mha_as_pt2_and_factory_int8(cli, attention, tmp_path):
    _compile_verify(cli, attention["pt2_pos"], attention, tmp_path / "p", "--int8")
    _compile_verify(cli, f"{F}:attention_fusion", attention, tmp_path / "f", "--int8")
