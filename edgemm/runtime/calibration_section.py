"""The manifest's ``calibration_profile`` section, typed for the runtime's drift monitor.

Written at compile time by ``edgemm.calibration_profile``; read here (standard library only), registered
with the manifest (``register_section``) so that a malformed profile is refused in one line when the
bundle loads. Not critical: a reader that ignores it runs the bundle correctly (it only cannot judge
drift), so older edgemm versions still load bundles that carry it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from .manifest import register_section

SECTION = "calibration_profile"


@dataclass(frozen=True)
class TensorProfile:
    """One input's (or FP32 output's) calibrated figures. ``low``/``high``: the calibrated range (None
    when the calibration had no finite value); ``vocab_size``: rows of the embedding table a token input
    indexes. ``entry``: every figure as written (percentiles, zero_fraction, coverage, ...)."""
    kind: str | None = None
    low: float | None = None
    high: float | None = None
    vocab_size: int | None = None
    entry: Mapping = field(default_factory=dict, repr=False)

    @property
    def has_range(self) -> bool:
        return self.low is not None and self.high is not None


@dataclass(frozen=True)
class CalibrationProfile:
    version: int
    samples: int
    inputs: Mapping[str, TensorProfile]
    outputs: Mapping[str, TensorProfile] | None = None


def token_rows(profile: "CalibrationProfile | None") -> dict[str, int]:
    """Token input name -> rows of the embedding table it indexes ({} without a profile)."""
    if profile is None:
        return {}
    return {name: p.vocab_size for name, p in profile.inputs.items() if p.vocab_size}


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _tensors(value: Any, bad, where: str) -> dict[str, TensorProfile]:
    if not isinstance(value, dict):
        raise bad(f"must be an object of tensor names, not {type(value).__name__}", where)
    out = {}
    for name, entry in value.items():
        here = f"{where}.{name}"
        if not isinstance(entry, dict):
            raise bad(f"must be an object, not {type(entry).__name__}", here)
        lo, hi, vocab = entry.get("min"), entry.get("max"), entry.get("vocab_size")
        if (lo is None) != (hi is None):
            raise bad("has one of min/max without the other", here)
        if lo is not None and not (_number(lo) and _number(hi) and lo <= hi):
            raise bad(f"min/max must be finite numbers with min <= max, not {str(lo)[:20]}/{str(hi)[:20]}", here)
        if vocab is not None and not (_count(vocab) and vocab > 0):
            raise bad(f"vocab_size must be a positive integer, not {str(vocab)[:20]!r}", here)
        kind = entry.get("kind")
        out[name] = TensorProfile(kind if isinstance(kind, str) else None,
                                  None if lo is None else float(lo), None if hi is None else float(hi),
                                  vocab, entry)
    return out


def parse(value: Any, bad) -> CalibrationProfile | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise bad(f"must be an object, not {type(value).__name__}")
    version, samples = value.get("version"), value.get("samples")
    if not (_count(version) and version >= 1):
        raise bad(f"version must be an integer >= 1, not {str(version)[:20]!r}", "version")
    if not _count(samples):
        raise bad(f"samples must be a count, not {str(samples)[:20]!r}", "samples")
    outputs = value.get("outputs")
    return CalibrationProfile(version, samples, _tensors(value.get("inputs"), bad, "inputs"),
                              None if outputs is None else _tensors(outputs, bad, "outputs"))


register_section(SECTION, parse)
