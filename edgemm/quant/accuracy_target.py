"""``--accuracy-target``: what an accuracy-aware build must meet, parsed once.

    --accuracy-target "cosine>=0.998"            every float output's mean cosine vs FP32
    --accuracy-target "top1-drop<=0.5"           task accuracy drop in points (needs labels)
    --accuracy-target "cosine@text_embeds>=0.999,top1-agreement>=0.99"
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from ..errors import InputError

__all__ = ["TARGET_METRICS", "DROP_METRIC_TASK", "Condition", "AccuracyTarget", "TargetCheck", "parse_accuracy_target",
           "round_sig"]

# metric -> (comparison, what it measures)
TARGET_METRICS = {
    "cosine": (">=", "mean per-sample cosine vs FP32 (every float output, or @OUTPUT)"),
    "min-cosine": (">=", "worst-sample cosine vs FP32"),
    "top1-agreement": (">=", "fraction of samples whose argmax matches FP32 (logits outputs, or @OUTPUT)"),
    "top1-drop": ("<=", "top-1 accuracy drop vs FP32 in percentage points (needs labels)"),
    "recall@1-drop": ("<=", "recall@1 drop vs FP32 in percentage points (needs labels)"),
    "metric-drop": ("<=", "drop of the model's task metric in points (needs labels)"),
}
DROP_METRIC_TASK = {"top1-drop": "top1", "recall@1-drop": "recall@1"}
# Known metric names first (longest first: "recall@1-drop" holds an "@"), then any word for the error.
_COND_RE = re.compile(r"^\s*(" + "|".join(re.escape(m) for m in sorted(TARGET_METRICS, key=len, reverse=True))
                      + r"|[a-z0-9\-]+)(?:@([A-Za-z0-9_.:/\-]+))?\s*(>=|<=|>|<|==|=)\s*([-+0-9.eEnaif]+)\s*$")
_EXAMPLE = "e.g. --accuracy-target 'cosine>=0.998' or 'top1-drop<=0.5'"


@dataclass(frozen=True)
class Condition:
    metric: str
    op: str
    threshold: float
    output: str | None = None

    def __str__(self) -> str:
        return f"{self.metric}{'@' + self.output if self.output else ''}{self.op}{self.threshold:g}"

    @property
    def needs_labels(self) -> bool:
        return self.metric.endswith("-drop")

    def holds(self, value: float) -> bool:
        return value >= self.threshold if self.op == ">=" else value <= self.threshold


@dataclass(frozen=True)
class AccuracyTarget:
    conditions: tuple[Condition, ...]

    def __str__(self) -> str:
        return ",".join(str(c) for c in self.conditions)

    @property
    def needs_labels(self) -> bool:
        return any(c.needs_labels for c in self.conditions)

    def to_dict(self) -> dict:
        return {"expression": str(self), "conditions": [
            {"metric": c.metric, "op": c.op, "threshold": c.threshold, **({"output": c.output} if c.output else {})}
            for c in self.conditions]}


@dataclass
class TargetCheck:
    met: bool
    values: dict[str, float]            # condition text -> measured value (mean over the samples)
    failures: list[str] = field(default_factory=list)
    bounds: dict[str, float] = field(default_factory=dict)  # cosine conditions: the lower bound decided on

    def to_dict(self) -> dict:
        out = {"met": self.met, "values": {k: round_sig(v) for k, v in self.values.items()}, "failures": self.failures}
        if self.bounds:
            out["lower_bounds"] = {k: round_sig(v) for k, v in self.bounds.items()}
        return out


def round_sig(v: float) -> float:
    return float(f"{v:.6g}")


def parse_accuracy_target(expr: str) -> AccuracyTarget:
    """``"cosine>=0.998"``, ``"top1-drop<=0.5"``, ``"cosine@text_embeds>=0.999,top1-agreement>=0.99"``.

    Conditions are joined by ``,`` or ``and``; all must hold. One-line InputError on bad syntax."""
    if not isinstance(expr, str) or not expr.strip():
        raise InputError("empty accuracy target", field="--accuracy-target", fix=_EXAMPLE)
    parts = [p for p in re.split(r",|\band\b", expr) if p.strip()]
    conditions = []
    for part in parts:
        m = _COND_RE.match(part)
        if not m:
            raise InputError(f"cannot read {part.strip()!r}", field="--accuracy-target",
                             fix=f"write METRIC[@OUTPUT]>=VALUE or METRIC<=VALUE, {_EXAMPLE}")
        metric, output, op, number = m.groups()
        if metric not in TARGET_METRICS:
            raise InputError(f"unknown metric {metric!r}", field="--accuracy-target",
                             fix=f"use one of {', '.join(TARGET_METRICS)}")
        want = TARGET_METRICS[metric][0]
        if op != want:
            raise InputError(f"{metric} takes {want} (it is a {'floor' if want == '>=' else 'ceiling'}), not {op}",
                             field="--accuracy-target", fix=f"write {metric}{want}{number}")
        try:
            value = float(number)
        except ValueError:
            raise InputError(f"{number!r} is not a number", field="--accuracy-target", fix=_EXAMPLE) from None
        if not np.isfinite(value):
            raise InputError(f"{number!r} is not finite", field="--accuracy-target", fix=_EXAMPLE)
        if metric in ("cosine", "min-cosine") and not -1.0 <= value <= 1.0:
            raise InputError(f"{metric} {value} is outside [-1, 1]", field="--accuracy-target", fix="e.g. cosine>=0.998")
        if metric == "top1-agreement" and not 0.0 <= value <= 1.0:
            raise InputError(f"top1-agreement {value} is a fraction in [0, 1]", field="--accuracy-target",
                             fix="e.g. top1-agreement>=0.99")
        if metric.endswith("-drop") and value < 0:
            raise InputError(f"{metric} {value} is negative", field="--accuracy-target",
                             fix=f"e.g. {metric}<=0.5 (percentage points)")
        conditions.append(Condition(metric, op, value, output))
    return AccuracyTarget(tuple(conditions))
