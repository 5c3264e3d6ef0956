"""Fused models built from stock Hugging Face `transformers` classes, tiny and randomly initialised.

Each factory takes no argument, seeds torch and returns the model as its author would hand it over (not
in eval mode: edgemm must force that). Never downloads anything: every model is built from a config.
"""

from __future__ import annotations

import torch
from torch import nn

VOCAB = 100
SEQ = 8
HIDDEN = 32
IMAGE = 32
PATCH = 8
SAMPLE_RATE_SAMPLES = 1600  # Wav2Vec2 raw waveform length (0.1 s at 16 kHz)
WHISPER_MELS = 16
WHISPER_FRAMES = 32  # = 2 * max_source_positions
FRAMES = 4  # video frames
CLASSES = 5


def _text_kwargs() -> dict:
    return dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=64, max_position_embeddings=32)


def _bert(**extra):
    from transformers import BertConfig, BertModel

    return BertModel(BertConfig(**_text_kwargs(), type_vocab_size=2, **extra))


def _distilbert():
    from transformers import DistilBertConfig, DistilBertModel

    return DistilBertModel(DistilBertConfig(vocab_size=VOCAB, dim=HIDDEN, n_layers=2, n_heads=2, hidden_dim=64,
                                            max_position_embeddings=32))


def clip() -> nn.Module:
    """Stock `CLIPModel` (dual encoder, contrastive logits), as `CLIPModel(CLIPConfig(...))`."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    text = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=SEQ, eos_token_id=VOCAB - 1)
    vision = dict(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=IMAGE, patch_size=PATCH)
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))


def vilt() -> nn.Module:
    """Stock `ViltForQuestionAnswering` (single-stream early fusion of patches and tokens)."""
    from transformers import ViltConfig, ViltForQuestionAnswering

    torch.manual_seed(0)
    config = ViltConfig(**_text_kwargs(), image_size=IMAGE, patch_size=PATCH, max_image_length=-1,
                        num_labels=CLASSES, modality_type_vocab_size=2)
    return ViltForQuestionAnswering(config)


def clap() -> nn.Module:
    """Stock `ClapModel` (audio HTSAT + RoBERTa text, contrastive)."""
    from transformers import ClapAudioConfig, ClapConfig, ClapModel, ClapTextConfig

    torch.manual_seed(0)
    text = ClapTextConfig(**_text_kwargs(), pad_token_id=1, projection_dim=16)
    audio = ClapAudioConfig(spec_size=32, num_mel_bins=16, patch_size=4, patch_stride=(4, 4), window_size=4,
                            hidden_size=32, patch_embeds_hidden_size=16, depths=[1, 1], num_attention_heads=[2, 2],
                            enable_fusion=False, projection_dim=16, projection_hidden_size=32)
    return ClapModel(ClapConfig(text_config=text.to_dict(), audio_config=audio.to_dict(), projection_dim=16))


class _ProjectedFusion(nn.Module):
    """A two-tower head: project both pooled embeddings, concatenate, classify."""

    def __init__(self, dim_a: int, dim_b: int, classes: int = CLASSES):
        super().__init__()
        self.proj_a = nn.Linear(dim_a, HIDDEN)
        self.proj_b = nn.Linear(dim_b, HIDDEN)
        self.classifier = nn.Sequential(nn.Linear(2 * HIDDEN, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, classes))

    def forward(self, a, b):
        return self.classifier(torch.cat([self.proj_a(a), self.proj_b(b)], dim=-1))


class WhisperBert(nn.Module):
    """Whisper encoder on log-mel features + BERT on a transcript/prompt; pooled embeddings fused."""

    def __init__(self):
        super().__init__()
        from transformers import WhisperConfig, WhisperModel

        config = WhisperConfig(vocab_size=VOCAB, num_mel_bins=WHISPER_MELS, d_model=HIDDEN, encoder_layers=2,
                               encoder_attention_heads=2, encoder_ffn_dim=64, decoder_layers=1,
                               decoder_attention_heads=2, decoder_ffn_dim=64,
                               max_source_positions=WHISPER_FRAMES // 2, max_target_positions=16, pad_token_id=0,
                               bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
        self.audio_encoder = WhisperModel(config).get_encoder()
        self.text_encoder = _bert()
        self.head = _ProjectedFusion(HIDDEN, HIDDEN)

    def forward(self, input_features, input_ids, attention_mask):
        audio = self.audio_encoder(input_features).last_hidden_state.mean(1)
        text = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        return {"logits": self.head(audio, text), "audio_embeds": audio, "text_embeds": text}


def whisper_bert() -> nn.Module:
    torch.manual_seed(0)
    return WhisperBert()


class Wav2Vec2Text(nn.Module):
    """Wav2Vec2 on the raw waveform (`input_values`) + DistilBERT text; returns a tuple."""

    def __init__(self):
        super().__init__()
        from transformers import Wav2Vec2Config, Wav2Vec2Model

        config = Wav2Vec2Config(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64, conv_dim=(16, 16, 16), conv_stride=(5, 4, 4),
                                conv_kernel=(10, 4, 4), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
                                do_stable_layer_norm=True, feat_extract_norm="layer")
        self.speech = Wav2Vec2Model(config)
        self.text = _distilbert()
        self.head = _ProjectedFusion(HIDDEN, HIDDEN)

    def forward(self, input_values, input_ids, attention_mask):
        speech = self.speech(input_values).last_hidden_state.mean(1)
        text = self.text(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, 0]
        return self.head(speech, text), speech


def wav2vec2_text() -> nn.Module:
    torch.manual_seed(0)
    return Wav2Vec2Text()


class VideoMAEText(nn.Module):
    """VideoMAE video tower + BERT text, CLIP-style contrastive logits (video-text retrieval)."""

    def __init__(self):
        super().__init__()
        from transformers import VideoMAEConfig, VideoMAEModel

        config = VideoMAEConfig(image_size=IMAGE, patch_size=PATCH, num_frames=FRAMES, tubelet_size=2,
                                hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
        self.video = VideoMAEModel(config)
        self.text = _bert()
        self.video_proj = nn.Linear(HIDDEN, 16, bias=False)
        self.text_proj = nn.Linear(HIDDEN, 16, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(2.6592))

    def forward(self, pixel_values, input_ids, attention_mask):
        video = self.video_proj(self.video(pixel_values).last_hidden_state.mean(1))
        text = self.text_proj(self.text(input_ids=input_ids, attention_mask=attention_mask).pooler_output)
        video = video / video.norm(dim=-1, keepdim=True)
        text = text / text.norm(dim=-1, keepdim=True)
        return {"video_embeds": video, "text_embeds": text,
                "logits_per_video": self.logit_scale.exp() * video @ text.t()}


def videomae_text() -> nn.Module:
    torch.manual_seed(0)
    return VideoMAEText()


class TimesformerText(nn.Module):
    """TimeSformer video tower + DistilBERT text, classifier head."""

    def __init__(self):
        super().__init__()
        from transformers import TimesformerConfig, TimesformerModel

        config = TimesformerConfig(image_size=IMAGE, patch_size=PATCH, num_frames=FRAMES, hidden_size=HIDDEN,
                                   num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
        self.video = TimesformerModel(config)
        self.text = _distilbert()
        self.head = _ProjectedFusion(HIDDEN, HIDDEN)

    def forward(self, pixel_values, input_ids, attention_mask):
        video = self.video(pixel_values).last_hidden_state[:, 0]
        text = self.text(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, 0]
        return {"logits": self.head(video, text)}


def timesformer_text() -> nn.Module:
    torch.manual_seed(0)
    return TimesformerText()


class ViTDistilBertCrossAttention(nn.Module):
    """Text tokens (DistilBERT) cross-attend to image patches (ViT) through nn.MultiheadAttention (VQA)."""

    def __init__(self):
        super().__init__()
        from transformers import ViTConfig, ViTModel

        self.vision = ViTModel(ViTConfig(image_size=IMAGE, patch_size=PATCH, hidden_size=HIDDEN, num_hidden_layers=2,
                                         num_attention_heads=2, intermediate_size=64), add_pooling_layer=False)
        self.text = _distilbert()
        self.cross = nn.MultiheadAttention(HIDDEN, 2, batch_first=True)
        self.norm = nn.LayerNorm(HIDDEN)
        self.classifier = nn.Linear(HIDDEN, CLASSES)

    def forward(self, pixel_values, input_ids, attention_mask):
        patches = self.vision(pixel_values=pixel_values).last_hidden_state
        tokens = self.text(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        attended, _ = self.cross(tokens, patches, patches, need_weights=False)
        fused = self.norm(tokens + attended)
        return self.classifier(fused[:, 0])


def vit_distilbert_xattn() -> nn.Module:
    torch.manual_seed(0)
    return ViTDistilBertCrossAttention()


class ConvNextBert(nn.Module):
    """ConvNeXt image tower + BERT text tower, dual encoder returning both (L2-normalised) embeddings and
    their cosine-similarity matrix."""

    def __init__(self):
        super().__init__()
        from transformers import ConvNextConfig, ConvNextModel

        self.image_encoder = ConvNextModel(ConvNextConfig(num_channels=3, hidden_sizes=[16, 32], depths=[1, 1],
                                                          patch_size=4, num_stages=2))
        self.text_encoder = _bert()
        self.image_proj = nn.Linear(32, 16)
        self.text_proj = nn.Linear(HIDDEN, 16)

    def forward(self, pixel_values, input_ids, attention_mask, token_type_ids):
        image = self.image_proj(self.image_encoder(pixel_values).pooler_output)
        text = self.text_proj(self.text_encoder(input_ids=input_ids, attention_mask=attention_mask,
                                                token_type_ids=token_type_ids).pooler_output)
        image = nn.functional.normalize(image, dim=-1)
        text = nn.functional.normalize(text, dim=-1)
        return {"image_embeds": image, "text_embeds": text, "similarity": image @ text.t()}


def convnext_bert() -> nn.Module:
    torch.manual_seed(0)
    return ConvNextBert()
