"""A tiny word-level tokenizer for the zoo's captions and questions.

Hand-written on purpose: the language is a closed, generated vocabulary of ~40 words, so a subword
tokenizer library would add a dependency and nothing else. Id 0 is padding (models derive their
attention mask from ``input_ids != 0``), id 1 is unknown.
"""

from __future__ import annotations

import numpy as np

from .shapes import COLORS, GRID_POSITIONS, POSITIONS, SHAPES

PAD_ID = 0
UNK_ID = 1

_WORDS = (
    "<pad>", "<unk>",
    "a", "the", "is", "there", "in", "at", "of", "on", "one", "object", "what", "which", "where",
    "color", "shape", "picture", "image", ":", "?",
    *COLORS, *SHAPES,
    *sorted({word for position in POSITIONS + GRID_POSITIONS for word in position.split()}),
)
WORDS: tuple[str, ...] = tuple(dict.fromkeys(_WORDS))  # keep order, drop accidental duplicates
_IDS = {word: i for i, word in enumerate(WORDS)}
VOCAB_SIZE = len(WORDS)


def encode(text: str, length: int) -> np.ndarray:
    """Token ids int64 [length]: whitespace words, unknown words -> UNK_ID, right-padded with PAD_ID."""
    ids = [_IDS.get(word, UNK_ID) for word in text.lower().split()][:length]
    out = np.full(length, PAD_ID, dtype=np.int64)
    out[:len(ids)] = ids
    return out


def decode(ids: np.ndarray) -> str:
    return " ".join(WORDS[int(i)] for i in ids if int(i) != PAD_ID)
