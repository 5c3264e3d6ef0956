"""Transformer pieces written out explicitly (Linear/matmul/softmax, LayerNorm, GELU).

Not ``nn.MultiheadAttention``: its fused fast path and its mask handling export differently through
TorchScript, ``torch.export`` and the ONNX exporters; plain ops give the same graph everywhere and
quantize as ordinary MatMuls. Shapes never read the batch size, so every exporter keeps it dynamic.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .vocab import PAD_ID


def key_mask(input_ids: torch.Tensor) -> torch.Tensor:
    """[B, 1, 1, L] float mask over attention keys: 1 for real tokens, 0 for padding."""
    return (input_ids != PAD_ID).to(torch.float32)[:, None, None, :]


def masked_mean(x: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean of x [B, L, D] over the non-padding positions of input_ids [B, L]."""
    keep = (input_ids != PAD_ID).to(x.dtype).unsqueeze(-1)
    return (x * keep).sum(dim=1) / keep.sum(dim=1).clamp_min(1.0)


class Attention(nn.Module):
    """Multi-head attention; self-attention when ``context`` is None, cross-attention otherwise."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.scale = 1.0 / math.sqrt(dim // heads)
        self.query = nn.Linear(dim, dim)
        self.key_value = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def _split(self, x: torch.Tensor) -> torch.Tensor:  # [B, N, D] -> [B, H, N, D/H]
        # reshape, not unflatten: the TorchScript ONNX exporter loses the rank of unflatten's output.
        batch, tokens, dim = x.shape
        return x.reshape(batch, tokens, self.heads, dim // self.heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                key_mask: torch.Tensor | None = None) -> torch.Tensor:
        source = x if context is None else context
        key, value = self.key_value(source).chunk(2, dim=-1)
        q, k, v = self._split(self.query(x)), self._split(key), self._split(value)
        weights = (torch.matmul(q, k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        if key_mask is not None:
            # Masking *after* the softmax (zero the padded keys, renormalise) equals the usual additive
            # -1e4 bias before it, but keeps every tensor in its natural range: with the bias, static
            # INT8 calibration stretched the score tensor's range to -1e4 and lost the real scores
            # (measured: dual-encoder recall@1 98.2 -> 66 with ORT static QDQ).
            weights = weights * key_mask
            weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(1e-9)
        mixed = torch.matmul(weights, v)
        return self.out(mixed.transpose(1, 2).flatten(2))


class MLP(nn.Sequential):
    def __init__(self, dim: int, ratio: int = 2):
        super().__init__(nn.Linear(dim, ratio * dim), nn.GELU(), nn.Linear(ratio * dim, dim))


class Block(nn.Module):
    """Pre-norm self-attention block (pre-norm keeps the residual stream's scale, and so INT8 ranges, tame)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm_attn = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = MLP(dim)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm_attn(x), key_mask=key_mask)
        return x + self.mlp(self.norm_mlp(x))


class CrossBlock(nn.Module):
    """Pre-norm block whose queries (text) attend to a context (image patches), then an MLP."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm_query = nn.LayerNorm(dim)
        self.norm_context = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = MLP(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm_query(x), context=self.norm_context(context))
        return x + self.mlp(self.norm_mlp(x))


class PatchEmbed(nn.Module):
    """ViT patchify: a stride-``patch`` convolution, then learned position embeddings."""

    def __init__(self, image_size: int, patch: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)
        self.position = nn.Parameter(torch.zeros(1, (image_size // patch) ** 2, dim))
        nn.init.normal_(self.position, std=0.02)

    def forward(self, image: torch.Tensor) -> torch.Tensor:  # [B, 3, H, W] -> [B, N, D]
        return self.proj(image).flatten(2).transpose(1, 2) + self.position


class ConvStem(nn.Module):
    """Hybrid-ViT patch features: a small Conv-BatchNorm-GELU tower (strides 1, 2, 2, 2) turns
    [B, 3, H, W] into an (H/8 x W/8) grid of tokens [B, N, D] whose receptive field covers a whole object.
    Measured here: with a plain strided patchify, question-to-patch cross-attention sat on the
    answer-prior plateau (~40% top1) for most of a 2-minute CPU budget; the normalised conv tower learns
    shape features early enough for the cross-attention to bind them."""

    def __init__(self, image_size: int, dim: int, widths: tuple[int, int, int] = (24, 48, 64)):
        super().__init__()
        stages = []
        for cin, cout, stride in zip((3, *widths), (*widths, dim), (1, 2, 2, 2)):
            stages += [nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.BatchNorm2d(cout), nn.GELU()]
        self.convs = nn.Sequential(*stages[:-1])  # no activation on the token features themselves
        self.position = nn.Parameter(torch.zeros(1, (image_size // 8) ** 2, dim))
        nn.init.normal_(self.position, std=0.02)

    def forward(self, image: torch.Tensor) -> torch.Tensor:  # [B, 3, H, W] -> [B, N, D]
        return self.convs(image).flatten(2).transpose(1, 2) + self.position


class TokenEmbed(nn.Module):
    def __init__(self, vocab_size: int, length: int, dim: int):
        super().__init__()
        self.token = nn.Embedding(vocab_size, dim)
        self.position = nn.Parameter(torch.zeros(1, length, dim))
        nn.init.normal_(self.token.weight, std=0.02)
        nn.init.normal_(self.position, std=0.02)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.token(input_ids) + self.position
