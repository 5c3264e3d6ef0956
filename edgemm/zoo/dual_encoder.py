"""``dual-encoder``: a CLIP-style image/text dual encoder trained contrastively.

Image: 8x8-pixel patches -> 2 pre-norm transformer blocks -> mean pool -> projection.
Text: word embeddings -> 2 masked transformer blocks -> masked mean pool -> projection.
Both embeddings are L2-normalised; ``logits_per_image`` = logit_scale * image @ text.T.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from . import layers
from .datasets import TEXT_LENGTH
from .shapes import IMAGE_SIZE
from .vocab import VOCAB_SIZE

DIM = 64
HEADS = 4
DEPTH = 2
PATCH = 8
EMBED_DIM = 64
# CLIP clamps its learned temperature at 100; the same bound keeps the logits' range INT8-sized.
MAX_LOGIT_SCALE = 100.0


class DualEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.patches = layers.PatchEmbed(IMAGE_SIZE, PATCH, DIM)
        self.image_blocks = nn.ModuleList(layers.Block(DIM, HEADS) for _ in range(DEPTH))
        self.image_norm = nn.LayerNorm(DIM)
        self.image_proj = nn.Linear(DIM, EMBED_DIM)
        self.tokens = layers.TokenEmbed(VOCAB_SIZE, TEXT_LENGTH, DIM)
        self.text_blocks = nn.ModuleList(layers.Block(DIM, HEADS) for _ in range(DEPTH))
        self.text_norm = nn.LayerNorm(DIM)
        self.text_proj = nn.Linear(DIM, EMBED_DIM)
        self.log_logit_scale = nn.Parameter(torch.tensor(2.3))  # exp(2.3) ~ 10

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        x = self.patches(image)
        for block in self.image_blocks:
            x = block(x)
        return F.normalize(self.image_proj(self.image_norm(x).mean(dim=1)), dim=-1)

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        mask = layers.key_mask(input_ids)
        x = self.tokens(input_ids)
        for block in self.text_blocks:
            x = block(x, key_mask=mask)
        pooled = layers.masked_mean(self.text_norm(x), input_ids)
        return F.normalize(self.text_proj(pooled), dim=-1)

    def logit_scale(self) -> torch.Tensor:
        return self.log_logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)

    def forward(self, image: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        image_embeds = self.encode_image(image)
        text_embeds = self.encode_text(input_ids)
        logits_per_image = self.logit_scale() * image_embeds @ text_embeds.t()
        return image_embeds, text_embeds, logits_per_image


def build() -> DualEncoder:
    return DualEncoder()


def loss(model: DualEncoder, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Symmetric contrastive loss whose targets spread over every caption with the same meaning
    (plain CLIP loss would push apart identical captions that share a batch)."""
    _, _, logits = model(batch["image"], batch["input_ids"])
    labels = batch["labels"]
    same = (labels[:, None] == labels[None, :]).to(logits.dtype)
    targets = same / same.sum(dim=1, keepdim=True)
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets))
