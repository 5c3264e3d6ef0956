"""Prune orchestration: structured pruning / 2:4 sparsity on the torch module, recovery, and the
before/after comparison (torch, and both FP32 graphs in ONNX Runtime)."""

from __future__ import annotations

import shutil
from pathlib import Path

from ..config import CompileConfig
from ..data import Dataset
from ..errors import first_line
from ..frontends import LoadedModel
from ..iospec import dynamic_batch_input
from .inputs import batch_of, sample_feeds
from .sidecar import chosen_output_names, find_task


def prune_stage(loaded: LoadedModel, specs, calib: Dataset, evald: Dataset | None, cfg: CompileConfig, say):
    """Structured pruning / 2:4 sparsity on the torch module, then recovery by distillation, then the
    before/after comparison (on --eval when given: held-out data, and the task metric when it has labels).
    The rest of the pipeline (export, parity) then works on the pruned model."""
    from ..prune import (apply_2to4, can_prune, parse_prune_spec, prunable_module, prune, recover, recovery_warnings,
                        with_pruned_module)
    from ..prune.compare import compare, summary_lines
    from ..signature import attach

    can_prune(loaded)
    module = prunable_module(loaded)
    attach(module, loaded.calling_convention())  # an unflattened .pt2 takes (*args, **kwargs)
    names = [s.name for s in specs]
    calib_arrays = {n: calib.arrays[n][:cfg.calib_samples] for n in names}
    # Recovery is training: every calibration sample helps (the --calib-samples cap is for quantization).
    train_arrays = {n: calib.arrays[n] for n in names}
    example = sample_feeds(calib, specs, 2)
    info: dict = {}
    student = module
    if cfg.prune:
        say(f"pruning: {cfg.prune}")
        student, info["structured"] = prune(module, example, calib_arrays, parse_prune_spec(cfg.prune),
                                            input_names=names)
        for note in info["structured"]["notes"]:
            say(f"  note: {note}")
    if cfg.sparsity:
        import copy

        if student is module:
            student = copy.deepcopy(module)
        say("sparsity: 2:4")
        info["sparsity"] = apply_2to4(student, calib_arrays, input_names=names)
    if cfg.recover:
        say(f"recovery: {cfg.recover} distillation steps on the calibration set (lr {cfg.recover_lr:g})")
        cautions = recovery_warnings(calib.num_samples, cfg.recover, held_out=evald is not None)
        for caution in cautions:
            say(f"  warning: {caution}")
        info["recovery"] = recover(student, module, train_arrays, cfg.recover, input_names=names,
                                   keep_zeros=bool(cfg.sparsity), lr=cfg.recover_lr)
        info["recovery"]["warnings"] = cautions
    data = evald or calib
    output_names = chosen_output_names(cfg, loaded)
    task = find_task(loaded)
    task_t = (task["metric"], task["outputs"]) if task else None  # else compare() guesses from output names
    info["comparison"] = compare(module, student, names, {n: data.arrays[n] for n in names},
                                 info.get("structured"), labels=data.labels if evald is not None else None,
                                 task=task_t, output_names=output_names)
    # What pruning kept and why, and how far recovery can be trusted: into the report with the figures.
    notes = (info.get("structured") or {}).get("notes", []) + (info.get("recovery") or {}).get("warnings", [])
    if notes:
        info["comparison"]["notes"] = notes
    for line in summary_lines(info["comparison"]):
        say(f"  {line}")
    return with_pruned_module(loaded, student, example), info


def onnx_prune_latency(unpruned: LoadedModel, pruned_fp32: Path, work: Path, specs, calib, data, cfg, say) -> dict:
    """Export the unpruned model too and time both FP32 graphs in ONNX Runtime (batch 1 and the compare
    batch, or the fixed batch): the latency the bundle gains, where torch eager timing can hide it."""
    from ..export import export_onnx
    from ..prune.compare import LATENCY_BATCH, onnx_latency, onnx_summary

    batches = (1, LATENCY_BATCH) if dynamic_batch_input(specs) else (batch_of(specs),)
    before = work / "unpruned" / "fp32.onnx"
    before.parent.mkdir()
    say("  exporting the unpruned model too, to time both graphs in ONNX Runtime")
    try:
        export_onnx(unpruned, specs, sample_feeds(calib or data, specs, 2), sample_feeds(data, specs, 3), before,
                    prefer=cfg.exporter, output_names=chosen_output_names(cfg, unpruned))
        result = onnx_latency(before, pruned_fp32, {b: sample_feeds(data, specs, b) for b in batches})
    except Exception as exc:  # a measurement, never a reason to fail the compile
        first = first_line(exc, 200, default="")
        result = {"note": f"not measured ({type(exc).__name__}: {first})"}
    finally:
        shutil.rmtree(before.parent, ignore_errors=True)
    say(f"  {onnx_summary(result)}")
    return result
