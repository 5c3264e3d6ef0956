"""Which modality each model input carries, and which branch (vision / text / audio / fusion) a piece of
the model belongs to: one classifier for per-branch precision (``quant/branches.py``, ONNX graphs), per-branch
pruning and recovery (``prune/branches.py``, torch modules) and the accuracy search.

An input's modality comes from its name *and* its dtype/rank/shape:

- names: ``input_ids``/``token_type_ids`` text, ``pixel_values``/``image`` vision, ``input_values``
  (Wav2Vec2's waveform) and ``input_features`` (Whisper's log-mel) audio, ...; a name that says two things,
  or nothing, falls through to the shape;
- shapes: integer ``[B, T]`` token ids are text; float ``[B, C, H, W]`` is an image and ``[B, C, T, H, W]`` /
  ``[B, T, C, H, W]`` a video (both the ``vision`` branch); float ``[B, T]`` or ``[B, 1, T]`` a waveform and
  ``[B, F, T]`` / ``[B, T, F]`` a spectrogram (``audio``);
- masks (``attention_mask``, ``padding_mask``, bool tensors) have no modality of their own: they belong to
  the branch of the input they are first combined with (the ids they accompany), found from the data flow,
  or failing that to the input whose leading dims they share.

Branches then come from the data flow: a node (or module) reached by one modality belongs to that branch,
one where two or more meet is ``fusion``. A model fed by one modality has no fusion part.

Standard library only (numpy and onnx dtypes are read by name).
"""

from __future__ import annotations

import re
from typing import Iterable, Mapping, Sequence

MODALITIES = ("vision", "text", "audio")
FUSION = "fusion"
BRANCHES = MODALITIES + (FUSION,)

# Whole input names (lower-case) whose modality is settled by convention, checked before keywords.
_EXACT = {
    "input_ids": "text", "token_type_ids": "text", "position_ids": "text", "decoder_input_ids": "text",
    "inputs_embeds": "text", "pixel_values": "vision", "pixel_values_videos": "vision",
    "input_values": "audio", "input_features": "audio",
}
_KEYWORDS = {
    "vision": ("image", "images", "img", "imgs", "pixel", "pixels", "vision", "visual", "video", "videos", "frame",
               "frames", "rgb", "photo", "picture", "patch", "patches", "camera"),
    "text": ("ids", "token", "tokens", "text", "texts", "caption", "captions", "question", "prompt", "words",
             "word", "sentence", "query", "lang", "language", "bert"),
    "audio": ("audio", "mel", "mels", "spectrogram", "spectro", "wave", "waveform", "wav", "speech", "fbank",
              "sound", "mfcc", "voice"),
}
_MASK_WORDS = ("mask", "masks", "padding", "lengths", "length")
_MIN_WAVEFORM = 100   # a float [B, N] input shorter than this is a feature vector, not a waveform


def _parts(name: str) -> set[str]:
    return {p for p in re.split(r"[^a-z0-9]+", name.lower()) if p}


def name_modality(name: str) -> str | None:
    """vision / text / audio when the name says one of them (and only one), else None."""
    low = name.lower()
    if low in _EXACT:
        return _EXACT[low]
    parts = _parts(name)
    hits = {m for m, words in _KEYWORDS.items() if parts & set(words)}
    return hits.pop() if len(hits) == 1 else None


def is_mask(name: str, dtype=None) -> bool:
    """Attention/padding masks and lengths: they carry no modality of their own."""
    return _kind(dtype) == "bool" or (bool(_parts(name) & set(_MASK_WORDS)) and name_modality(name) is None)


def input_modality(name: str, dtype=None, shape: Sequence | None = None) -> str | None:
    """The modality of one input from its name, else its dtype and shape (see the module doc); None for
    masks and inputs nothing identifies. ``dtype``: numpy dtype, dtype name or ONNX elem_type;
    ``shape``: dims as ints or symbols (the batch included)."""
    if is_mask(name, dtype):
        return name_modality(name)  # "pixel_mask": vision; "attention_mask": None (its companion's)
    by_name = name_modality(name)
    if by_name:
        return by_name
    kind, rank = _kind(dtype), None if shape is None else len(shape)
    last = shape[-1] if shape else None
    if kind == "int":
        if rank is not None and rank >= 4:
            return "vision"  # uint8 images
        return "text"
    if kind == "float" and rank is not None:
        if rank in (4, 5):
            return "vision"
        if rank == 3:
            return "audio"  # [B, 1, T] waveform, [B, F, T] / [B, T, F] spectrogram
        if rank == 2 and not (isinstance(last, int) and 0 < last < _MIN_WAVEFORM):
            return "audio"  # [B, T] waveform
    return None


def resolve_inputs(inputs: Mapping[str, tuple], meets: Iterable[Iterable[str]] | None = None) -> dict[str, str | None]:
    """Input name -> modality for every input of a model. ``inputs``: name -> (dtype, shape).

    ``meets``: the sets of inputs that reach each node/module together (from the data flow). An input
    the classifier cannot place (a mask, an unnamed extra) takes the modality it is first combined with:
    of the sets holding it, the ones with the fewest known modalities; when those name exactly one. Without
    a data flow (or when it meets several at once), a mask takes the input whose leading dims it shares."""
    guess = {n: input_modality(n, *spec) for n, spec in inputs.items()}
    sets = [frozenset(s) for s in meets] if meets is not None else []
    for name, modality in list(guess.items()):
        if modality is not None:
            continue
        first = _first_met(name, sets, guess)
        if first is None and is_mask(name, inputs[name][0]):
            first = _companion(name, inputs, guess)
        guess[name] = first
    return guess


def _first_met(name: str, sets: list[frozenset], guess: Mapping[str, str | None]) -> str | None:
    seen = [{guess[i] for i in s if guess.get(i)} for s in sets if name in s]
    seen = [s for s in seen if s]
    if not seen:
        return None
    fewest = min(len(s) for s in seen)
    firsts = {frozenset(s) for s in seen if len(s) == fewest}
    if len(firsts) == 1 and fewest == 1:
        return next(iter(next(iter(firsts))))
    return None


def _companion(name: str, inputs: Mapping[str, tuple], guess: Mapping[str, str | None]) -> str | None:
    """The modality of the inputs sharing this mask's leading dims ([B, T] ids for a [B, T] mask)."""
    shape = inputs[name][1]
    known = {m for m in guess.values() if m}
    if shape is None:  # no shapes to match: the tokenizer's attention_mask is the common case
        return next(iter(known)) if len(known) == 1 else "text" if "text" in known else None
    matches = set()
    for other, (_dtype, other_shape) in inputs.items():
        if other == name or not guess.get(other) or other_shape is None:
            continue
        n = min(len(shape), len(other_shape))
        if n >= 2 and list(shape[:n]) == list(other_shape[:n]) and all(isinstance(d, (int, str)) for d in shape[:n]):
            matches.add(guess[other])
    if len(matches) == 1:
        return matches.pop()
    if len(known) == 1:
        return next(iter(known))
    return None


def branch_label(inputs_reaching: Iterable[str], modality: Mapping[str, str | None],
                 single: str | None = None) -> str | None:
    """The branch of something the given inputs reach: their one modality, ``fusion`` where two or more
    meet, None when no input of known modality reaches it. ``single``: the model's only modality (see
    ``single_modality``): then nothing is fusion."""
    found = {modality.get(i) for i in inputs_reaching} - {None}
    if not found:
        return None
    if single is not None:
        return single
    return found.pop() if len(found) == 1 else FUSION


def single_modality(modality: Mapping[str, str | None]) -> str | None:
    """The model's modality when all its placed inputs share one (a text-only model), else None."""
    found = {m for m in modality.values() if m}
    return found.pop() if len(found) == 1 else None


def order_branches(names: Iterable[str]) -> list[str]:
    """vision, text, audio, other labels alphabetically, fusion last."""
    rank = {b: i for i, b in enumerate(MODALITIES)}
    return sorted(set(names), key=lambda b: (b == FUSION, rank.get(b, len(rank)), b))


def _kind(dtype) -> str | None:
    """"int" / "float" / "bool" for a numpy dtype, a dtype name or an ONNX TensorProto elem_type."""
    if dtype is None:
        return None
    if isinstance(dtype, int) and not isinstance(dtype, bool):
        # onnx.TensorProto: FLOAT 1, UINT8 2, INT8 3, UINT16 4, INT16 5, INT32 6, INT64 7, BOOL 9,
        # FLOAT16 10, DOUBLE 11, UINT32 12, UINT64 13, BFLOAT16 16, FLOAT8* 17-20
        if dtype == 9:
            return "bool"
        if dtype in (1, 10, 11, 16, 17, 18, 19, 20):
            return "float"
        if dtype in (2, 3, 4, 5, 6, 7, 12, 13):
            return "int"
        return None
    text = str(getattr(dtype, "name", dtype)).lower().replace("torch.", "")
    if text.startswith("bool"):
        return "bool"
    if "float" in text or text in ("half", "double") or text.startswith("bfloat"):
        return "float"
    if "int" in text:
        return "int"
    return None
