"""Real-architecture fused models for the compat matrix, built at test time (random init, tiny sizes).

``MODELS``: name -> ModelCase: how to build the model (a factory in ``tests.models.hf_models`` or
``tests.models.torch_models``, importable as ``tests.models.<module>:<factory>``) and how to make its
data (token ids within the vocabulary, masks with padding, images, audio, video), keyed by the model's
forward parameters in their order. ``tests.models.save`` writes each model in every format its author
would use; ``tests.models.matrix`` runs the CLI over them.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import numpy as np

from . import hf_models as hf
from . import torch_models as tm


@dataclass(frozen=True)
class Feed:
    """One model input: ``kind`` is normal (float N(0,1)), uniform (float in [0,1)), ids (token ids with a
    CLS at 0, an EOS at the last real token and ``pad`` after it), mask (1 on real tokens, 0 on padding,
    matching ``ids``), zeros/ones (int64), false (bool)."""

    name: str
    shape: tuple[int, ...]  # without the batch axis
    kind: str
    vocab: int = 0
    pad: int = 0
    eos: int | None = None


@dataclass(frozen=True)
class ModelCase:
    name: str
    module: str  # tests.models.<module>
    factory: str
    modalities: tuple[str, ...]  # edgemm branch names of the towers: vision (images, video), text, audio
    fusion: str  # dual-encoder | cross-attention | early
    description: str
    feeds: tuple[Feed, ...]
    keyword_only: bool = False  # forward(self, *, ...): no positional call exists

    @property
    def factory_ref(self) -> str:
        return f"tests.models.{self.module}:{self.factory}"

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.feeds)

    def build(self):
        return getattr(importlib.import_module(f"tests.models.{self.module}"), self.factory)()

    def data(self, n: int, seed: int) -> dict[str, np.ndarray]:
        """``n`` samples (axis 0), deterministic in ``seed``; ordered as the forward's parameters."""
        rng = np.random.default_rng(seed)
        out: dict[str, np.ndarray] = {}
        lengths = None
        for feed in self.feeds:
            if feed.kind in ("ids", "mask"):
                seq = feed.shape[-1]
                if lengths is None:  # one padding length per sample, shared by the ids and the mask
                    lengths = rng.integers(seq // 2, seq + 1, n)
                real = np.arange(seq)[None, :] < lengths[:, None]
            if feed.kind == "normal":
                out[feed.name] = rng.standard_normal((n, *feed.shape)).astype(np.float32)
            elif feed.kind == "uniform":
                out[feed.name] = rng.random((n, *feed.shape)).astype(np.float32)
            elif feed.kind == "ids":
                ids = rng.integers(3, feed.vocab - 1, (n, *feed.shape)).astype(np.int64)
                ids[:, 0] = 2  # a CLS/BOS-like token
                if feed.eos is not None:
                    ids[np.arange(n), lengths - 1] = feed.eos
                out[feed.name] = np.where(real, ids, feed.pad).astype(np.int64)
            elif feed.kind == "mask":
                out[feed.name] = real.astype(np.int64)
            elif feed.kind == "zeros":
                out[feed.name] = np.zeros((n, *feed.shape), np.int64)
            elif feed.kind == "ones":
                out[feed.name] = np.ones((n, *feed.shape), np.int64)
            elif feed.kind == "false":
                out[feed.name] = np.zeros((n, *feed.shape), np.bool_)
            else:
                raise ValueError(f"unknown feed kind {feed.kind}")
        return out


def _ids(name="input_ids", vocab=hf.VOCAB, seq=hf.SEQ, pad=0, eos=None) -> Feed:
    return Feed(name, (seq,), "ids", vocab=vocab, pad=pad, eos=eos)


_MASK = Feed("attention_mask", (hf.SEQ,), "mask")
_PIXELS = Feed("pixel_values", (3, hf.IMAGE, hf.IMAGE), "normal")
_VIDEO = Feed("pixel_values", (hf.FRAMES, 3, hf.IMAGE, hf.IMAGE), "normal")
_IMAGE = Feed("image", (3, tm.IMAGE, tm.IMAGE), "normal")

MODELS: dict[str, ModelCase] = {case.name: case for case in (
    ModelCase("clip", "hf_models", "clip", ("vision", "text"), "dual-encoder",
              "stock HF CLIPModel (ViT + causal text transformer, contrastive logits, CLIPOutput)",
              (_ids(eos=hf.VOCAB - 1), _PIXELS, _MASK)),
    ModelCase("vilt", "hf_models", "vilt", ("vision", "text"), "early",
              "stock HF ViltForQuestionAnswering (patches + tokens in one transformer)",
              (_ids(), _MASK, Feed("token_type_ids", (hf.SEQ,), "zeros"), _PIXELS,
               Feed("pixel_mask", (hf.IMAGE, hf.IMAGE), "ones"))),
    ModelCase("clap", "hf_models", "clap", ("audio", "text"), "dual-encoder",
              "stock HF ClapModel (HTSAT audio on log-mel + RoBERTa text, contrastive)",
              (_ids(pad=1), Feed("input_features", (1, 64, 16), "normal"), Feed("is_longer", (1,), "false"),
               _MASK)),
    ModelCase("whisper_bert", "hf_models", "whisper_bert", ("audio", "text"), "dual-encoder",
              "HF Whisper encoder (log-mel) + HF BERT text, concatenated into a classifier; dict output",
              (Feed("input_features", (hf.WHISPER_MELS, hf.WHISPER_FRAMES), "normal"), _ids(), _MASK)),
    ModelCase("wav2vec2_text", "hf_models", "wav2vec2_text", ("audio", "text"), "dual-encoder",
              "HF Wav2Vec2 on the raw waveform + HF DistilBERT text; tuple output",
              (Feed("input_values", (hf.SAMPLE_RATE_SAMPLES,), "normal"), _ids(), _MASK)),
    ModelCase("videomae_text", "hf_models", "videomae_text", ("vision", "text"), "dual-encoder",
              "HF VideoMAE video tower + HF BERT text, CLIP-style video-text logits",
              (_VIDEO, _ids(), _MASK)),
    ModelCase("timesformer_text", "hf_models", "timesformer_text", ("vision", "text"), "dual-encoder",
              "HF TimeSformer video tower + HF DistilBERT text, classifier",
              (_VIDEO, _ids(), _MASK)),
    ModelCase("vit_distilbert_xattn", "hf_models", "vit_distilbert_xattn", ("vision", "text"), "cross-attention",
              "HF ViT patches + HF DistilBERT tokens joined by nn.MultiheadAttention cross-attention (VQA)",
              (_PIXELS, _ids(), _MASK)),
    ModelCase("convnext_bert", "hf_models", "convnext_bert", ("vision", "text"), "dual-encoder",
              "HF ConvNeXt image tower + HF BERT text (pooler outputs), similarity matrix",
              (_PIXELS, _ids(), _MASK, Feed("token_type_ids", (hf.SEQ,), "zeros"))),
    ModelCase("early_fusion_transformer", "torch_models", "early_fusion_transformer", ("vision", "text"), "early",
              "torch.nn: conv patches + token embeddings concatenated into one nn.TransformerEncoder",
              (_IMAGE, _ids(vocab=tm.VOCAB, seq=tm.SEQ))),
    ModelCase("conv_gru", "torch_models", "conv_gru", ("vision", "audio"), "dual-encoder",
              "torch.nn: conv+BatchNorm image tower + GRU over log-mel frames; pooled image features also output",
              (_IMAGE, Feed("audio", (tm.MELS, tm.AUDIO_FRAMES), "normal"))),
    ModelCase("kwonly_xattn", "torch_models", "kwonly_xattn", ("vision", "text"), "cross-attention",
              "torch.nn: keyword-only forward, LSTM text, nn.MultiheadAttention fusion, dict output keyed "
              "like a submodule (cls), same tensor twice, a None field",
              (_IMAGE, _ids(vocab=tm.VOCAB, seq=tm.SEQ), Feed("attention_mask", (tm.SEQ,), "mask")),
              keyword_only=True),
)}
