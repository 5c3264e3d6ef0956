"""The zoo's model cards: static facts about each reference model (no torch import).

``fp32_metric`` is not written here: it is read from ``weights/metrics.json``, which
``python -m edgemm.zoo.train`` writes next to the weights it produced, so the card always describes the
weights actually shipped.
"""

from __future__ import annotations

import importlib
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import InputError
from .audio import N_FRAMES, N_MELS
from .datasets import TEXT_LENGTH
from .shapes import IMAGE_SIZE

if TYPE_CHECKING:
    import torch

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
METRICS_FILE = WEIGHTS_DIR / "metrics.json"

InputSpec = tuple[str, tuple[int | str, ...], str]


@dataclass(frozen=True)
class ZooModel:
    name: str
    fusion: str
    description: str
    inputs: tuple[InputSpec, ...]  # (name, shape with "batch" as first dim, dtype)
    outputs: tuple[str, ...]
    metric: str  # "recall@1" | "top1"
    metric_outputs: tuple[str, ...]  # the outputs the metric reads
    fp32_metric: float  # percent, recorded at training time; NaN when no weights were trained yet

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(spec[0] for spec in self.inputs)


_IMAGE: InputSpec = ("image", ("batch", 3, IMAGE_SIZE, IMAGE_SIZE), "float32")
_TEXT: InputSpec = ("input_ids", ("batch", TEXT_LENGTH), "int64")
_AUDIO: InputSpec = ("audio", ("batch", N_MELS, N_FRAMES), "float32")

_CARDS: dict[str, ZooModel] = {
    card.name: card for card in (
        ZooModel("dual-encoder", "late", "CLIP-style dual encoder (ViT image + transformer text), "
                 "contrastive; image->text retrieval of shape captions", (_IMAGE, _TEXT),
                 ("image_embeds", "text_embeds", "logits_per_image"), "recall@1",
                 ("image_embeds", "text_embeds"), math.nan),
        ZooModel("cross-attention", "cross-attention", "VQA-style: question tokens cross-attend to image "
                 "patches; answers questions about colours, shapes and positions", (_IMAGE, _TEXT),
                 ("logits",), "top1", ("logits",), math.nan),
        ZooModel("early-fusion", "early", "audio (log-mel, 1-D convs) + image (2-D convs) concatenated "
                 "into a classifier; shape from the image, rhythm from the audio", (_IMAGE, _AUDIO),
                 ("logits",), "top1", ("logits",), math.nan),
    )
}

# name -> module under edgemm.zoo defining build() and loss()
MODULES = {"dual-encoder": "dual_encoder", "cross-attention": "cross_attention", "early-fusion": "early_fusion"}


def names() -> list[str]:
    return list(_CARDS)


def check_name(name: str) -> str:
    if name not in _CARDS:
        raise InputError(f"unknown zoo model {name!r}", field="name", fix=f"use one of {', '.join(_CARDS)}")
    return name


def recorded_metrics() -> dict[str, dict]:
    """Contents of weights/metrics.json ({} when absent)."""
    try:
        return json.loads(METRICS_FILE.read_text())
    except FileNotFoundError:
        return {}


def card(name: str) -> ZooModel:
    entry = recorded_metrics().get(check_name(name), {})
    return replace(_CARDS[name], fp32_metric=float(entry.get("fp32_metric", math.nan)))


def weights_path(name: str) -> Path:
    return WEIGHTS_DIR / f"{check_name(name)}.safetensors"


def build(name: str, pretrained: bool = True) -> "torch.nn.Module":
    """A fresh module in eval mode, with the shipped weights unless ``pretrained=False``."""
    module = importlib.import_module(f"{__package__}.{MODULES[check_name(name)]}")
    model = module.build()
    if pretrained:
        path = weights_path(name)
        if not path.is_file():
            raise InputError("shipped weights are missing", file=path,
                             fix=f"run `python -m edgemm.zoo.train --name {name}` or reinstall edgemm")
        from safetensors.torch import load_file

        model.load_state_dict(load_file(path), strict=True)
    return model.eval()
