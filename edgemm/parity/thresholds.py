"""Pass/fail bars, defaulting by precision. Overridable from the CLI (--min-cosine, ...)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

from .. import precision as precision_table
from ..errors import InputError


@dataclass(frozen=True)
class Thresholds:
    min_cosine: float            # mean per-sample cosine of every float output
    min_top1_agreement: float    # argmax agreement of logits outputs
    max_metric_drop: float       # task metric drop, absolute percentage points
    min_exact_match: float = 1.0  # integer outputs
    score_noise: float = 0.0     # the precision's; decides which samples top-1 skips as near-ties (metrics.py)

    def to_dict(self) -> dict:
        return asdict(self)


# One bar set per precision, from the one table (edgemm/precision.py).
DEFAULTS = {name: Thresholds(s.min_cosine, s.min_top1_agreement, s.max_metric_drop, score_noise=s.score_noise)
            for name, s in precision_table.TABLE.items()}


def defaults_for(precision) -> Thresholds:
    """The bars of ``precision`` (a name, a manifest precision section, "mixed:fp32+int8" or a
    ``Precision``); a mixed build takes the bar of its lowest precision."""
    return DEFAULTS[precision_table.parse(precision).lowest]


def relax_flags(failures) -> str:
    """The flags (of compile and verify alike) that relax the given report failures."""
    flags = []
    for text in failures:
        flag = ("--max-metric-drop" if text.startswith("task ") else "--min-top1" if "top-1" in text
                else "--min-cosine" if "cosine" in text else None)
        if flag and flag not in flags:
            flags.append(flag)
    return ", ".join(flags or ["--min-cosine"])


def require_finite(value, field: str) -> float:
    """A threshold must be a real, finite number: NaN compares False with everything, so a NaN bar would
    pass any drop (``drop > nan`` is never true) and an infinite one turns a check off unseen."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(f"{value!r} is not a finite number", field=field,
                         fix="pass a number such as 0.99 (cosine) or 1.0 (points)")
    return float(value)


_FLAGS = {"min_cosine": "--min-cosine", "min_top1_agreement": "--min-top1", "max_metric_drop": "--max-metric-drop",
          "min_exact_match": "min_exact_match"}


def with_overrides(base: Thresholds, **overrides) -> Thresholds:
    clean = {k: v for k, v in overrides.items() if v is not None}
    for key, value in clean.items():
        require_finite(value, _FLAGS.get(key, key))
        if key in ("min_cosine", "min_top1_agreement", "min_exact_match") and not (-1.0 <= value <= 1.0):
            raise InputError(f"{value} is outside [-1, 1]", field="--" + key.replace("_", "-"),
                             fix="e.g. 0.99")
        if key == "max_metric_drop" and value < 0:
            raise InputError(f"{value} is negative", field="--max-metric-drop", fix="e.g. 1.0 (points)")
    return replace(base, **clean)
