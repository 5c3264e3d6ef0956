"""Pruning keeps every channel that reaches a model output, by construction: a tower's embedding that is
both an output and the fusion input (conv + pooling, a projection returned as is, Hugging Face BERT's
pooler, a ViT CLS token, a Whisper encoder mean, an nn.TransformerEncoder mean), listed after the fused
output so that torch-pruning reaches it from there first. A shape baked into forward() keeps the channels
it needs and the rest is pruned. Output widths never change."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torch_pruning")
from torch import nn  # noqa: E402

from edgemm.prune import prune  # noqa: E402

WIDTH = 32


def small_conv():
    return nn.Sequential(nn.Conv2d(3, WIDTH, 3, 2, 1), nn.BatchNorm2d(WIDTH), nn.ReLU(),
                         nn.Conv2d(WIDTH, WIDTH, 3, 2, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def small_text():
    return nn.Sequential(nn.Embedding(30, 16), nn.Flatten(), nn.Linear(96, 64), nn.ReLU(), nn.Linear(64, WIDTH))


class Fused(nn.Module):
    """``tower(x)`` is returned and fed to the fusion head; the fused logits come first."""

    def __init__(self, vision, text):
        super().__init__()
        self.vision, self.text = vision, text
        self.head = nn.Sequential(nn.Linear(2 * WIDTH, 64), nn.ReLU(), nn.Linear(64, 5))

    def embed_image(self, image):
        return self.vision(image)

    def embed_text(self, input_ids):
        return self.text(input_ids)

    def forward(self, image, input_ids):
        v, t = self.embed_image(image), self.embed_text(input_ids)
        return {"logits": self.head(torch.cat([v, t], -1)), "image_embeds": v, "text_embeds": t}


class ConvPool(Fused):
    def __init__(self):
        super().__init__(small_conv(), small_text())


class ConvPoolTuple(ConvPool):
    def forward(self, image, input_ids):
        out = super().forward(image, input_ids)
        return out["logits"], out["image_embeds"]


class Projection(Fused):
    """The embedding is a Linear layer's own output (no op after it)."""

    def __init__(self):
        super().__init__(nn.Sequential(*small_conv(), nn.Linear(WIDTH, WIDTH)), small_text())


class HardCodedView(ConvPool):
    """The fusion head reshapes the pooled map with a literal width: those channels must stay."""

    def __init__(self):
        super().__init__()
        self.vision = self.vision[:-1]  # no Flatten: [B, 32, 1, 1]

    def embed_image(self, image):
        return self.vision(image).view(-1, WIDTH)

    def forward(self, image, input_ids):
        return super().forward(image, input_ids)["logits"]


class BertPooler(Fused):
    def __init__(self):
        from transformers import BertConfig, BertModel

        bert = BertModel(BertConfig(vocab_size=30, hidden_size=WIDTH, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=64, max_position_embeddings=16))
        super().__init__(small_conv(), bert)

    def embed_text(self, input_ids):
        return self.text(input_ids=input_ids).pooler_output


class TransformerMean(Fused):
    def __init__(self):
        layer = nn.TransformerEncoderLayer(WIDTH, 4, 64, batch_first=True)
        super().__init__(small_conv(), nn.TransformerEncoder(layer, 2, enable_nested_tensor=False))
        self.embed = nn.Embedding(30, WIDTH)

    def embed_text(self, input_ids):
        return self.text(self.embed(input_ids)).mean(1)


class ViTCls(Fused):
    def __init__(self):
        from transformers import ViTConfig, ViTModel

        vit = ViTModel(ViTConfig(hidden_size=WIDTH, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                 image_size=16, patch_size=4), add_pooling_layer=False)
        super().__init__(vit, small_text())

    def embed_image(self, image):
        return self.vision(pixel_values=image).last_hidden_state[:, 0]


class WhisperMean(nn.Module):
    """Audio (Whisper encoder, mean over time) + text."""

    def __init__(self):
        super().__init__()
        from transformers import WhisperConfig
        from transformers.models.whisper.modeling_whisper import WhisperEncoder

        self.audio = WhisperEncoder(WhisperConfig(d_model=WIDTH, encoder_layers=2, encoder_attention_heads=4,
                                                  encoder_ffn_dim=64, num_mel_bins=16, max_source_positions=8))
        self.text = small_text()
        self.head = nn.Sequential(nn.Linear(2 * WIDTH, 64), nn.ReLU(), nn.Linear(64, 5))

    def forward(self, input_features, input_ids):
        a = self.audio(input_features).last_hidden_state.mean(1)
        t = self.text(input_ids)
        return {"logits": self.head(torch.cat([a, t], -1)), "audio_embeds": a}


def data(n, seed=0, audio=False):
    rng = np.random.default_rng(seed)
    first = ({"input_features": rng.standard_normal((n, 16, 16)).astype(np.float32)} if audio else
             {"image": rng.standard_normal((n, 3, 16, 16)).astype(np.float32)})
    return {**first, "input_ids": rng.integers(1, 30, (n, 6)).astype(np.int64)}


def outputs(model, feeds):
    from edgemm.reference import flatten_outputs

    with torch.no_grad():
        return dict(zip(*flatten_outputs(model(*(torch.from_numpy(v) for v in feeds.values())))))


@pytest.mark.parametrize("cls", [ConvPool, ConvPoolTuple, Projection, BertPooler, TransformerMean, ViTCls,
                                 WhisperMean], ids=lambda c: c.__name__)
def test_outputs_keep_their_width_and_the_rest_is_pruned(cls):
    torch.manual_seed(0)
    model = cls().eval()
    audio = cls is WhisperMean
    calib = data(32, audio=audio)
    pruned, report = prune(model, {k: v[:4] for k, v in calib.items()}, calib, {"*": 0.3})
    check = data(6, seed=1, audio=audio)
    want, got = outputs(model, check), outputs(pruned, check)
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in want.items()}
    assert report["total"]["params_after"] < 0.9 * report["total"]["params_before"]
    assert report["skipped_groups"].get("reaches a model output")
    assert not any("broke" in note for note in report["notes"])


def test_a_shape_baked_into_forward_keeps_only_the_channels_it_needs():
    torch.manual_seed(0)
    model = HardCodedView().eval()
    calib = data(32)
    pruned, report = prune(model, {k: v[:4] for k, v in calib.items()}, calib, {"*": 0.3})
    assert outputs(pruned, data(6, seed=1))["output"].shape == (6, 5)
    (note,) = [n for n in report["notes"] if "broke" in n]
    assert note.startswith("channels of vision.3 kept: pruning them broke the model")
    assert report["skipped_groups"]["breaks the model when pruned"] == 1
    assert pruned.vision[3].out_channels == WIDTH  # the view's width
    assert pruned.vision[0].out_channels < WIDTH   # the conv before it is still pruned
    assert pruned.text[2].out_features < 64


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(WIDTH), nn.Linear(WIDTH, 64), nn.Linear(64, WIDTH)

    def forward(self, x):
        return x + self.fc2(nn.functional.gelu(self.fc1(self.norm(x))))


class HardCodedWidth(nn.Module):
    """Two residual towers; the text one reshapes its stream with a literal width."""

    def __init__(self):
        super().__init__()
        self.tokens = nn.Embedding(30, WIDTH)
        self.text = nn.Sequential(Residual(), Residual())
        self.patches = nn.Linear(48, WIDTH)
        self.vision = nn.Sequential(Residual(), Residual())
        self.head = nn.Linear(2 * WIDTH, 5)

    def forward(self, image, input_ids):
        t = self.text(self.tokens(input_ids)).view(-1, 6, WIDTH).mean(1)
        patches = image.reshape(image.shape[0], 3, 4, 4, 4, 4).permute(0, 2, 4, 1, 3, 5).reshape(-1, 16, 48)
        v = self.vision(self.patches(patches)).mean(1)
        return self.head(torch.cat([v, t], -1))


def test_a_width_baked_into_forward_keeps_that_stream_and_narrows_the_other():
    torch.manual_seed(0)
    model = HardCodedWidth().eval()
    calib = data(32)
    pruned, report = prune(model, {k: v[:4] for k, v in calib.items()}, calib, {"*": 0.3})
    assert outputs(pruned, data(6, seed=1))["output"].shape == (6, 5)
    (note,) = [n for n in report["notes"] if "broke" in n]
    assert note.startswith("residual width written by ") and "kept" in note
    assert pruned.tokens.embedding_dim == WIDTH                  # the text stream keeps its width
    assert pruned.patches.out_features < WIDTH                   # the vision stream is narrowed
    assert pruned.text[0].fc1.out_features < 64                  # and the text MLPs still pruned
