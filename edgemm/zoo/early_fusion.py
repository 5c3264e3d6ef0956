"""``early-fusion``: audio + image. A 1-D conv tower over the log-mel spectrogram and a 2-D conv tower
over the image; pooled features are concatenated into an MLP classifier. Output ``logits`` [B, classes].
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .audio import N_MELS
from .datasets import N_FUSION_CLASSES


def _conv1d(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv1d(cin, cout, 5, stride=stride, padding=2), nn.BatchNorm1d(cout), nn.ReLU())


def _conv2d(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.BatchNorm2d(cout), nn.ReLU())


class EarlyFusion(nn.Module):
    def __init__(self):
        super().__init__()
        # Audio [B, n_mels, T]: mel bands are channels, convolution runs along time (rhythm).
        self.audio_tower = nn.Sequential(_conv1d(N_MELS, 48, 1), _conv1d(48, 64, 2), _conv1d(64, 64, 2))
        # Image [B, 3, 32, 32] -> [B, 64, 4, 4].
        self.image_tower = nn.Sequential(_conv2d(3, 24, 1), _conv2d(24, 48, 2), _conv2d(48, 64, 2),
                                         _conv2d(64, 64, 2))
        self.classifier = nn.Sequential(nn.Linear(128, 96), nn.ReLU(), nn.Linear(96, N_FUSION_CLASSES))

    def forward(self, image: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        audio_features = self.audio_tower(audio).mean(dim=-1)
        image_features = self.image_tower(image).mean(dim=(-2, -1))
        return self.classifier(torch.cat([image_features, audio_features], dim=-1))


def build() -> EarlyFusion:
    return EarlyFusion()


def loss(model: EarlyFusion, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(model(batch["image"], batch["audio"]), batch["labels"])
