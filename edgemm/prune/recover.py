"""Recovery after pruning: distil the pruned model from the unpruned one on the calibration set.

No labels: the student learns to reproduce the teacher's outputs on the unlabeled ``--calib`` samples.
Outputs named like logits (``logits``, ``logits_per_image``) are matched as distributions (KL divergence
of the softmax over the last axis, temperature 2, as in Hinton et al.'s distillation): what matters for a
classifier or a retrieval ranking is the order of the scores, not their values. Every other float
output contributes its mean squared error divided by the teacher output's variance, so embeddings of
any scale weigh alike. Runs on CPU.
"""

from __future__ import annotations

import math
import time
from typing import Mapping, Sequence

import numpy as np

from ..signature import call_module
from ..errors import InputError
from .augment import mix, modality_groups, pick
from .fastpath import mha_fastpath_off
from .hidden import HIDDEN_WEIGHT, HiddenStates

DEFAULT_LR = 1e-3
DEFAULT_BATCH = 32
# When recovery is likely to fit the calibration set rather than the model (see recovery_warnings).
MIN_RECOVER_SAMPLES = 512
MAX_RECOVER_EPOCHS = 100


def recovery_warnings(samples: int, steps: int, batch: int = DEFAULT_BATCH, *, held_out: bool = True) -> list[str]:
    """Why a recovery of ``steps`` steps on ``samples`` calibration samples may not be trusted (empty: fine).

    The bounds come from the recoveries measured here (README, benchmarks/README.md): 1500 steps on 1024
    samples (47 passes over the data) held on held-out data, while the zoo's 128-sample sets were
    memorised within a few hundred steps (hundreds of passes). Below half the measured 1024 samples, or
    beyond about twice the measured passes, the student learns the calibration set rather than the
    teacher. ``held_out``: False when the before/after figures are measured on the samples recovery
    trained on (no --eval), which then flatter it."""
    warnings = []
    epochs = steps * min(batch, samples) / max(samples, 1)
    if samples < MIN_RECOVER_SAMPLES:
        warnings.append(f"--recover on {samples} calibration samples: recovery wants at least "
                        f"{MIN_RECOVER_SAMPLES} (~1000 measured here) or it fits these samples, not the model "
                        f"(fix: pass a larger --calib, e.g. edgemm example NAME --calib-size 1024)")
    if epochs > MAX_RECOVER_EPOCHS:
        warnings.append(f"--recover {steps} runs {epochs:.0f} passes over {samples} samples (over "
                        f"{MAX_RECOVER_EPOCHS} memorises them) (fix: fewer steps or more calibration samples)")
    if not held_out:
        warnings.append("no --eval: the pruned-vs-unpruned figures are measured on the calibration samples "
                        "recovery trained on, and flatter it (fix: pass held-out data with --eval)")
    return warnings


@mha_fastpath_off()
def recover(student, teacher, calib: Mapping[str, np.ndarray], steps: int, *, lr: float = DEFAULT_LR,
            batch: int = DEFAULT_BATCH, progress: bool = True, input_names: Sequence[str] | None = None,
            keep_zeros: bool = False, augment: bool = True, hidden: bool = True, seed: int = 0) -> dict:
    """Fine-tune ``student`` (in place) for ``steps`` AdamW steps to match ``teacher`` on ``calib``.

    ``keep_zeros``: weights that are zero at the start stay zero (use after 2:4 sparsity).
    ``augment``: half of each batch pairs one sample's image with another's text (modalities are
    told apart by input name, as in find_branches) and blends its float inputs with a third sample's
    (mixup). The teacher labels any input, so a calibration set of N samples yields far more than N
    distinct training inputs; without this, 128 samples are memorised within a few hundred steps (on
    the cross-attention zoo model: top-1 94.3 without, 98.2 with, teacher 98.4).
    ``hidden``: also match hidden states, the outputs of every transformer block / top-level submodule
    present in both models, on the teacher channels that pruning kept (see HiddenStates).
    Returns {"steps", "lr", "batch", "seconds", "loss_before", "loss_after", "outputs", "hidden_states"}:
    losses are the output distillation loss over the whole calibration set, before and after.
    """
    import torch

    from .structured import ordered_input_names

    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise InputError(f"must be a positive number of steps, got {steps!r}", field="--recover",
                         fix="e.g. --recover 300")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise InputError(f"learning rate must be positive, got {lr!r}", field="lr", fix="e.g. 1e-3")
    names = list(input_names) if input_names else ordered_input_names(teacher, calib)
    missing = [n for n in names if n not in calib]
    if missing:
        raise InputError(f"no calibration data for input {missing[0]!r}", field=f"calib[{missing[0]!r}]",
                         fix="give one array per model input")
    n = len(calib[names[0]])
    batch = max(1, min(batch, n))
    data = {k: torch.from_numpy(np.ascontiguousarray(calib[k])) for k in names}
    teacher.eval()
    # eval(): dropout off and BatchNorm statistics frozen; gradients still flow.
    student.eval()
    scales = _output_scales(teacher, data, names, batch)
    if not any(scales):
        raise InputError("the model has no floating-point output to distil", field="--recover",
                         fix="drop --recover for this model")
    zero_masks = _zero_masks(student) if keep_zeros else []
    loss_before = _dataset_loss(student, teacher, data, names, batch, scales)
    states = HiddenStates(student, teacher, tuple(data[k][:batch] for k in names), names) if hidden else None
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_cosine(steps))
    rng = np.random.default_rng(seed)
    groups = modality_groups(names, data) if augment else [list(names)]
    start = time.perf_counter()
    try:
        with _progress(progress, steps) as advance:
            for _step in range(steps):
                picks = pick(rng, n, batch, groups)
                args = tuple(data[k][picks[k]] for k in names)
                if augment:
                    args = mix(rng, args, n, data, names, batch, groups)
                with torch.no_grad():
                    target = _outputs(call_module(teacher, names, args))
                loss = _loss(_outputs(call_module(student, names, args)), target, scales)
                if states is not None and states.matched:
                    loss = loss + HIDDEN_WEIGHT * states.loss()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                schedule.step()
                if zero_masks:
                    with torch.no_grad():
                        for weight, mask in zero_masks:
                            weight.mul_(mask)
                advance(float(loss.detach()))
    finally:  # never leave hooks on the caller's models
        matched = states.close() if states is not None else []
    seconds = time.perf_counter() - start
    loss_after = _dataset_loss(student, teacher, data, names, batch, scales)
    student.eval()
    return {"steps": steps, "lr": lr, "batch": batch, "samples": n, "seconds": round(seconds, 2),
            "loss_before": loss_before, "loss_after": loss_after,
            "outputs": {name: kind for name, (kind, _) in scales.items()}, "hidden_states": matched}


TEMPERATURE = 2.0


def _outputs(out) -> dict:
    """Float outputs by name (names as in edgemm.reference.flatten_outputs)."""
    from ..reference import flatten_outputs

    names, leaves = flatten_outputs(out)
    return {n: t for n, t in zip(names, leaves) if t.is_floating_point()}


def _output_scales(teacher, data, names, batch) -> dict:
    """Output name -> ("kl", 1.0) for logits, ("mse", teacher variance on the first batch) otherwise."""
    import torch

    with torch.no_grad():
        outs = _outputs(teacher(*(data[k][:batch] for k in names)))
    scales = {}
    for name, t in outs.items():
        if "logit" in name.lower() and t.ndim >= 2 and t.shape[-1] > 1:
            scales[name] = ("kl", 1.0)
        else:
            scales[name] = ("mse", max(float(t.float().var()), 1e-8) if t.numel() > 1 else 1.0)
    return scales


def _loss(student_outs: dict, teacher_outs: dict, scales: dict):
    from torch.nn import functional as F

    total = 0.0
    for name, (kind, scale) in scales.items():
        s, t = student_outs[name], teacher_outs[name]
        if kind == "kl":
            log_p = F.log_softmax(s.flatten(0, -2) / TEMPERATURE, dim=-1)
            log_q = F.log_softmax(t.flatten(0, -2) / TEMPERATURE, dim=-1)
            total = total + F.kl_div(log_p, log_q, log_target=True, reduction="batchmean") * TEMPERATURE ** 2
        else:
            total = total + ((s - t) ** 2).mean() / scale
    return total


def _dataset_loss(student, teacher, data, names, batch, scales) -> float:
    import torch

    n = len(data[names[0]])
    losses, weights = [], []
    with torch.no_grad():
        for start in range(0, n, batch):
            args = tuple(data[k][start:start + batch] for k in names)
            losses.append(float(_loss(_outputs(call_module(student, names, args)), _outputs(call_module(teacher, names, args)), scales)))
            weights.append(len(args[0]))
    return float(np.average(losses, weights=weights))


def _zero_masks(model) -> list:
    from torch import nn

    masks = []
    for layer in model.modules():
        if isinstance(layer, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            mask = (layer.weight.detach() != 0).to(layer.weight.dtype)
            if mask.min() == 0:
                masks.append((layer.weight, mask))
    return masks


def _warmup_cosine(steps: int):
    warmup = max(1, steps // 20)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return factor


class _progress:
    """A rich progress bar on stderr (transient), or nothing."""

    def __init__(self, enabled: bool, total: int):
        self.enabled, self.total = enabled, total
        self._bar = None

    def __enter__(self):
        if not self.enabled:
            return lambda loss: None
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._bar = Progress(TextColumn("recovering"), BarColumn(), MofNCompleteColumn(),
                             TextColumn("loss {task.fields[loss]:.4g}"), TimeRemainingColumn(),
                             console=Console(stderr=True), transient=True)
        self._bar.__enter__()
        task = self._bar.add_task("recover", total=self.total, loss=float("nan"))
        return lambda loss: self._bar.update(task, advance=1, loss=loss)

    def __exit__(self, *exc):
        if self._bar is not None:
            self._bar.__exit__(*exc)
        return False
