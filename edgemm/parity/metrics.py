"""Output-by-output comparison of a candidate (bundle) against a reference, accumulated over batches.

Batches are compared as they come (not concatenated) because some outputs are not stackable along
axis 0, e.g. CLIP's [B, B] similarity logits.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Mapping

import numpy as np


def is_logits(array: np.ndarray, made_by_head: bool | None = None) -> bool:
    """Class scores, whatever the output is called (parity/output_kinds.py): top-1 agreement applies."""
    from .output_kinds import SCORES, value_kind

    return value_kind(array, made_by_head) == SCORES


def per_sample_cosine(ref: np.ndarray, got: np.ndarray) -> np.ndarray:
    a = ref.reshape(ref.shape[0], -1).astype(np.float64) if ref.ndim else ref.reshape(1, 1).astype(np.float64)
    b = got.reshape(a.shape).astype(np.float64)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    dot = (a * b).sum(axis=1)
    both_zero = (na == 0) & (nb == 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where(both_zero, 1.0, dot / np.maximum(na * nb, 1e-30))
    return np.clip(cos, -1.0, 1.0)


@dataclass
class OutputParity:
    name: str
    max_abs_error: float = 0.0
    mean_abs_error: float = 0.0
    mean_cosine: float | None = None
    min_cosine: float | None = None
    top1_agreement: float | None = None
    exact_match: float | None = None      # integer/bool outputs
    samples: int = 0

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class _Acc:
    abs_max: float = 0.0
    abs_sum: float = 0.0
    count: int = 0
    cosines: list = field(default_factory=list)
    top1_hits: int = 0
    top1_total: int = 0
    exact_hits: int = 0
    exact_total: int = 0
    logits: bool = False
    samples: int = 0


class ParityAccumulator:
    """``heads``: output name -> whether the graph makes it with a linear head (output_kinds); each
    output's kind is decided once, on its first batch, and kept."""

    def __init__(self, heads: Mapping[str, bool] | None = None):
        self._acc: dict[str, _Acc] = {}
        self._heads = dict(heads or {})
        self.kinds: dict[str, bool] = {}

    def add(self, reference: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray]) -> None:
        for name, ref in reference.items():
            got = np.asarray(candidate[name])
            ref = np.asarray(ref)
            acc = self._acc.setdefault(name, _Acc())
            if got.shape != ref.shape:
                raise ValueError(f"output {name!r}: shape {got.shape} vs reference {ref.shape}")
            acc.samples += ref.shape[0] if ref.ndim else 1
            if ref.dtype.kind in "iub":
                acc.exact_hits += int((ref == got).sum())
                acc.exact_total += ref.size
                continue
            diff = np.abs(ref.astype(np.float64) - got.astype(np.float64))
            if diff.size:
                acc.abs_max = max(acc.abs_max, float(diff.max()))
                acc.abs_sum += float(diff.sum())
                acc.count += diff.size
            acc.cosines.append(per_sample_cosine(ref, got))
            if name not in self.kinds:
                self.kinds[name] = is_logits(ref, self._heads.get(name))
            if self.kinds[name]:
                acc.logits = True
                acc.top1_hits += int((ref.argmax(-1) == got.argmax(-1)).sum())
                acc.top1_total += int(np.prod(ref.shape[:-1]))

    def result(self) -> dict[str, OutputParity]:
        out = {}
        for name, acc in self._acc.items():
            p = OutputParity(name, samples=acc.samples)
            if acc.exact_total:
                p.exact_match = acc.exact_hits / acc.exact_total
            else:
                p.max_abs_error = acc.abs_max
                p.mean_abs_error = acc.abs_sum / max(acc.count, 1)
                cos = np.concatenate(acc.cosines) if acc.cosines else np.ones(1)
                p.mean_cosine = float(cos.mean())
                p.min_cosine = float(cos.min())
                if acc.logits:
                    p.top1_agreement = acc.top1_hits / max(acc.top1_total, 1)
            out[name] = p
        return out


def compare(reference: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray]) -> dict[str, OutputParity]:
    acc = ParityAccumulator()
    acc.add(reference, candidate)
    return acc.result()
