"""Zero-shot prompts for the zoo's dual encoder: one caption per class, as a camera doing CLIP-style
zero-shot classification would encode them once (``edgemm example dual-encoder`` writes them; the README's
split-bundle example classifies images against their cached embeddings).

``prompts.npz``: ``input_ids`` [classes, TEXT_LENGTH] int64 and ``labels`` [classes] int64 (the class id
``eval.npz``'s ``labels`` use); ``prompts.txt``: the texts, one per line, in the same order.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import vocab
from ._atomic import atomic_open
from .datasets import TEXT_LENGTH
from .shapes import COLORS, GRID_POSITIONS, SHAPES

PROMPT_FILES = ("prompts.npz", "prompts.txt")
# The first caption template of datasets._dual_encoder_sample; the label formula is the same.
TEMPLATE = "a {c} {s} in the {p}"


def zero_shot_prompts(name: str) -> tuple[list[str], np.ndarray, np.ndarray] | None:
    """(texts, input_ids, labels) for a zoo model that classifies against text prompts, else None."""
    if name != "dual-encoder":
        return None
    texts, labels = [], []
    for color, c in enumerate(COLORS):
        for shape, s in enumerate(SHAPES):
            for position, p in enumerate(GRID_POSITIONS):
                texts.append(TEMPLATE.format(c=c, s=s, p=p))
                labels.append((color * len(SHAPES) + shape) * len(GRID_POSITIONS) + position)
    ids = np.stack([vocab.encode(t, TEXT_LENGTH) for t in texts])
    return texts, ids, np.asarray(labels, dtype=np.int64)


def write_prompts(name: str, out_dir: Path) -> dict[str, Path]:
    """Write prompts.npz and prompts.txt for ``name`` (nothing for models without prompts)."""
    found = zero_shot_prompts(name)
    if found is None:
        return {}
    texts, ids, labels = found
    paths = {"prompts": Path(out_dir) / PROMPT_FILES[0], "prompt_texts": Path(out_dir) / PROMPT_FILES[1]}
    with atomic_open(paths["prompts"]) as handle:
        np.savez(handle, input_ids=ids, labels=labels)
    with atomic_open(paths["prompt_texts"]) as handle:
        handle.write(("\n".join(texts) + "\n").encode("utf-8"))
    return paths
