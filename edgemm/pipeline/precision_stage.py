"""The precision stage: one precision everywhere, one per branch, or the accuracy-aware search; what was
excluded and why; the calibration profile; the CPU engine search's variants packaged into the bundle."""

from __future__ import annotations

from pathlib import Path

from .. import precision as precision_table
from ..config import CompileConfig
from ..errors import InputError
from ..iospec import call_batch, dynamic_batch_input
from .inputs import batch_of
from .sidecar import find_task


def precision_stage(fp32: Path, work: Path, cfg: CompileConfig, target, calib_arrays, evald, loaded, say, *,
                     held_out=None, batches=(1,), judge=None):
    """One precision everywhere, one per modality branch (--precision a=b,...), or the accuracy-aware
    search (--accuracy-target). ``held_out``: calibration samples kept for judging (no --eval)."""
    from ..quant import PrecisionRequest, apply_precision

    out = work / "model.onnx"
    label = cfg.precision_policy or cfg.precision
    say(f"precision: {label} for {target.backend} (target {target.name})")
    if cfg.accuracy_target:
        from ..quant.accuracy_search import accuracy_aware, parse_accuracy_target

        goal = parse_accuracy_target(cfg.accuracy_target)
        if evald is not None:
            eval_feeds, labels = dict(evald.arrays), evald.labels
        else:  # the held-out calibration samples, so the search is not judged on what it calibrated on
            n = next(iter(calib_arrays.values())).shape[0] + next(iter(held_out.values())).shape[0]
            if n < 8:
                raise InputError(f"only {n} calibration samples to search on", field="--accuracy-target",
                                 fix="pass --eval EVAL.npz (or at least 8 calibration samples)")
            eval_feeds, labels = held_out, None
        task = find_task(loaded)
        metric = (task["metric"], task["outputs"]) if task else None
        return accuracy_aware(fp32, out, calib_arrays, eval_feeds, goal, target, labels=labels, metric=metric,
                              workdir=work / "accuracy-search", mode=cfg.precision if cfg.precision in
                              precision_table.QUANTIZED else "int8", policy=cfg.precision_policy,
                              branch_overrides=branch_overrides(cfg), int8_recipe=cfg.int8_recipe, log=say)
    if cfg.precision_policy:
        from ..quant.mixed import apply_mixed

        return apply_mixed(fp32, out, cfg.precision_policy, calib_arrays, target,
                           branch_overrides=branch_overrides(cfg), workdir=work / "mixed",
                           int8_recipe=cfg.int8_recipe, log=say)
    return apply_precision(fp32, out, PrecisionRequest(
        precision=cfg.precision, backend=target.backend, calib=calib_arrays, workdir=work,
        int8_recipe=cfg.int8_recipe, min_cosine=cfg.min_cosine, min_top1=cfg.min_top1, dla=cfg.dla,
        max_metric_drop=cfg.max_metric_drop,
        exclude=exclude_patterns(cfg),
        held_out=held_out, batches=tuple(batches), cpu_engines=cfg.cpu_engines, log=say,
        labelled=_labelled(evald, judge), task=_task_of(loaded)))


def _labelled(evald, judge):
    """(arrays, labels) the CPU engine search scores the task metric on: --eval, else the held-out
    calibration samples, when they carry labels."""
    for data in (evald, judge):
        if data is not None and data.labels is not None:
            return data.arrays, data.labels
    return None


def _task_of(loaded):
    task = find_task(loaded)
    return (task["metric"], task["outputs"]) if task else None


def exclude_patterns(cfg: CompileConfig) -> list[str]:
    from ..quant.exclusions import parse_exclude

    return parse_exclude(cfg.exclude)


def exclusions(cfg: CompileConfig, prec) -> dict | None:
    """What stayed out of quantization and why: the user's --exclude and the automatic exclusions."""
    auto = prec.recipe.get("auto_excluded") or {}
    if not cfg.exclude and not auto:
        return None
    return {"patterns": exclude_patterns(cfg), "nodes": list(prec.recipe.get("excluded_nodes") or []),
            "automatic": auto}


def branch_overrides(cfg: CompileConfig):
    if not cfg.branch:
        return None
    from ..quant.branches import parse_branch_overrides

    return parse_branch_overrides(cfg.branch)


def calibration_profile(fp32: Path, calib_arrays, specs) -> dict | None:
    """What the calibration samples look like, for the runtime's drift monitor (edgemm.calibration_profile)."""
    if not calib_arrays:
        return None
    from ..calibration_profile import build_profile

    static = dynamic_batch_input(specs) is None
    return build_profile(fp32, calib_arrays, batch_of(specs) if static else call_batch(specs, 32),
                         static_batch=static)


def package_variants(prec, fallback_section: dict, stage: Path) -> list[dict]:
    """The CPU engine search's faster variants written into the bundle, fastest first, then the ORT model
    (the fallback, which the top-level ``backend`` section also names)."""
    from ..backends import openvino as ovb
    from ..quant.cpu_engines import fallback_variant
    from ..runtime import variants as _registers_the_section  # noqa: F401 (manifest "requires" lists it)

    out = []
    for variant in prec.variants:
        section = ovb.save_variant(variant["model"], stage, variant["name"], variant["inference_precision"])
        out.append({k: v for k, v in variant.items() if k not in ("model", "inference_precision")} |
                   {"backend": section})
    engines = prec.recipe["engines"]
    row = next(r for r in engines["table"] if r["name"] == engines["fallback"])
    from ..quant.cpu_engines import EngineRow

    out.append(fallback_variant(EngineRow(**row), fallback_section))
    return out
