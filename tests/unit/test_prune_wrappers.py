"""Pruning on model shapes met in the wild: a CLIP-style model wrapped in another module, PyTorch's own
nn.TransformerEncoder with a padding mask (its eval fast path returns nested tensors), dict outputs."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torch_pruning")
from torch import nn  # noqa: E402

from edgemm.prune import find_branches, prune  # noqa: E402
from edgemm.prune.compare import compare  # noqa: E402


class TwoTower(nn.Module):
    """The fusion (a similarity) happens in forward(), not in a submodule, as in CLIPModel."""

    def __init__(self):
        super().__init__()
        self.vision = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                    nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 16))
        self.text = nn.Sequential(nn.Embedding(30, 16), nn.Flatten(), nn.Linear(16 * 6, 64), nn.ReLU(),
                                  nn.Linear(64, 16))

    def forward(self, image, input_ids):
        img = nn.functional.normalize(self.vision(image), dim=-1)
        txt = nn.functional.normalize(self.text(input_ids), dim=-1)
        return {"image_embeds": img, "text_embeds": txt, "logits_per_image": img @ txt.t()}


class Wrapper(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = TwoTower()

    def forward(self, image, input_ids):
        return self.inner(image, input_ids)


class EncoderWithPadding(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(30, 32)
        layer = nn.TransformerEncoderLayer(32, 4, 64, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True)
        self.image = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(48, 5)

    def forward(self, image, input_ids):
        pad = input_ids == 0
        x = self.encoder(self.embed(input_ids), src_key_padding_mask=pad)
        x = x.masked_fill(pad[..., None], 0.0).sum(1) / (~pad).sum(1, keepdim=True).clamp(min=1)
        return self.head(torch.cat([x, self.image(image)], -1))


def data(n, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 30, (n, 6)).astype(np.int64)
    ids[::2, 4:] = 0  # padding in every other row
    return {"image": rng.standard_normal((n, 3, 16, 16)).astype(np.float32), "input_ids": ids}


def test_towers_inside_a_wrapper_are_the_branches():
    torch.manual_seed(0)
    branches = find_branches(Wrapper().eval(), ["image", "input_ids"], data(4))
    assert branches == {"vision": ["inner.vision"], "text": ["inner.text"]}


def test_transformer_encoder_with_padding_mask_prunes():
    torch.manual_seed(0)
    model = EncoderWithPadding().eval()
    calib = data(32)
    pruned, report = prune(model, {k: v[:4] for k, v in calib.items()}, calib, {"*": 0.3})
    assert report["total"]["params_after"] < report["total"]["params_before"]
    args = tuple(torch.from_numpy(data(8, seed=1)[k]) for k in ("image", "input_ids"))
    with torch.no_grad():
        assert pruned(*args).shape == model(*args).shape == (8, 5)
    assert torch.backends.mha.get_fastpath_enabled()  # restored after pruning
    # nn.MultiheadAttention packs q/k/v in one parameter: its heads stay, and the report says so
    note = next(n for n in report["notes"] if n.startswith("attention heads kept in 2 module(s)"))
    assert "encoder.layers.0.self_attn (q/k/v packed in in_proj_weight)" in note


def test_comparison_guesses_the_task_from_dict_output_names():
    torch.manual_seed(0)
    model = Wrapper().eval()
    calib = data(32)
    pruned, report = prune(model, {k: v[:4] for k, v in calib.items()}, calib, {"*": 0.3})
    held = data(16, seed=2)
    result = compare(model, pruned, ["image", "input_ids"], held, report, labels=np.arange(16))
    task = result["task"]
    assert task["metric"] == "recall@1" and task["outputs"] == ["image_embeds", "text_embeds"]
    assert 0 <= task["after"] <= 100 and task["drop"] == pytest.approx(task["before"] - task["after"])
    assert set(result["branches"]) == {"vision", "text"}
