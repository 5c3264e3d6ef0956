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


# A per-sample cosine is judged only where the reference's direction is determined at this precision. A
# sample (a row along axis 0) is near-zero when its reference RMS is within the atol of zero, atol =
# NEAR_ZERO_NOISES x the precision's score noise x the output's scale: the SCALE_PERCENTILE-th percentile
# of the reference's sample RMS over the data. Its range, not its median, because rounding error follows
# the range a tensor spans (INT8's step is set from it), and a high percentile rather than the maximum so
# that a few outlying samples do not widen it for all. There the precision's rounding alone can turn the
# vector (random-init [B, B] similarity rows close to 0 got cosine -0.8 and -0.5 from INT8 error at 1-4%
# of the output's range). Such a sample is judged by its absolute
# error instead, allclose-style: its error RMS must be within the same atol, i.e. no more than a typical
# sample may be off. Like the near-ties, it is decided from the reference and the precision only, never
# from this bundle's error (which would let a broken bundle excuse itself). With atol 10x the noise, a
# typical-scale sample that far off still has cosine 1/sqrt(1 + (10 noise)^2) >= 0.995 at INT8.
NEAR_ZERO_NOISES = 10.0
SCALE_PERCENTILE = 90


def _row_rms(x: np.ndarray) -> np.ndarray:
    return np.sqrt(np.mean(np.square(x), axis=1)) if x.shape[1] else np.zeros(len(x))


@dataclass
class CosineCount:
    """Per-sample cosine of a float output, accumulated over batches, with near-zero samples judged by
    absolute error (the one implementation: verify, compile's parity gate, the baseline gate and the INT8
    recipe search all count with it). The atol needs the whole data's scale, so samples are kept (three
    floats each) and decided in ``fields``."""

    score_noise: float = 0.0  # the precision's (PrecisionSpec.score_noise); 0: no sample is near-zero
    cosines: list = field(default_factory=list)
    ref_rms: list = field(default_factory=list)
    err_rms: list = field(default_factory=list)

    def add(self, ref: np.ndarray, got: np.ndarray) -> None:
        ref, got = np.asarray(ref), np.asarray(got)
        a = ref.reshape(ref.shape[0], -1).astype(np.float64) if ref.ndim else ref.reshape(1, 1).astype(np.float64)
        b = got.reshape(a.shape).astype(np.float64)
        finite = np.isfinite(b).all(axis=1)
        self.cosines.append(np.where(finite, per_sample_cosine(ref, got), -1.0))  # NaN/inf: a wrong sample
        self.ref_rms.append(_row_rms(a))
        with np.errstate(invalid="ignore", over="ignore"):
            self.err_rms.append(np.where(finite, _row_rms(a - np.where(np.isfinite(b), b, 0.0)), np.inf))

    def judged(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        """(cosines of the samples whose cosine means something, near-zero mask, error RMS, atol)."""
        cos, ref, err = (np.concatenate(v) for v in (self.cosines, self.ref_rms, self.err_rms))
        atol = NEAR_ZERO_NOISES * self.score_noise * float(np.percentile(ref, SCALE_PERCENTILE))
        near = (ref <= atol) if atol > 0 else np.zeros(len(ref), bool)
        return cos[~near], near, err, atol

    def fields(self) -> dict:
        """``mean_cosine``/``min_cosine`` over the samples whose cosine means something, and, when some are
        near-zero: ``near_zero_samples``, ``near_zero_atol``, ``near_zero_max_error`` (largest error RMS)
        and ``near_zero_over`` (how many exceed the atol: a failure wherever cosine is checked)."""
        if not self.cosines:
            return {"mean_cosine": 1.0, "min_cosine": 1.0}
        judged, near, err, atol = self.judged()
        out = {"mean_cosine": float(judged.mean()) if judged.size else None,
               "min_cosine": float(judged.min()) if judged.size else None}
        if near.any():
            out.update(cosine_samples=int(judged.size), near_zero_samples=int(near.sum()), near_zero_atol=atol,
                       near_zero_max_error=float(err[near].max()), near_zero_over=int((err[near] > atol).sum()))
        return out


def cosine_text(o: Mapping) -> str:
    """One output's cosine figure for logs and reports: "mean cosine 0.999100 over 28 samples; 4 near-zero
    samples within atol 0.002" (or how many exceed it)."""
    text = f"mean cosine {o['mean_cosine']:.6f}" if o.get("mean_cosine") is not None else "no cosine"
    if o.get("near_zero_samples"):
        over = o.get("near_zero_over") or 0
        text += (f" over {o.get('cosine_samples')} samples; {o['near_zero_samples']} near-zero samples "
                 + (f"within atol {o['near_zero_atol']:.3g}" if not over else
                    f"({over} exceed atol {o['near_zero_atol']:.3g}: error RMS up to {o['near_zero_max_error']:.3g})"))
    return text


def cosine_failures(name: str, o: Mapping, min_cosine: float, what: str = "") -> list[str]:
    """The cosine checks of one output (verify, compile's gate and the baseline gate alike): the mean over
    the samples whose cosine means something, and every near-zero sample within the atol."""
    fails = []
    if o.get("mean_cosine") is not None and o["mean_cosine"] < min_cosine:
        fails.append(f"output {name}: mean cosine{what} {o['mean_cosine']:.6f} < {min_cosine}")
    if o.get("near_zero_over"):
        fails.append(f"output {name}: {o['near_zero_over']} of {o['near_zero_samples']} near-zero samples{what} off "
                     f"by more than atol {o['near_zero_atol']:.3g} (error RMS up to {o['near_zero_max_error']:.3g})")
    return fails


NEAR_ZERO_NOTE = (f"mean cosine skips near-zero samples (reference RMS within atol = {NEAR_ZERO_NOISES:g}x the "
                  f"precision's noise x the output's scale, the {SCALE_PERCENTILE}th percentile of its sample RMS, where rounding alone turns the vector); "
                  f"those are judged by their error RMS against the same atol")


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
    mean_cosine: float | None = None      # over the samples whose cosine means something (CosineCount)
    min_cosine: float | None = None
    cosine_samples: int | None = None     # set when some samples are near-zero
    near_zero_samples: int | None = None
    near_zero_atol: float | None = None
    near_zero_max_error: float | None = None
    near_zero_over: int | None = None     # near-zero samples whose error RMS exceeds the atol
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
    cosine: CosineCount | None = None
    top1: Top1Count | None = None
    exact_hits: int = 0
    exact_total: int = 0
    samples: int = 0


class ParityAccumulator:
    """``heads``: output name -> whether the graph makes it with a linear head (output_kinds); each
    output's kind is decided once, on its first batch, and kept. ``score_noise``: the precision's
    (``PrecisionSpec.score_noise``), which decides the near-ties top-1 agreement skips and the near-zero
    samples the mean cosine skips."""

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
            acc.cosine = acc.cosine or CosineCount(self._noise)
            acc.cosine.add(ref, got)
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
                for key, value in (acc.cosine or CosineCount()).fields().items():
                    setattr(p, key, value)
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
