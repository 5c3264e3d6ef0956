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


# Top-1 agreement is judged on decisive samples only. A sample (a row: every axis but the last) is a
# near-tie when the reference's top-2 margin is within NEAR_TIE_NOISES x the precision's score noise
# (precision.PrecisionSpec.score_noise, a fraction of the row's largest |score|): there a flip is the
# precision's rounding, not a changed decision (random-init [B, B] similarity rows are nearly constant).
# The noise is the precision's, never this bundle's own error: a broken bundle's error would otherwise
# turn every sample into a near-tie and excuse itself. Fewer than MIN_DECISIVE decisive samples (and not
# all of them decisive): top-1 parity is not claimed, and the report says so.
NEAR_TIE_NOISES = 4.0
MIN_DECISIVE = 10


@dataclass
class Top1Count:
    """Top-1 agreement of a class-score output, accumulated over batches (the one implementation: verify,
    compile's parity gate, the baseline gate and the INT8 recipe search all count with it)."""

    score_noise: float = 0.0  # relative to the row's max |score|; 0: only exact ties are near-ties
    hits: int = 0             # decisive samples whose argmax agrees
    decisive: int = 0
    samples: int = 0
    all_hits: int = 0         # every sample whose argmax agrees, near-ties included

    def add(self, ref: np.ndarray, got: np.ndarray) -> None:
        ref, got = np.asarray(ref), np.asarray(got)
        if not ref.size:
            return
        a = ref.reshape(-1, ref.shape[-1]).astype(np.float64)
        b = got.reshape(a.shape).astype(np.float64)
        agree = a.argmax(-1) == b.argmax(-1)
        top2 = np.partition(a, -2, axis=-1)[:, -2:] if a.shape[-1] >= 2 else np.concatenate([a, a], -1)
        margin = top2[:, 1] - top2[:, 0]
        scale = np.abs(a).max(-1)
        decisive = margin > NEAR_TIE_NOISES * self.score_noise * scale  # noise 0: exact ties only
        self.samples += len(a)
        self.decisive += int(decisive.sum())
        self.hits += int((agree & decisive).sum())
        self.all_hits += int(agree.sum())

    @property
    def near_ties(self) -> int:
        return self.samples - self.decisive

    @property
    def judged(self) -> bool:
        return self.decisive >= min(MIN_DECISIVE, self.samples) and self.decisive > 0

    @property
    def agreement(self) -> float | None:
        """Agreement over the decisive samples; None when too few are decisive to claim top-1 parity."""
        return self.hits / self.decisive if self.judged else None

    def fields(self) -> dict:
        """The report's figures: ``top1_agreement`` (decisive samples; absent when not judged), the counts,
        and the raw agreement over every sample."""
        out = {"top1_decisive": self.decisive, "top1_near_ties": self.near_ties,
               "top1_all_samples": self.all_hits / max(self.samples, 1)}
        if self.agreement is not None:
            out["top1_agreement"] = self.agreement
        return out


def top1_text(o: Mapping) -> str:
    """One output's top-1 figure for logs and reports: "0.9750 over 40 decisive samples, 24 near-ties
    skipped", or why it was not judged."""
    decisive, ties = o.get("top1_decisive"), o.get("top1_near_ties")
    if o.get("top1_agreement") is None:
        if decisive is None:
            return ""
        return (f"top-1 not judged: {decisive} of {decisive + ties} samples decisive (< {MIN_DECISIVE}); the "
                f"reference's top-2 margins are within the precision's noise (near-ties)")
    text = f"{o['top1_agreement']:.4f}"
    if decisive is not None and ties:
        text += f" over {decisive} decisive samples, {ties} near-ties skipped"
    return text


def top1_cell(o: Mapping) -> str | None:
    """The short top-1 (or exact-match) cell of a report table; None when the output has neither."""
    if o.get("exact_match") is not None:
        return f"{o['exact_match']:.4f}"
    decisive, ties = o.get("top1_decisive"), o.get("top1_near_ties") or 0
    if o.get("top1_agreement") is not None:
        return f"{o['top1_agreement']:.4f}" + (f" ({decisive} decisive, {ties} near-ties)" if ties else "")
    return None if decisive is None else f"not judged ({decisive} of {decisive + ties} decisive)"


NEAR_TIE_NOTE = (f"top-1 agreement counts decisive samples only: a sample whose reference top-2 margin is within "
                 f"{NEAR_TIE_NOISES:g}x the precision's score noise is a near-tie (a flip there is rounding, not a "
                 f"changed decision); with fewer than {MIN_DECISIVE} decisive samples top-1 parity is not claimed")


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
    top1_agreement: float | None = None   # over decisive samples (Top1Count)
    top1_decisive: int | None = None
    top1_near_ties: int | None = None
    top1_all_samples: float | None = None  # over every sample, near-ties included (for information)
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
    top1: Top1Count | None = None
    exact_hits: int = 0
    exact_total: int = 0
    samples: int = 0


class ParityAccumulator:
    """``heads``: output name -> whether the graph makes it with a linear head (output_kinds); each
    output's kind is decided once, on its first batch, and kept. ``score_noise``: the precision's
    (``PrecisionSpec.score_noise``), which decides the near-ties top-1 agreement skips."""

    def __init__(self, heads: Mapping[str, bool] | None = None, score_noise: float = 0.0):
        self._acc: dict[str, _Acc] = {}
        self._heads = dict(heads or {})
        self._noise = float(score_noise)
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
                acc.top1 = acc.top1 or Top1Count(self._noise)
                acc.top1.add(ref, got)

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
                if acc.top1 is not None:
                    for key, value in acc.top1.fields().items():
                        setattr(p, key, value)
            out[name] = p
        return out


def compare(reference: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray],
            score_noise: float = 0.0) -> dict[str, OutputParity]:
    acc = ParityAccumulator(score_noise=score_noise)
    acc.add(reference, candidate)
    return acc.result()
