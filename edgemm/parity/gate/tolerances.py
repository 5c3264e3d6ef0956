"""How far a gated run may drift from its baseline: GateTolerances, defaults from the bundle's precision."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from ...errors import InputError
from ...precision import parse as parse_precision
from ..thresholds import require_finite


@dataclass(frozen=True)
class GateTolerances:
    """How far a run may drift from its baseline. Defaults follow the bundle's precision."""

    min_cosine: float             # mean per-sample cosine, now vs golden, every float output
    min_top1_agreement: float     # argmax agreement with the golden logits
    max_metric_drop: float        # task metric drop vs the baseline, percentage points
    max_abs_rel: float            # max |now - golden| / max |golden|
    min_exact_match: float = 1.0  # integer outputs
    latency_ratio: float = 1.5    # (bundle/anchor now) / (bundle/anchor at baseline) may not exceed this
    latency_any_host: bool = False  # gate latency even when the baseline came from another CPU/GPU

    @classmethod
    def for_precision(cls, precision: str, **overrides) -> "GateTolerances":
        bars = parse_precision(precision).spec   # a mixed bundle: its lowest precision's bars
        base = cls(bars.min_cosine, bars.min_top1_agreement, bars.max_metric_drop, bars.max_abs_rel)
        return base.with_overrides(**overrides)

    def with_overrides(self, **overrides) -> "GateTolerances":
        clean = {k: v for k, v in overrides.items() if v is not None}
        flags = {"min_cosine": "--baseline-min-cosine", "min_top1_agreement": "--baseline-min-top1",
                 "max_metric_drop": "--baseline-max-metric-drop", "max_abs_rel": "--baseline-max-abs-rel",
                 "latency_ratio": "--latency-tolerance", "min_exact_match": "min_exact_match",
                 "latency_any_host": "--latency-any-host"}
        for key, value in clean.items():
            if key not in flags:
                raise InputError(f"unknown tolerance {key!r}", field="tolerances",
                                 fix=f"use one of {', '.join(flags)}")
            if key != "latency_any_host":
                require_finite(value, flags[key])
            if key in ("min_cosine", "min_top1_agreement", "min_exact_match") and not -1.0 <= value <= 1.0:
                raise InputError(f"{value} is outside [-1, 1]", field=flags[key], fix="e.g. 0.999")
            if key in ("max_metric_drop", "max_abs_rel") and value < 0:
                raise InputError(f"{value} is negative", field=flags[key], fix="e.g. 0.5")
            if key == "latency_ratio" and value < 1.0:
                raise InputError(f"{value} is below 1 (a run would have to be faster than its baseline)",
                                 field=flags[key], fix="e.g. --latency-tolerance 1.5")
        return replace(self, **clean)

    def to_dict(self) -> dict:
        return asdict(self)
