"""Branches from the data flow (edgemm.modality, used by --precision per-branch, --prune per-branch and the
accuracy search): input modality from names *and* dtype/shape (Wav2Vec2's `input_values`, Whisper's
`input_features`, video layouts, masks with the ids they accompany), a model wrapped in one top-level
module still split into its towers, an nn.MultiheadAttention cross-attention found as fusion, and a
single-modality model never labelled fusion. Checked on torch modules (prune) and their ONNX graphs
(precision)."""

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
from torch import nn  # noqa: E402

from edgemm.modality import input_modality, resolve_inputs  # noqa: E402
from edgemm.prune import find_branches as torch_branches  # noqa: E402
from edgemm.prune.augment import modality_groups  # noqa: E402
from edgemm.quant.branches import find_branches as onnx_branches  # noqa: E402


@pytest.mark.parametrize("name, dtype, shape, want", [
    ("input_ids", "int64", ["b", 12], "text"),
    ("tok", "int32", ["b", 12], "text"),                    # integer [B, T]: token ids
    ("pixel_values", "float32", ["b", 3, 32, 32], "vision"),
    ("x", "float32", ["b", 3, 32, 32], "vision"),           # float [B, C, H, W]
    ("clip", "float32", ["b", 3, 8, 32, 32], "vision"),     # video [B, C, T, H, W]
    ("frames_in", "float32", ["b", 8, 3, 32, 32], "vision"),
    ("input_values", "float32", ["b", 16000], "audio"),     # Wav2Vec2 waveform
    ("signal", "float32", ["b", 16000], "audio"),           # float [B, T]
    ("signal", "float32", ["b", 1, 16000], "audio"),        # [B, 1, T]
    ("input_features", "float32", ["b", 80, 3000], "audio"),  # Whisper log-mel
    ("spec", 1, ["b", 3000, 80], "audio"),                  # ONNX elem_type FLOAT, [B, T, F]
    ("embedding", "float32", ["b", 16], None),              # a short feature vector says nothing
    ("attention_mask", "int64", ["b", 12], None),           # a mask: its companion's
    ("keep", "bool", ["b", 12], None),
    ("pixel_mask", "int64", ["b", 32, 32], "vision"),
])
def test_input_modality_from_name_dtype_and_shape(name, dtype, shape, want):
    assert input_modality(name, dtype, shape) == want


def test_masks_belong_to_the_input_they_accompany():
    specs = {"input_values": ("float32", ["b", 400]), "attention_mask": ("int64", ["b", 400]),
             "input_ids": ("int64", ["b", 6]), "text_mask": ("int64", ["b", 6])}
    assert resolve_inputs(specs) == {"input_values": "audio", "attention_mask": "audio", "input_ids": "text",
                                     "text_mask": "text"}
    # from the data flow: where the mask first meets another input
    specs = {"input_ids": ("int64", ["b", 6]), "attention_mask": ("int64", ["b", "n"]),
             "image": ("float32", ["b", 3, 8, 8])}
    meets = [{"input_ids"}, {"input_ids", "attention_mask"}, {"input_ids", "attention_mask", "image"}]
    assert resolve_inputs(specs, meets)["attention_mask"] == "text"
    assert modality_groups(["input_values", "attention_mask", "input_ids"],
                           {k: np.zeros([2 if d == "b" else d for d in s], dt) for k, (dt, s) in {
                               "input_values": ("float32", ["b", 400]), "attention_mask": ("int64", ["b", 400]),
                               "input_ids": ("int64", ["b", 6])}.items()}) == [["input_values", "attention_mask"],
                                                                               ["input_ids"]]


# --- models --------------------------------------------------------------------------------------------

def text_tower():
    return nn.Sequential(nn.Embedding(30, 32), nn.Flatten(), nn.Linear(6 * 32, 32))


class CrossAttention(nn.Module):
    """Text queries attend to image patches through nn.MultiheadAttention (query from one modality,
    key/value from the other)."""

    def __init__(self):
        super().__init__()
        self.vision = nn.Sequential(nn.Conv2d(3, 32, 4, 4), nn.ReLU())
        self.text = nn.Embedding(30, 32)
        self.text_mix = nn.Linear(32, 32)
        self.cross = nn.MultiheadAttention(32, 4, batch_first=True)
        self.head = nn.Linear(32, 5)

    def forward(self, image, input_ids):
        patches = self.vision(image).flatten(2).transpose(1, 2)
        queries = self.text_mix(self.text(input_ids))
        fused, _ = self.cross(queries, patches, patches, need_weights=False)
        return self.head(fused.mean(1))


class Wrapped(nn.Module):
    """The whole model inside one top-level module, as users often save it."""

    def __init__(self, inner):
        super().__init__()
        self.model = inner

    def forward(self, *args):
        return self.model(*args)


class WrappedCross(Wrapped):
    def __init__(self):
        super().__init__(CrossAttention())

    def forward(self, image, input_ids):
        return self.model(image, input_ids)


def wav2vec2(hidden=32):
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    return Wav2Vec2Model(Wav2Vec2Config(hidden_size=hidden, num_hidden_layers=1, num_attention_heads=4,
                                        intermediate_size=64, conv_dim=(16, 16), conv_stride=(5, 4),
                                        conv_kernel=(10, 8), num_conv_pos_embeddings=16,
                                        num_conv_pos_embedding_groups=4, feat_extract_norm="layer",
                                        do_stable_layer_norm=True))


class SpeechText(nn.Module):
    """Wav2Vec2 waveform (with its own attention_mask) + token ids; towers named so nothing in the
    module names tells the modality."""

    def __init__(self):
        super().__init__()
        self.enc_a = wav2vec2()
        self.enc_b = text_tower()
        self.head = nn.Linear(64, 5)

    def forward(self, input_values, attention_mask, input_ids):
        a = self.enc_a(input_values, attention_mask=attention_mask).last_hidden_state.mean(1)
        return self.head(torch.cat([a, self.enc_b(input_ids)], -1))


class WhisperText(nn.Module):
    def __init__(self):
        super().__init__()
        from transformers import WhisperConfig
        from transformers.models.whisper.modeling_whisper import WhisperEncoder

        self.enc_a = WhisperEncoder(WhisperConfig(d_model=32, encoder_layers=1, encoder_attention_heads=4,
                                                  encoder_ffn_dim=64, num_mel_bins=16, max_source_positions=8))
        self.enc_b = text_tower()
        self.head = nn.Linear(64, 5)

    def forward(self, input_features, input_ids):
        a = self.enc_a(input_features).last_hidden_state.mean(1)
        return self.head(torch.cat([a, self.enc_b(input_ids)], -1))


class SpeechOnly(nn.Module):
    """One tower: a waveform and its mask (the mask must not make a second branch)."""

    def __init__(self):
        super().__init__()
        self.encoder = wav2vec2()
        self.classifier = nn.Linear(32, 5)

    def forward(self, input_values, attention_mask):
        return self.classifier(self.encoder(input_values, attention_mask=attention_mask).last_hidden_state.mean(1))


class TextOnly(nn.Module):
    """A MiniLM-style single text tower (HF BertModel) with a mask: no fusion anywhere."""

    def __init__(self):
        super().__init__()
        from transformers import BertConfig, BertModel

        self.bert = BertModel(BertConfig(vocab_size=30, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=64, max_position_embeddings=16))

    def forward(self, input_ids, attention_mask):
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).pooler_output


class EarlyEmbeddings(nn.Module):
    def __init__(self):
        super().__init__()
        self.text_embeddings = nn.Sequential(nn.Embedding(30, 32), nn.Linear(32, 32), nn.LayerNorm(32))
        self.patch_embeddings = nn.Sequential(nn.Conv2d(3, 32, 4, 4), nn.Flatten(2))

    def forward(self, input_ids, image):
        return torch.cat([self.text_embeddings(input_ids), self.patch_embeddings(image).transpose(1, 2)], 1)


class EarlyFusion(nn.Module):
    """ViLT-style: both modalities' embeddings concatenated inside one `embeddings` module, one shared
    encoder (fusion), and a classifier beside the backbone (so the backbone is not the only fed module)."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.ModuleDict({"embeddings": EarlyEmbeddings(),
                                       "encoder": nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))})
        self.classifier = nn.Linear(32, 5)

    def forward(self, image, input_ids):
        x = self.backbone["encoder"](self.backbone["embeddings"](input_ids, image))
        return self.classifier(x.mean(1))


def feeds_for(model, n=4, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 30, (n, 6)).astype(np.int64)
    wave_mask = np.ones((n, 400), np.int64)
    wave_mask[::2, 300:] = 0
    text_mask = np.ones((n, 6), np.int64)
    text_mask[::2, 4:] = 0
    return {
        WrappedCross: {"image": rng.standard_normal((n, 3, 16, 16)).astype(np.float32), "input_ids": ids},
        EarlyFusion: {"image": rng.standard_normal((n, 3, 16, 16)).astype(np.float32), "input_ids": ids},
        SpeechText: {"input_values": rng.standard_normal((n, 400)).astype(np.float32),
                     "attention_mask": wave_mask, "input_ids": ids},
        WhisperText: {"input_features": rng.standard_normal((n, 16, 16)).astype(np.float32), "input_ids": ids},
        SpeechOnly: {"input_values": rng.standard_normal((n, 400)).astype(np.float32), "attention_mask": wave_mask},
        TextOnly: {"input_ids": ids, "attention_mask": text_mask},
    }[type(model)]


def build(cls):
    torch.manual_seed(0)
    return cls().eval()


# --- torch modules (what --prune splits) -----------------------------------------------------------------

@pytest.mark.parametrize("cls, want", [
    (WrappedCross, {"vision": ["model.vision"], "text": ["model.text", "model.text_mix"],
                    "fusion": ["model.cross", "model.head"]}),
    (SpeechText, {"text": ["enc_b"], "audio": ["enc_a"], "fusion": ["head"]}),
    (WhisperText, {"text": ["enc_b"], "audio": ["enc_a"], "fusion": ["head"]}),
    (SpeechOnly, {"audio": ["classifier", "encoder"]}),
    (EarlyFusion, {"vision": ["backbone.embeddings.patch_embeddings"], "text": ["backbone.embeddings.text_embeddings"],
                   "fusion": ["backbone.encoder", "classifier"]}),
    (TextOnly, {"text": ["bert"]}),
], ids=lambda v: v.__name__ if isinstance(v, type) else "")
def test_torch_branches_from_the_data_flow(cls, want):
    model = build(cls)
    feeds = feeds_for(model)
    assert torch_branches(model, list(feeds), feeds) == want


# --- ONNX graphs (what --precision and the accuracy search split) ----------------------------------------

def export(model, feeds, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, tuple(torch.from_numpy(v) for v in feeds.values()), str(path),
                          input_names=list(feeds), dynamo=True, external_data=False, verbose=False)
    return path


def compute_branches(bmap, module_prefix):
    return {bmap.branch_of[n] for n in bmap.nodes("vision") + bmap.nodes("text") + bmap.nodes("audio")
            + bmap.nodes("fusion") if (bmap.module_of[n] or "").startswith(module_prefix)
            and bmap.op_of[n] in ("MatMul", "Gemm", "Conv")}


def test_onnx_wrapped_model_splits_and_multihead_cross_attention_is_fusion(tmp_path):
    model = build(WrappedCross)
    bmap = onnx_branches(export(model, feeds_for(model), tmp_path / "m.onnx"))
    assert bmap.present() == ["vision", "text", "fusion"]
    assert compute_branches(bmap, "model.vision") == {"vision"}
    assert compute_branches(bmap, "model.text_mix") == {"text"}
    assert compute_branches(bmap, "model.cross") == {"fusion"}   # q from text, k/v from the image
    assert compute_branches(bmap, "model.head") == {"fusion"}
    modules = bmap.summary()["branches"]
    assert "model.vision" in modules["vision"]["modules"] and "model.cross" in modules["fusion"]["modules"]


def test_onnx_early_fusion_embeddings_split_into_their_towers(tmp_path):
    model = build(EarlyFusion)
    bmap = onnx_branches(export(model, feeds_for(model), tmp_path / "m.onnx"))
    assert bmap.present() == ["vision", "text", "fusion"]
    assert compute_branches(bmap, "backbone.embeddings.patch_embeddings") == {"vision"}
    assert compute_branches(bmap, "backbone.embeddings.text_embeddings") == {"text"}
    assert compute_branches(bmap, "backbone.encoder") == {"fusion"}
    assert compute_branches(bmap, "classifier") == {"fusion"}


def test_torch_branches_of_hugging_face_vilt():
    """ViLT fuses inside ViltEmbeddings: its text and patch embeddings are still the towers."""
    from transformers import ViltConfig, ViltModel

    torch.manual_seed(0)
    model = ViltModel(ViltConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                                 image_size=32, patch_size=8, max_image_length=-1, vocab_size=30,
                                 max_position_embeddings=16)).eval()
    rng = np.random.default_rng(0)
    feeds = {"input_ids": rng.integers(1, 30, (4, 6)).astype(np.int64), "attention_mask": np.ones((4, 6), np.int64),
             "token_type_ids": np.zeros((4, 6), np.int64),
             "pixel_values": rng.standard_normal((4, 3, 32, 32)).astype(np.float32)}
    assert torch_branches(model, list(feeds), feeds) == {
        "vision": ["embeddings.patch_embeddings"], "text": ["embeddings.text_embeddings"],
        "fusion": ["embeddings.dropout", "encoder", "layernorm", "pooler"]}


@pytest.mark.slow  # ~30 s: Wav2Vec2 through the dynamo exporter
def test_onnx_speech_text_finds_audio_from_input_values_and_its_mask(tmp_path):
    model = build(SpeechText)
    bmap = onnx_branches(export(model, feeds_for(model), tmp_path / "m.onnx"))
    assert bmap.input_modality == {"input_values": "audio", "attention_mask": "audio", "input_ids": "text"}
    assert compute_branches(bmap, "enc_a") == {"audio"} and compute_branches(bmap, "enc_b") == {"text"}
    assert compute_branches(bmap, "head") == {"fusion"}


@pytest.mark.parametrize("cls, branch", [(TextOnly, "text"),
                                         pytest.param(SpeechOnly, "audio", marks=pytest.mark.slow)],
                         ids=["text", "audio"])
def test_onnx_single_tower_is_never_fusion(tmp_path, cls, branch):
    model = build(cls)
    bmap = onnx_branches(export(model, feeds_for(model), tmp_path / "m.onnx"))
    assert bmap.present() == [branch]
    assert set(bmap.branch_of.values()) == {branch}


@pytest.mark.parametrize("name, want", [
    ("dual-encoder", {"vision": ["image_blocks.0", "image_blocks.1", "image_norm", "image_proj", "patches"],
                      "text": ["text_blocks.0", "text_blocks.1", "text_norm", "text_proj", "tokens"]}),
    ("cross-attention", {"vision": ["image_blocks.0", "patches"], "text": ["question_block", "tokens"],
                         "fusion": ["cross_blocks.0", "cross_blocks.1", "head", "norm"]}),
    ("early-fusion", {"vision": ["image_tower"], "audio": ["audio_tower"], "fusion": ["classifier"]}),
])
def test_zoo_branches_with_inputs_named_nothing(name, want):
    """The zoo models with their inputs renamed ``input_0``, ``input_1``: dtypes and shapes place them."""
    from edgemm.zoo import build, get, make_data

    torch.manual_seed(0)
    model = build(name, pretrained=False).eval()
    data = make_data(name, "calib", 4)
    feeds = {f"input_{i}": data[k] for i, k in enumerate(get(name).input_names)}
    assert torch_branches(model, list(feeds), feeds) == want
