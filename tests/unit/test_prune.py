"""Structured pruning, 2:4 sparsity and recovery (edgemm.prune) on small toy models."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torch_pruning")
from torch import nn  # noqa: E402

from edgemm import targets  # noqa: E402
from edgemm.errors import InputError  # noqa: E402
from edgemm.frontends.base import LoadedModel  # noqa: E402
from edgemm.prune import (apply_2to4, can_prune, check_sparsity_target, find_branches, is_two_four,  # noqa: E402
                          keep_count, parse_prune_spec, prunable_module, prune, recover, with_pruned_module)
from edgemm.prune.spec import ratios_for  # noqa: E402
from edgemm.prune.sparsity import two_four_mask  # noqa: E402
from edgemm.zoo import layers  # noqa: E402


class ToyFused(nn.Module):
    """Image conv tower + text transformer block, joined by torch.cat into a fusion MLP."""

    def __init__(self):
        super().__init__()
        self.image_tower = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                         nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.tokens = nn.Embedding(50, 32)
        self.text_block = layers.Block(32, 4)
        self.fusion = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 5))

    def forward(self, image, input_ids):
        img = self.image_tower(image).mean(dim=(2, 3))
        txt = self.text_block(self.tokens(input_ids)).mean(dim=1)
        return self.fusion(torch.cat([img, txt], dim=-1))


def toy_data(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"image": rng.standard_normal((n, 3, 8, 8)).astype(np.float32),
            "input_ids": rng.integers(1, 50, size=(n, 6)).astype(np.int64)}


def toy_model(seed: int = 0) -> ToyFused:
    torch.manual_seed(seed)
    model = ToyFused()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so removed channels matter
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def run(model, feeds):
    with torch.no_grad():
        return model(*(torch.from_numpy(feeds[k]) for k in ("image", "input_ids")))


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def pruned_toy():
    model = toy_model()
    calib = toy_data(48)
    pruned, report = prune(model, toy_data(4, seed=1), calib, {"*": 0.5})
    return model, pruned, report


# -- spec -------------------------------------------------------------------------------------------

def test_parse_prune_spec_forms():
    assert parse_prune_spec("0.3") == {"*": 0.3}
    assert parse_prune_spec(" vision=0.3, text=0.2 ") == {"vision": 0.3, "text": 0.2}
    assert parse_prune_spec("*=0.1,fusion=0") == {"*": 0.1, "fusion": 0.0}


@pytest.mark.parametrize("text", ["", "abc", "1.5", "-0.1", "nan", "vision=", "=0.3", "vision=0.3,vision=0.2",
                                  "vision=x", "vis ion=0.3", "vision=0.3,"])
def test_parse_prune_spec_rejects(text):
    with pytest.raises(InputError) as info:
        parse_prune_spec(text)
    assert "--prune" in str(info.value) and "\n" not in str(info.value)


def test_ratios_for_unknown_branch_names_the_found_ones():
    assert ratios_for({"*": 0.2, "text": 0.4}, ["vision", "text"]) == {"vision": 0.2, "text": 0.4}
    with pytest.raises(InputError, match=r"no 'audio' branch \(found: vision, text\)"):
        ratios_for({"audio": 0.3}, ["vision", "text"])


def test_keep_count_rounds_wide_layers_and_keeps_one():
    assert keep_count(128, 0.3) == 88
    assert keep_count(4, 0.3) == 3
    assert keep_count(10, 0.0) == 10
    assert keep_count(2, 0.9) == 1


def test_keep_count_removes_at_least_the_ratio_in_aligned_widths():
    # Rounding to the nearest multiple of 8 would keep 48 of 64 (25% pruned for --prune 0.3).
    for channels in (16, 24, 48, 64, 100, 128, 384, 1536):
        for ratio in (0.1, 0.3, 0.5):
            keep = keep_count(channels, ratio)
            assert keep % 8 == 0 and 8 <= keep < channels
            assert 1 - keep / channels >= ratio - 0.5 / channels, (channels, ratio, keep)
    assert keep_count(64, 0.3) == 40
    assert keep_count(24, 0.3) == 16


# -- branches ---------------------------------------------------------------------------------------

def test_find_branches_on_toy_fused_model():
    branches = find_branches(toy_model(), ["image", "input_ids"], toy_data(4))
    assert branches == {"vision": ["image_tower"], "text": ["text_block", "tokens"], "fusion": ["fusion"]}


def test_find_branches_names_branches_from_modules_when_inputs_do_not_say():
    class Anonymous(nn.Module):
        def __init__(self):
            super().__init__()
            self.audio_encoder = nn.Linear(8, 4)
            self.image_encoder = nn.Linear(6, 4)
            self.head = nn.Linear(8, 2)

        def forward(self, x, y):
            return self.head(torch.cat([self.audio_encoder(x), self.image_encoder(y)], dim=-1))

    feeds = {"x": np.ones((3, 8), np.float32), "y": np.ones((3, 6), np.float32)}
    assert find_branches(Anonymous(), ["x", "y"], feeds) == {
        "vision": ["image_encoder"], "audio": ["audio_encoder"], "fusion": ["head"]}


# -- structured pruning -----------------------------------------------------------------------------

def test_prune_makes_a_smaller_model_with_the_same_interface(pruned_toy):
    model, pruned, report = pruned_toy
    assert n_params(pruned) < n_params(model)
    assert report["total"]["params_after"] == n_params(pruned)
    assert report["total"]["flops_after"] < report["total"]["flops_before"]
    for batch in (1, 7):
        feeds = toy_data(batch, seed=3)
        assert run(pruned, feeds).shape == run(model, feeds).shape == (batch, 5)
    # whole heads removed from the attention module, and its head count follows
    assert pruned.text_block.attn.heads == 2 and model.text_block.attn.heads == 4
    assert pruned.text_block.attn.query.out_features == 16
    assert pruned.text_block.mlp[0].out_features < 64
    # conv channels removed across conv -> BatchNorm -> conv, and across the fusion concat
    convs = pruned.image_tower
    assert convs[3].out_channels < 32 and convs[4].num_features == convs[3].out_channels
    # the text residual width (embedding -> block -> mean) narrows too, and the concat follows both
    width = pruned.tokens.embedding_dim
    assert width < 32 and pruned.text_block.norm_attn.normalized_shape == (width,)
    assert pruned.fusion[0].in_features == pruned.image_tower[3].out_channels + pruned.tokens.embedding_dim
    # the original is untouched
    assert model.image_tower[3].out_channels == 32 and n_params(model) == n_params(toy_model())


def test_prune_report_per_branch(pruned_toy):
    _, _, report = pruned_toy
    assert set(report["branches"]) == {"vision", "text", "fusion"}
    for branch in report["branches"].values():
        assert branch["params_after"] < branch["params_before"]
        assert branch["flops_after"] <= branch["flops_before"]
    assert report["branches"]["text"]["heads_removed"] == 2
    assert report["check"]["max_abs_diff_vs_masked"] < 1e-4


def test_prune_only_the_named_branch():
    model = toy_model()
    pruned, report = prune(model, toy_data(4), toy_data(32), {"vision": 0.5})
    assert pruned.image_tower[0].out_channels < 16
    assert pruned.text_block.attn.heads == 4 and pruned.text_block.mlp[0].out_features == 64
    assert pruned.fusion[0].out_features == 48
    assert report["branches"]["text"]["params_after"] == report["branches"]["text"]["params_before"]


def test_prune_uses_calibration_activations():
    """A channel that carries no signal on the calibration data goes first, whatever its weights."""
    model = toy_model()
    with torch.no_grad():
        model.fusion[0].weight[7].mul_(50.0)  # large weights...
        model.fusion[0].bias[7] = -1e4        # ...but ReLU zeroes it on every input
    pruned, _ = prune(model, toy_data(4), toy_data(32), {"fusion": 0.1})
    kept = pruned.fusion[0].weight
    assert kept.shape[0] == keep_count(48, 0.1) < 48
    assert not any(torch.allclose(row, model.fusion[0].weight[7]) for row in kept)


def test_onnx_export_of_pruned_model_is_smaller(pruned_toy, tmp_path):
    model, pruned, _ = pruned_toy
    feeds = toy_data(2)
    args = tuple(torch.from_numpy(feeds[k]) for k in ("image", "input_ids"))
    sizes = {}
    for label, m in (("full", model), ("pruned", pruned)):
        path = tmp_path / f"{label}.onnx"
        torch.onnx.export(m, args, str(path), input_names=["image", "input_ids"], dynamo=False)
        sizes[label] = path.stat().st_size
    assert sizes["pruned"] < 0.8 * sizes["full"]
    ort = pytest.importorskip("onnxruntime")
    sess = ort.InferenceSession(str(tmp_path / "pruned.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, feeds)[0], run(pruned, feeds).numpy(), rtol=1e-4, atol=1e-5)


class BertLikeAttention(nn.Module):
    """HF BERT layout: q/k/v here, the output projection in the parent; sizes read from attributes."""

    def __init__(self, dim=32, heads=4, honest=True):
        super().__init__()
        self.num_attention_heads, self.attention_head_size = heads, dim // heads
        self.all_head_size = dim
        self.honest = honest
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x):
        heads = self.num_attention_heads if self.honest else 4  # dishonest: a baked-in constant
        size = self.all_head_size if self.honest else 32

        def split(t):
            return t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)
        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        ctx = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.attention_head_size), -1) @ v
        return ctx.transpose(1, 2).reshape(x.shape[0], x.shape[1], size)


class BertLikeLayer(nn.Module):
    def __init__(self, honest=True):
        super().__init__()
        self.attention = BertLikeAttention(honest=honest)
        self.attention_output = nn.Linear(32, 32)
        self.norm = nn.LayerNorm(32)

    def forward(self, text):
        return self.norm(text + self.attention_output(self.attention(text))).mean(dim=1)


def test_heads_pruned_when_output_projection_is_a_sibling():
    torch.manual_seed(0)
    model = BertLikeLayer().eval()
    feeds = {"text": np.random.default_rng(0).standard_normal((16, 5, 32)).astype(np.float32)}
    pruned, report = prune(model, {"text": feeds["text"][:4]}, feeds, {"*": 0.5})
    assert pruned.attention.num_attention_heads == 2 and pruned.attention.all_head_size == 16
    assert pruned.attention_output.in_features == 16
    assert report["attention"][0]["layout"] == "separate" and not report["notes"]


def test_shared_residual_stream_follows_the_least_pruned_branch():
    """In cross-attention fusion the text stream continues through the fusion blocks: pruning only
    the text branch narrows its MLPs and heads but keeps the shared width."""
    from edgemm import zoo

    name = "cross-attention"
    model = zoo.build(name, pretrained=False)
    feeds = zoo.make_data(name, "calib", 24)
    pruned, report = prune(model, {k: v[:4] for k, v in feeds.items()}, feeds, {"text": 0.5})
    assert pruned.question_block.mlp[0].out_features < model.question_block.mlp[0].out_features
    assert pruned.tokens.token.embedding_dim == model.tokens.token.embedding_dim
    assert pruned.cross_blocks[0].mlp[0].out_features == model.cross_blocks[0].mlp[0].out_features
    assert report["branches"]["fusion"]["params_after"] == report["branches"]["fusion"]["params_before"]
    both, _ = prune(model, {k: v[:4] for k, v in feeds.items()}, feeds, {"text": 0.5, "fusion": 0.5})
    assert both.tokens.token.embedding_dim < model.tokens.token.embedding_dim


class TimmLikeAttention(nn.Module):
    """timm ViT layout: one fused qkv projection, reshaped with the num_heads attribute."""

    def __init__(self, dim=32, num_heads=4):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, text):
        b, n, _ = text.shape
        q, k, v = self.qkv(text).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        ctx = torch.softmax(q @ k.transpose(-1, -2) * self.head_dim ** -0.5, dim=-1) @ v
        return self.proj(ctx.transpose(1, 2).reshape(b, n, -1)).mean(dim=1)


def test_heads_pruned_in_a_fused_qkv_projection():
    torch.manual_seed(0)
    model = TimmLikeAttention().eval()
    feeds = {"text": np.random.default_rng(0).standard_normal((16, 5, 32)).astype(np.float32)}
    pruned, report = prune(model, {"text": feeds["text"][:4]}, feeds, {"*": 0.5})
    assert pruned.num_heads == 2 and pruned.qkv.out_features == 48 and pruned.proj.in_features == 16
    assert report["attention"][0]["layout"] == "qkv_fused" and not report["notes"]


def test_heads_kept_when_forward_ignores_the_head_attribute():
    """The equivalence check notices that head removal broke the model and falls back to channels only."""
    torch.manual_seed(0)
    model = BertLikeLayer(honest=False).eval()
    feeds = {"text": np.random.default_rng(0).standard_normal((16, 5, 32)).astype(np.float32)}
    pruned, report = prune(model, {"text": feeds["text"][:4]}, feeds, {"*": 0.5})
    assert pruned.attention.query.out_features == 32
    assert report["notes"] and "heads kept" in report["notes"][0]
    out = pruned(torch.from_numpy(feeds["text"]))
    assert out.shape == (16, 32)


# -- formats ----------------------------------------------------------------------------------------

def test_can_prune_refuses_torchscript_and_onnx_in_one_line():
    scripted = LoadedModel(source="m.pt", format="torchscript", sha256="", name="m", module=object())
    with pytest.raises(InputError) as info:
        can_prune(scripted)
    assert "TorchScript models cannot be pruned (fix: pass the .pt2 or package.module:function with --weights)" \
        in str(info.value)
    assert "\n" not in str(info.value)
    with pytest.raises(InputError, match="ONNX models cannot be pruned"):
        can_prune(LoadedModel(source="m.onnx", format="onnx", sha256="", name="m"))
    can_prune(LoadedModel(source="pkg.mod:fn", format="factory", sha256="", name="fn", module=toy_model()))


def _toy_program(tmp_path):
    """toy_model() saved as a .pt2 with a dynamic batch, and loaded back as edgemm loads it."""
    from edgemm.frontends import load_model

    feeds = toy_data(4)
    args = tuple(torch.from_numpy(feeds[k]) for k in ("image", "input_ids"))
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(toy_model(), args, dynamic_shapes={"image": {0: batch}, "input_ids": {0: batch}})
    torch.export.save(program, tmp_path / "toy.pt2")
    return program, load_model(str(tmp_path / "toy.pt2"))


def test_exported_program_is_pruned_and_exported_again(tmp_path):
    program, loaded = _toy_program(tmp_path)
    feeds = toy_data(4)
    module = prunable_module(loaded)
    pruned, report = prune(module, feeds, toy_data(32), {"vision": 0.5}, input_names=loaded.input_names)
    assert report["total"]["params_after"] < report["total"]["params_before"]
    new = with_pruned_module(loaded, pruned, feeds)
    out = new.module(*(torch.from_numpy(v) for v in toy_data(7).values()))
    assert out.shape == (7, 5)
    assert sum(p.numel() for p in new.exported_program.parameters()) < sum(p.numel() for p in program.parameters())


def test_exported_program_heads_are_pruned_through_its_reshapes(tmp_path):
    """A .pt2 has no head-count attribute: the head count is read from, and rewritten in, the literal
    shapes of the program's reshapes; the pruned program is exported again and runs at any batch."""
    from edgemm.prune.heads import find_attention

    _, loaded = _toy_program(tmp_path)
    feeds = toy_data(4)
    module = prunable_module(loaded)
    sites = find_attention(module)
    assert [(s.path, s.heads) for s in sites] == [("text_block.attn", 4)]
    pruned, report = prune(module, feeds, toy_data(32), {"text": 0.5}, input_names=loaded.input_names)
    assert report["branches"]["text"]["heads_removed"] == 2 and not report["notes"]
    assert [(s.path, s.heads) for s in find_attention(pruned)] == [("text_block.attn", 2)]
    new = with_pruned_module(loaded, pruned, feeds)
    out = new.module(*(torch.from_numpy(v) for v in toy_data(7).values()))
    assert out.shape == (7, 5)


# -- 2:4 sparsity -----------------------------------------------------------------------------------

def test_two_four_mask_pattern_on_linear_and_conv():
    torch.manual_seed(0)
    for shape in ((16, 32), (8, 16, 3, 3), (8, 16, 5)):
        keep = two_four_mask(torch.randn(shape).abs())
        groups = keep.movedim(1, -1).reshape(-1, 4)
        assert (groups.sum(dim=1) == 2).all(), shape


def test_apply_2to4_sparsifies_eligible_layers_only():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 3)).eval()
    calib = {"input": np.random.default_rng(0).standard_normal((20, 16)).astype(np.float32)}
    before = [m.weight.detach().clone() for m in model if isinstance(m, nn.Linear)]
    report = apply_2to4(model, calib)
    assert report["layers"] == ["0", "2"] and "4" in report["dense_layers"]
    for idx in (0, 2):
        assert is_two_four(model[idx].weight)
    assert torch.equal(model[4].weight, before[2])  # 3x24 is below TensorRT's sparse-kernel shapes
    assert report["manifest"]["pattern"] == "2:4"


def test_apply_2to4_keeps_weights_reading_strong_inputs():
    layer = nn.Linear(16, 8)
    with torch.no_grad():
        layer.weight.fill_(1.0)
        layer.weight[:, 0::4] = 0.1   # small weights on channels 0, 4, 8, 12 ...
    model = nn.Sequential(layer).eval()
    x = np.ones((32, 16), np.float32)
    x[:, 0::4] = 100.0               # ... that read by far the strongest inputs
    apply_2to4(model, {"input": x})
    assert (layer.weight[:, 0::4] != 0).all()


def test_check_sparsity_target_refusals():
    check_sparsity_target(targets.load("jetson-orin-nano"), "2:4")
    with pytest.raises(InputError, match="CPU, which has no sparse kernels") as info:
        check_sparsity_target(targets.load("cpu"), "2:4")
    assert "--sparsity" in str(info.value)
    no_sparse = replace(targets.load("l4"), name="old-gpu", sparse_tensor_cores=False)
    with pytest.raises(InputError, match="old-gpu has no sparse tensor cores"):
        check_sparsity_target(no_sparse, "2:4")
    with pytest.raises(InputError, match="unknown sparsity pattern"):
        check_sparsity_target(targets.load("l4"), "1:2")


# -- recovery ---------------------------------------------------------------------------------------

def test_recover_reduces_the_distillation_loss(pruned_toy):
    import copy

    model, pruned, _ = pruned_toy
    student = copy.deepcopy(pruned)
    result = recover(student, model, toy_data(64, seed=5), 30, lr=3e-3, progress=False)
    assert result["loss_after"] < 0.7 * result["loss_before"]
    assert not student.training
    # hidden states matched too: same-shape outputs, and the narrowed text stream on its kept channels
    assert {"fusion", "text_block", "tokens"} <= set(result["hidden_states"])
    assert "image_tower" not in result["hidden_states"]  # conv channels narrowed on axis 1: not matched


def test_recover_keeps_sparse_zeros():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8)).eval()
    student = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8)).eval()
    calib = {"input": np.random.default_rng(0).standard_normal((32, 16)).astype(np.float32)}
    apply_2to4(student, calib)
    recover(student, teacher, calib, 10, lr=1e-2, progress=False, keep_zeros=True)
    assert is_two_four(student[0].weight)


def test_recover_augmentation_keeps_each_modality_paired():
    from edgemm.prune.augment import modality_groups, pick

    groups = modality_groups(["input_ids", "attention_mask", "pixel_values"])
    assert groups == [["input_ids", "attention_mask"], ["pixel_values"]]
    picks = pick(np.random.default_rng(0), 50, 16, groups)
    assert torch.equal(picks["input_ids"], picks["attention_mask"])
    assert torch.equal(picks["input_ids"][:8], picks["pixel_values"][:8])       # real pairs
    assert not torch.equal(picks["input_ids"][8:], picks["pixel_values"][8:])   # cross-paired half


def test_recover_rejects_bad_steps(pruned_toy):
    model, pruned, _ = pruned_toy
    with pytest.raises(InputError, match="--recover"):
        recover(pruned, model, toy_data(8), 0, progress=False)
