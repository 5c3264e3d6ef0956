"""Fused models written in plain torch.nn, the way people write them by hand (random init, tiny)."""

from __future__ import annotations

import torch
from torch import nn

VOCAB = 100
SEQ = 8
DIM = 32
IMAGE = 32
PATCH = 8
MELS = 16
AUDIO_FRAMES = 24
CLASSES = 5


class EarlyFusionTransformer(nn.Module):
    """Single-stream early fusion: image patches and text tokens concatenated into one
    nn.TransformerEncoder (its eval fast path is what TorchScript's ONNX exporter cannot take)."""

    def __init__(self):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, DIM, PATCH, stride=PATCH)
        self.token_embed = nn.Embedding(VOCAB, DIM)
        n_tokens = (IMAGE // PATCH) ** 2 + SEQ
        self.pos = nn.Parameter(torch.randn(1, n_tokens, DIM) * 0.02)
        self.type_embed = nn.Embedding(2, DIM)
        layer = nn.TransformerEncoderLayer(DIM, 2, dim_feedforward=64, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2)
        self.head = nn.Linear(DIM, CLASSES)

    def forward(self, image, input_ids):
        patches = self.patch_embed(image).flatten(2).transpose(1, 2)
        tokens = self.token_embed(input_ids)
        types = torch.cat([torch.zeros(patches.shape[1], dtype=torch.long, device=image.device),
                           torch.ones(tokens.shape[1], dtype=torch.long, device=image.device)])
        x = torch.cat([patches, tokens], dim=1) + self.pos + self.type_embed(types)
        x = self.encoder(x)
        return self.head(x.mean(1))


def early_fusion_transformer() -> nn.Module:
    torch.manual_seed(0)
    return EarlyFusionTransformer()


class ConvGRU(nn.Module):
    """Conv image tower + GRU over log-mel frames; the image tower's pooled features are also an output."""

    def __init__(self):
        super().__init__()
        self.image_tower = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.audio_proj = nn.Linear(MELS, DIM)
        self.audio_rnn = nn.GRU(DIM, DIM, batch_first=True)
        self.fusion = nn.Sequential(nn.Linear(32 + DIM, DIM), nn.ReLU(), nn.Linear(DIM, CLASSES))

    def forward(self, image, audio):
        image_features = self.image_tower(image)
        _, hidden = self.audio_rnn(self.audio_proj(audio.transpose(1, 2)))
        audio_features = hidden[-1]
        return self.fusion(torch.cat([image_features, audio_features], dim=1)), image_features


def conv_gru() -> nn.Module:
    torch.manual_seed(0)
    return ConvGRU()


class KeywordOnlyCrossAttention(nn.Module):
    """A keyword-only forward, nn.MultiheadAttention fusion, and a dict output whose key equals a
    submodule's name (``cls``), plus the same tensor returned twice and a None field."""

    def __init__(self):
        super().__init__()
        self.vision = nn.Sequential(nn.Conv2d(3, 16, 4, stride=4), nn.GELU(), nn.Conv2d(16, DIM, 2, stride=2))
        self.embed = nn.Embedding(VOCAB, DIM)
        self.text = nn.LSTM(DIM, DIM, batch_first=True)
        self.cross = nn.MultiheadAttention(DIM, 4, batch_first=True)
        self.cls = nn.Linear(DIM, CLASSES)

    def forward(self, *, image, input_ids, attention_mask=None):
        patches = self.vision(image).flatten(2).transpose(1, 2)
        tokens, _ = self.text(self.embed(input_ids))
        padding = None if attention_mask is None else attention_mask == 0
        fused, _ = self.cross(patches, tokens, tokens, key_padding_mask=padding, need_weights=False)
        pooled = fused.mean(1)
        return {"cls": self.cls(pooled), "pooled": pooled, "fused_embedding": pooled, "aux": None}


def kwonly_xattn() -> nn.Module:
    torch.manual_seed(0)
    return KeywordOnlyCrossAttention()
