"""Procedural, seeded datasets for the zoo models (numpy only, no downloads).

Every sample ``i`` of a split is drawn from its own generator seeded with (model, split, i), so the
splits are disjoint streams, ``make(name, split, n)`` is a prefix of ``make(name, split, n + k)``, and
every run gives the same arrays (images are snapped to the 8-bit grid; audio goes through numpy's FFT). ``train`` and ``eval`` carry ``labels`` (int64 [N]); ``calib``
holds only the model inputs (what ``edgemm compile --calib`` expects).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from . import audio, shapes, vocab
from .shapes import COLORS, GRID_POSITIONS, POSITIONS, SHAPES

TEXT_LENGTH = 12

SPLITS = ("train", "calib", "eval")
DEFAULT_SIZES = {"train": 8192, "calib": 128, "eval": 512}
_SPLIT_SEEDS = {"train": 11, "calib": 23, "eval": 37}

# Answers of the VQA task, in label order.
ANSWERS: tuple[str, ...] = (*COLORS, *SHAPES, *POSITIONS, "yes", "no")
_VQA_OBJECTS = 2

# early-fusion: class = shape * len(PULSE_COUNTS) + rhythm; the image shows the shape, the clip's
# pulse count gives the rhythm, so neither modality alone can reach full accuracy.
N_FUSION_CLASSES = len(SHAPES) * len(audio.PULSE_COUNTS)
# Pitch register that goes with each shape (Hz) - a redundant cue, honoured in PITCH_FOLLOWS of clips.
_SHAPE_PITCH = (300.0, 450.0, 700.0, 1100.0)
_PITCH_FOLLOWS = 0.6

Sample = dict[str, np.ndarray | int]


def _dual_encoder_sample(rng: np.random.Generator) -> Sample:
    color, shape, position = (int(rng.integers(len(c))) for c in (COLORS, SHAPES, GRID_POSITIONS))
    canvas = shapes.background(rng)
    cx, cy = shapes.grid_centre(position, rng)
    shapes.paint(canvas, shape, color, cx, cy, shapes.random_radius(rng, 3.5, 6.0), rng)
    c, s, p = COLORS[color], SHAPES[shape], GRID_POSITIONS[position]
    templates = (
        f"a {c} {s} in the {p}",
        f"the {s} in the {p} is {c}",
        f"{p} : {c} {s}",
        f"there is a {c} {s} at the {p} of the picture",
    )
    caption = templates[int(rng.integers(len(templates)))]
    # The label is the caption's meaning: same (colour, shape, position) -> same label, whatever the wording.
    label = (color * len(SHAPES) + shape) * len(GRID_POSITIONS) + position
    return {"image": shapes.finish(canvas), "input_ids": vocab.encode(caption, TEXT_LENGTH), "labels": label}


def _cross_attention_sample(rng: np.random.Generator) -> Sample:
    # Two objects with distinct colours, shapes and quadrants: every question names exactly one object.
    colors = rng.choice(len(COLORS), size=_VQA_OBJECTS, replace=False)
    kinds = rng.choice(len(SHAPES), size=_VQA_OBJECTS, replace=False)
    places = rng.choice(len(POSITIONS), size=_VQA_OBJECTS, replace=False)
    canvas = shapes.background(rng)
    for color, shape, position in zip(colors, kinds, places):
        cx, cy = shapes.quadrant_centre(int(position), rng)
        shapes.paint(canvas, int(shape), int(color), cx, cy, shapes.random_radius(rng, 3.5, 6.0), rng)

    k = int(rng.integers(_VQA_OBJECTS))  # the object the question is about
    c, s = COLORS[colors[k]], SHAPES[kinds[k]]
    kind = int(rng.integers(4))
    if kind == 0:
        question, answer = f"what color is the {s} ?", c
    elif kind == 1:
        question, answer = f"what shape is the {c} one ?", s
    elif kind == 2:
        question, answer = f"where is the {c} {s} ?", POSITIONS[places[k]]
    else:
        present = {(int(a), int(b)) for a, b in zip(colors, kinds)}
        if rng.random() < 0.5:
            pair, answer = (int(colors[k]), int(kinds[k])), "yes"
        else:
            if rng.random() < 0.5:  # hard negative: colour of one object, shape of another
                other = (k + 1 + int(rng.integers(_VQA_OBJECTS - 1))) % _VQA_OBJECTS
                pair = (int(colors[k]), int(kinds[other]))
            else:
                absent = [(a, b) for a in range(len(COLORS)) for b in range(len(SHAPES)) if (a, b) not in present]
                pair = absent[int(rng.integers(len(absent)))]
            answer = "no"
        question = f"is there a {COLORS[pair[0]]} {SHAPES[pair[1]]} ?"
    return {"image": shapes.finish(canvas), "input_ids": vocab.encode(question, TEXT_LENGTH),
            "labels": ANSWERS.index(answer)}


def _early_fusion_sample(rng: np.random.Generator) -> Sample:
    shape = int(rng.integers(len(SHAPES)))
    rhythm = int(rng.integers(len(audio.PULSE_COUNTS)))
    canvas = shapes.background(rng)
    cx, cy = shapes.quadrant_centre(int(rng.integers(len(POSITIONS))), rng)
    shapes.paint(canvas, shape, int(rng.integers(len(COLORS))), cx, cy, shapes.random_radius(rng, 3.5, 6.0), rng)
    register = shape if rng.random() < _PITCH_FOLLOWS else int(rng.integers(len(_SHAPE_PITCH)))
    f0 = _SHAPE_PITCH[register] * rng.uniform(0.93, 1.07)
    wave = audio.pulsed_tone(rng, audio.PULSE_COUNTS[rhythm], f0)
    return {"image": shapes.finish(canvas), "audio": audio.log_mel(wave),
            "labels": shape * len(audio.PULSE_COUNTS) + rhythm}


_SAMPLERS: dict[str, tuple[int, Callable[[np.random.Generator], Sample]]] = {
    # name -> (model seed, sampler)
    "dual-encoder": (101, _dual_encoder_sample),
    "cross-attention": (202, _cross_attention_sample),
    "early-fusion": (303, _early_fusion_sample),
}


def make(name: str, split: str, n: int) -> dict[str, np.ndarray]:
    """Stack ``n`` samples of ``split``; ``labels`` dropped for ``calib``. Arguments already validated."""
    model_seed, sampler = _SAMPLERS[name]
    samples = [sampler(np.random.default_rng([model_seed, _SPLIT_SEEDS[split], i])) for i in range(n)]
    out = {key: np.stack([np.asarray(s[key]) for s in samples]) for key in samples[0]}
    out["labels"] = out["labels"].astype(np.int64)
    if split == "calib":
        del out["labels"]
    return out
