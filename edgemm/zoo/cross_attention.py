"""``cross-attention``: a VQA-style model whose question tokens attend to image patches.

Image: a Conv-BN-GELU stem -> 4x4 grid of patch tokens -> 1 transformer block. Question: word
embeddings -> 1 masked self-attention block -> 2 cross-attention blocks (queries: question tokens,
keys/values: image patches) -> masked mean pool -> answer classifier. Output ``logits`` [B, 14].
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from . import layers
from .datasets import ANSWERS, TEXT_LENGTH
from .shapes import IMAGE_SIZE
from .vocab import VOCAB_SIZE

DIM = 64
HEADS = 4
IMAGE_DEPTH = 1
CROSS_DEPTH = 2


class CrossAttentionVQA(nn.Module):
    def __init__(self):
        super().__init__()
        self.patches = layers.ConvStem(IMAGE_SIZE, DIM)
        self.image_blocks = nn.ModuleList(layers.Block(DIM, HEADS) for _ in range(IMAGE_DEPTH))
        self.tokens = layers.TokenEmbed(VOCAB_SIZE, TEXT_LENGTH, DIM)
        self.question_block = layers.Block(DIM, HEADS)
        self.cross_blocks = nn.ModuleList(layers.CrossBlock(DIM, HEADS) for _ in range(CROSS_DEPTH))
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, len(ANSWERS))

    def forward(self, image: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        context = self.patches(image)
        for block in self.image_blocks:
            context = block(context)
        x = self.question_block(self.tokens(input_ids), key_mask=layers.key_mask(input_ids))
        for block in self.cross_blocks:
            x = block(x, context)
        return self.head(layers.masked_mean(self.norm(x), input_ids))


def build() -> CrossAttentionVQA:
    return CrossAttentionVQA()


def loss(model: CrossAttentionVQA, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(model(batch["image"], batch["input_ids"]), batch["labels"])
