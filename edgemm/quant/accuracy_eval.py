"""Measuring an accuracy-search candidate against the FP32 reference (``Evaluator``): per-output errors
for the sensitivity ranking, and the target's conditions, mean-cosine ones decided on a lower confidence
bound of the mean."""

from __future__ import annotations

from dataclasses import dataclass
from statistics import NormalDist
from typing import Mapping, Sequence

import numpy as np

from ..errors import InputError
from .accuracy_target import DROP_METRIC_TASK, AccuracyTarget, Condition, TargetCheck
from .plan import Runner

__all__ = ["Measurement", "Evaluator"]


@dataclass
class Measurement:
    check: TargetCheck
    errors: dict[str, float]   # output -> 1 - mean cosine (float outputs)


class Evaluator:
    """FP32 reference outputs computed once; ``measure(runner)`` scores a candidate against ``target``."""

    def __init__(self, reference: Runner, feeds: Mapping[str, np.ndarray], target: AccuracyTarget, *,
                 output_names: Sequence[str], labels: np.ndarray | None = None,
                 task: tuple[str, list[str]] | None = None, batch_size: int = 16, check_target: bool = True,
                 confidence: float | None = 0.95, heads: Mapping[str, bool] | None = None,
                 score_noise: float = 0.0):
        n = next(iter(feeds.values())).shape[0]
        self.heads = dict(heads or {})   # output -> made by a linear head (parity/output_kinds.py)
        self.score_noise = score_noise   # the searched precision's: near-zero samples (parity/metrics.py)
        self.batches = [{k: np.ascontiguousarray(v[i:i + batch_size]) for k, v in feeds.items()}
                        for i in range(0, n, batch_size)]
        self.target = target
        self.labels = labels
        self.output_names = list(output_names)
        self.task = task
        self.samples = n
        self.reference = [{k: np.asarray(v) for k, v in reference(b).items()} for b in self.batches]
        float_outs = [o for o in self.output_names if self.reference[0][o].dtype.kind == "f"]
        self.float_outputs = float_outs
        self._agreement_outputs: dict[Condition, list[str]] = {}
        self._cos_outputs: dict[Condition, list[str]] = {}
        self._task_for: dict[Condition, tuple[str, list[str]]] = {}
        self.ref_task: dict[tuple, float] = {}
        self.checks_target = check_target   # False: output errors only (sensitivity on unlabelled data)
        # Mean-cosine conditions are decided on a one-sided lower confidence bound of the mean, so that a
        # result chosen on these samples also holds on others (without it, a search that stops right at
        # the threshold lands below it on fresh data about half of the time).
        if confidence is not None and not 0.5 <= confidence < 1.0:
            raise InputError(f"confidence {confidence} is outside [0.5, 1)", field="confidence", fix="e.g. 0.95")
        self.confidence = confidence
        self.z = NormalDist().inv_cdf(confidence) if confidence else 0.0
        if check_target:
            self._plan()

    def _plan(self) -> None:
        from ..parity.metrics import is_logits
        from ..task import compute, guess as guess_task

        for c in self.target.conditions:
            if c.output and c.output not in self.output_names:
                raise InputError(f"the model has no output {c.output!r}", field="--accuracy-target",
                                 fix=f"outputs are {', '.join(self.output_names)}")
            if c.metric in ("cosine", "min-cosine"):
                outs = [c.output] if c.output else self.float_outputs
                if any(o not in self.float_outputs for o in outs) or not outs:
                    raise InputError(f"{c} needs float outputs", field="--accuracy-target",
                                     fix=f"float outputs are {', '.join(self.float_outputs) or 'none'}")
                self._cos_outputs[c] = outs
            elif c.metric == "top1-agreement":
                outs = [c.output] if c.output else [o for o in self.float_outputs
                                                     if is_logits(self.reference[0][o], self.heads.get(o))]
                if not outs:
                    raise InputError("no logits output to compare argmax on", field="--accuracy-target",
                                     fix=f"name one: top1-agreement@OUTPUT>=0.99 (outputs: {', '.join(self.output_names)})")
                self._agreement_outputs[c] = outs
            else:
                if self.labels is None:
                    raise InputError(f"{c} needs labels", field="--accuracy-target",
                                     fix="pass evaluation data with a 'labels' array, or use a cosine target")
                self._task_for[c] = self._resolve_task(c, guess_task)
        for c, (metric, outs) in self._task_for.items():
            ref = {o: np.concatenate([r[o] for r in self.reference]) for o in outs}
            self.ref_task[(metric, tuple(outs))] = compute(metric, ref, self.labels, outs)

    def _resolve_task(self, c: Condition, guess_task) -> tuple[str, list[str]]:
        from ..parity.metrics import is_logits
        from ..task import outputs_for as task_outputs_for

        wanted = DROP_METRIC_TASK.get(c.metric)
        task = self.task
        if isinstance(task, str):
            task = (task, None)
        if c.metric == "metric-drop":
            if task is None:
                task = guess_task(self.output_names, self.heads)
            if task is None or not task[0]:
                raise InputError("cannot tell the model's task metric", field="--accuracy-target",
                                 fix="use top1-drop or recall@1-drop, or pass the metric")
            wanted = task[0]
        outs = [c.output] if c.output else task_outputs_for(
            wanted, self.output_names, known=task, heads=self.heads,
            top1_fallback=[o for o in self.float_outputs if is_logits(self.reference[0][o], self.heads.get(o))])
        if not outs:
            raise InputError(f"cannot tell which outputs {wanted} reads", field="--accuracy-target",
                             fix=f"name it: {c.metric}@OUTPUT (outputs: {', '.join(self.output_names)})")
        return wanted, outs

    def outputs_of(self, c: Condition) -> list[str]:
        return self._cos_outputs.get(c) or self._agreement_outputs.get(c) or self._task_for[c][1]

    def measure(self, runner: Runner) -> Measurement:
        from ..parity.metrics import CosineCount, Top1Count, cosine_failures
        from ..task import compute

        counts = {o: CosineCount(self.score_noise) for o in self.float_outputs}
        # The user's top1-agreement target counts every sample (accuracy_target.py), near-ties included.
        agreement: dict[str, Top1Count] = {}
        agreement_outs = {o for outs in self._agreement_outputs.values() for o in outs}
        task_outs = {o for _, outs in self._task_for.values() for o in outs}
        collected: dict[str, list] = {o: [] for o in task_outs}
        for batch, ref in zip(self.batches, self.reference):
            got = {k: np.asarray(v) for k, v in runner(batch).items()}
            for o in self.float_outputs:
                if got[o].shape != ref[o].shape:
                    raise InputError(f"output {o!r} has shape {list(got[o].shape)}, FP32 gives {list(ref[o].shape)}",
                                     field=o, fix="report this model to edgemm")
                counts[o].add(ref[o], got[o])
            for o in agreement_outs:
                agreement.setdefault(o, Top1Count()).add(ref[o], got[o])
            for o in task_outs:
                collected[o].append(got[o])
        # the gate's count: near-zero samples are judged by their error, not their cosine
        cos = {o: c.judged()[0] for o, c in counts.items()}
        near_zero_off = {o: f for o, c in counts.items() for f in cosine_failures(o, c.fields(), -1.0)}
        errors = {o: float(1.0 - c.mean()) for o, c in cos.items()}
        values, bounds, failures = {}, {}, []
        for c in (self.target.conditions if self.checks_target else ()):
            decide = None
            if c.metric == "cosine":
                value = min(float(cos[o].mean()) for o in self._cos_outputs[c])
                if self.z:
                    decide = min(float(cos[o].mean() - self.z * _stderr(cos[o])) for o in self._cos_outputs[c])
                    bounds[str(c)] = decide
            elif c.metric == "min-cosine":
                value = min(float(cos[o].min()) for o in self._cos_outputs[c])
            elif c.metric == "top1-agreement":
                value = min(agreement[o].all_hits / max(agreement[o].samples, 1) for o in self._agreement_outputs[c])
            else:
                metric, outs = self._task_for[c]
                got = {o: np.concatenate(collected[o]) for o in outs}
                value = self.ref_task[(metric, tuple(outs))] - compute(metric, got, self.labels, outs)
            values[str(c)] = float(value)
            if not c.holds(value if decide is None else decide):
                extra = "" if decide is None else f" ({self.confidence:.0%} lower bound {decide:.6g})"
                failures.append(f"{c}: measured {value:.6g}{extra}")
            elif c.metric in ("cosine", "min-cosine"):
                failures += [f"{c}: {near_zero_off[o]}" for o in self._cos_outputs[c] if o in near_zero_off]
        return Measurement(TargetCheck(not failures, values, failures, bounds), errors)


def _stderr(values: np.ndarray) -> float:
    return float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else 0.0
