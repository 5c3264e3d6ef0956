"""The precision vocabulary: one table of the modes edgemm knows, and one ``Precision`` value for what a
bundle was built in (one mode, or several when branches or layers differ).

Everything that names a precision reads it here: the compile config (which modes a whole model can be
built in), target profiles (which names a device may list), per-branch policies (quant/mixed.py), the
verification bars (parity/thresholds.py) and the baseline gate's tolerances (parity/gate/tolerances.py).

Standard library only: the torch-free runtime reads a bundle's precision through this module.

Adding a precision mode (say ``int4``) touches this file and one quant module:
1. a row in ``TABLE`` below: its place in ``ORDER`` (by expected error, lowest first), its default
   verification bars and gate drift, whether it is quantized (needs calibration) and whether a whole
   model can be built in it (``uniform``: the compile config accepts ``--precision int4``);
2. the module that builds it, ``edgemm/quant/<mode>.py``, registered in ``quant.RECIPES`` under
   (backend, "int4") for each backend that can build it.
Targets then list it in their profile's ``precisions``; nothing else compares precision names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping

from .errors import InputError

__all__ = ["PrecisionSpec", "TABLE", "ORDER", "NAMES", "UNIFORM", "QUANTIZED", "LOW_FLOATS", "Precision", "spec",
           "check_name", "parse", "label_of"]


@dataclass(frozen=True)
class PrecisionSpec:
    """One precision mode and its defaults."""

    name: str
    min_cosine: float          # verification: mean per-sample cosine vs the reference, every float output
    min_top1_agreement: float  # verification: argmax agreement of class-score outputs
    max_metric_drop: float     # verification: task-metric drop, percentage points
    max_abs_rel: float         # baseline gate: max |now - golden| / max |golden| between two runs
    score_noise: float = 0.0   # typical |error| a score gets in this precision, as a fraction of its row's
    #                            max |score|: top-1 skips samples whose reference top-2 margin is within 4x
    #                            of it (near-ties, parity/metrics.py:Top1Count)
    quantized: bool = False    # needs calibration data (edgemm never calibrates on random data)
    uniform: bool = True       # a whole model can be built in it (--int8, --fp16 ...); else per branch only
    label: str = ""            # how the CLI and reports describe it


# Lowest expected error first; a mixed build is judged by its lowest-precision part (the last one here).
# bf16 sits after fp16: 8 significand bits against fp16's 11, so the same graph drifts further from FP32.
# Measured here (BERT-style 4-layer encoder, random init, 64 samples, torch CPU): fp16 cosine 0.9999993,
# max |err|/max|ref| 0.0014; bf16 cosine 0.99995, max |err|/max|ref| 0.0098, top-1 0.984 (7x the fp16 drift).
# Its bars sit between fp16's and int8's for that reason.
# score_noise: INT8 measured here (ORT static INT8 of random-init HF CLIP and VideoMAE+BERT, 32 held-out
# samples): per-row std of the error / the row's max |score| had medians 0.003-0.019 over 16 outputs, so
# 0.01; FP8 E4M3 keeps 3 significand bits (INT8 ~7 at a tensor's max), so twice that; fp16/bf16 from the
# drift figures above; fp32 only reorders sums.
TABLE: dict[str, PrecisionSpec] = {s.name: s for s in (
    PrecisionSpec("fp32", 0.9999, 0.99, 0.5, 0.01, 1e-6, label="full precision"),
    PrecisionSpec("fp16", 0.999, 0.98, 1.0, 0.02, 5e-4, label="half precision"),
    PrecisionSpec("bf16", 0.998, 0.97, 1.0, 0.04, 4e-3, uniform=False, label="bfloat16 (per branch, TensorRT)"),
    PrecisionSpec("int8", 0.99, 0.95, 1.0, 0.05, 0.01, quantized=True, label="INT8, calibrated"),
    PrecisionSpec("fp8", 0.98, 0.90, 2.0, 0.1, 0.02, quantized=True, label="FP8 E4M3 (TensorRT, CC >= 8.9)"),
)}
ORDER: tuple[str, ...] = tuple(TABLE)
NAMES = ORDER
UNIFORM: tuple[str, ...] = tuple(n for n, s in TABLE.items() if s.uniform)
QUANTIZED: tuple[str, ...] = tuple(n for n, s in TABLE.items() if s.quantized)
LOW_FLOATS: tuple[str, ...] = tuple(n for n, s in TABLE.items() if not s.quantized and n != "fp32")  # fp16, bf16
MIXED = "mixed"


def spec(name: str) -> PrecisionSpec:
    return TABLE[check_name(name)]


def check_name(name, *, field: str = "precision", allowed: Iterable[str] | None = None) -> str:
    """``name`` if it is a known precision (and in ``allowed`` when given), else a one-line InputError."""
    choices = tuple(allowed) if allowed is not None else ORDER
    if not isinstance(name, str) or name not in choices:
        raise InputError(f"unknown precision {name!r}", field=field, fix=f"use one of {', '.join(choices)}")
    return name


def _rank(name: str) -> int:
    return ORDER.index(name)


@dataclass(frozen=True)
class Precision:
    """What a model is built in: ``parts`` (its precisions, lowest error first, no repeats) and, for a
    per-branch build, ``per_branch`` (branch -> the precision it was built in).

    The manifest stores ``to_manifest()``: ``{"mode": "int8"}`` or
    ``{"mode": "mixed", "precisions": ["fp32", "int8"], "per_branch": {"vision": "int8", ...}}``; bundles
    and baselines written before it hold ``"mixed:fp32+int8"`` as the mode, which ``parse`` still reads.
    """

    parts: tuple[str, ...]
    per_branch: Mapping[str, str] | None = field(default=None, compare=False)

    def __post_init__(self):
        parts = tuple(sorted(set(self.parts), key=_rank)) if self.parts else ()
        if not parts:
            raise InputError("a precision names at least one mode", field="precision", fix="e.g. fp32")
        object.__setattr__(self, "parts", parts)
        if self.per_branch is not None:
            object.__setattr__(self, "per_branch", dict(self.per_branch))

    @classmethod
    def of(cls, precisions: Iterable[str], per_branch: Mapping[str, str] | None = None) -> "Precision":
        names = [check_name(p) for p in precisions]
        return cls(tuple(names), per_branch)

    @property
    def mixed(self) -> bool:
        return len(self.parts) > 1

    @property
    def mode(self) -> str:
        """The manifest's ``mode``: the one precision, or "mixed"."""
        return MIXED if self.mixed else self.parts[0]

    @property
    def lowest(self) -> str:
        """The part with the largest expected error: the one whose bars a mixed build is judged by."""
        return self.parts[-1]

    @property
    def spec(self) -> PrecisionSpec:
        return TABLE[self.lowest]

    @property
    def label(self) -> str:
        """One word for reports and baseline contexts: "int8", "mixed:fp32+int8" (the form bundles
        before the structured mode stored, so baselines recorded then still match)."""
        return self.mode if not self.mixed else MIXED + ":" + "+".join(self.parts)

    def includes(self, name: str) -> bool:
        return check_name(name) in self.parts

    def __str__(self) -> str:
        return self.label

    def to_manifest(self) -> dict:
        out: dict = {"mode": self.mode}
        if self.mixed:
            out["precisions"] = list(self.parts)
        if self.per_branch:
            out["per_branch"] = dict(self.per_branch)
        return out


def parse(value, *, field: str = "precision.mode") -> Precision:
    """A ``Precision`` from what a manifest, baseline, report or caller holds: a ``Precision``; a name
    ("int8"); the older text form "mixed:fp32+int8"; or the manifest's precision section
    ({"mode": "mixed", "precisions": [...], "per_branch": {...}}, extra keys such as "recipe" ignored)."""
    if isinstance(value, Precision):
        return value
    if isinstance(value, Mapping):
        mode = value.get("mode")
        if isinstance(mode, Mapping):  # a structured mode nested one level down
            return parse(mode, field=field)
        per_branch = value.get("per_branch")
        if per_branch is not None and not (isinstance(per_branch, Mapping) and all(
                isinstance(k, str) and isinstance(v, str) and v in TABLE for k, v in per_branch.items())):
            raise InputError("must map branch names to precisions", field=field.rpartition(".")[0] + ".per_branch"
                             if "." in field else "per_branch", fix="recompile the bundle")
        if mode == MIXED:
            parts = value.get("precisions")
            if parts is None and per_branch:
                parts = list(per_branch.values())
            if not isinstance(parts, list) or not parts or not all(isinstance(p, str) for p in parts):
                raise InputError("a mixed precision lists its precisions", field=field,
                                 fix="recompile the bundle")
            return Precision(tuple(_known(p, field) for p in parts), per_branch)
        return Precision(parse(mode, field=field).parts, per_branch)
    if isinstance(value, str) and value.startswith(MIXED + ":"):  # the text form of older bundles
        return Precision(tuple(_known(p.strip(), field) for p in value[len(MIXED) + 1:].split("+")))
    return Precision((_known(value, field),))


def _known(name, field: str) -> str:
    if not isinstance(name, str) or name not in TABLE:
        raise InputError(f"unknown precision {name!r}", field=field,
                         fix=f"known precisions: {', '.join(ORDER)}; recompile the bundle with this edgemm")
    return name


def label_of(value) -> str | None:
    """``parse(value).label`` for display and for comparing recorded precisions (a baseline of an older
    bundle holds "mixed:fp32+int8", a newer manifest the structured section: the same label). A value
    this edgemm does not know is shown as written, never raised on: the checks that depend on it
    (thresholds, tolerances) call ``parse`` and refuse it there."""
    if value is None:
        return None
    try:
        return parse(value).label
    except InputError:
        return str(value.get("mode") if isinstance(value, Mapping) else value)
