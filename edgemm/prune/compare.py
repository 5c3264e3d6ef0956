"""Before/after figures for a pruned model, per modality branch: parameters, FLOPs, torch CPU time and the
task metric; and for the whole model, the FP32 ONNX graphs in ONNX Runtime (what a CPU bundle runs).
What `edgemm compile --prune` prints and records in the manifest (``prune.comparison``)."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ..signature import call_module
from ..errors import InputError
from .fastpath import mha_fastpath_off

LATENCY_BATCH = 8        # rows timed per call: small enough for any model, big enough to see channel cuts
LATENCY_ITERATIONS = 15
METRIC_BATCH = 32
ONNX_BUDGET_S = 4.0      # per batch size, both graphs together
ONNX_MAX_ITERATIONS = 200


@mha_fastpath_off()
def compare(teacher, student, input_names: Sequence[str], feeds: Mapping[str, np.ndarray],
            structured: dict | None, *, labels: np.ndarray | None = None,
            task: tuple[str, list[str]] | None = None, output_names: Sequence[str] | None = None) -> dict:
    """{"branches": {branch: {params/flops/ms before and after}}, "latency": {...}, "task": {...} or None}.

    ``structured``: the report of ``prune()`` (its per-branch module paths and counts), None after 2:4
    sparsity alone, which changes neither size nor CPU time. ``labels``: the task metric of both models on
    ``feeds`` (held-out data), ``task`` = (metric, the outputs it reads), guessed from the output names
    (as verify does) when None."""
    out: dict = {"branches": {}, "latency": None, "task": None}
    if structured:
        from .measure import branch_times

        branches = {b: v["modules"] for b, v in structured["branches"].items() if v.get("modules")}
        n = next(iter(feeds.values())).shape[0]
        rows = min(LATENCY_BATCH, n)
        times = branch_times({"before": teacher, "after": student}, input_names,
                             {k: feeds[k][:rows] for k in input_names}, branches, iterations=LATENCY_ITERATIONS)
        out["latency"] = {"batch": rows, "iterations": LATENCY_ITERATIONS, "device": "torch CPU, 1 thread",
                          "total_ms_before": times["before"]["total"], "total_ms_after": times["after"]["total"]}
        for branch, v in structured["branches"].items():
            out["branches"][branch] = {
                "params_before": v["params_before"], "params_after": v["params_after"],
                "flops_before": v["flops_before"], "flops_after": v["flops_after"],
                "ms_before": times["before"].get(branch), "ms_after": times["after"].get(branch)}
    if labels is not None:
        from ..task import compute, guess

        before = _run(teacher, input_names, feeds, output_names)
        task = task or guess(list(before))  # e.g. dict outputs named image_embeds / text_embeds
        if task is not None:
            metric, reads = task
            try:
                scores = {"before": compute(metric, before, labels, reads),
                          "after": compute(metric, _run(student, input_names, feeds, output_names), labels, reads)}
            except InputError as exc:  # a guessed metric that does not fit these labels: report, do not fail
                out["task_note"] = f"task metric {metric} not computed: {exc.detail}"
                return out
            out["task"] = {"metric": metric, "outputs": list(reads), "samples": int(len(labels)), **scores,
                           "drop": scores["before"] - scores["after"]}
    return out


def onnx_latency(before: Path, after: Path, feeds_by_batch: Mapping[int, Mapping[str, np.ndarray]]) -> dict:
    """The unpruned and pruned FP32 ONNX graphs in ONNX Runtime, timed interleaved per batch size.

    Torch eager is a poor proxy for what a bundle gains: on small models its per-op Python dispatch hides
    channel cuts (the dual-encoder's .pt2 read 0.96x in torch at batch 8). One intra-op thread on both, so
    the ratio reflects the graphs and not how a shared host schedules two thread pools."""
    from ..parity.latency import measure_interleaved_within
    from ..onnx_io import cpu_session

    sessions = {label: cpu_session(path, spinning=False, intra_op_threads=1)
                for label, path in (("before", before), ("after", after))}
    rows = {}
    for batch, feeds in feeds_by_batch.items():
        feeds = dict(feeds)
        stats = measure_interleaved_within({k: (lambda s=s: s.run(None, feeds)) for k, s in sessions.items()},
                                           budget_s=ONNX_BUDGET_S, max_iterations=ONNX_MAX_ITERATIONS, warmup=5)
        rows[str(batch)] = {"ms_before": round(stats["before"].p50_ms, 4), "ms_after": round(stats["after"].p50_ms, 4),
                            "ratio": round(stats["after"].p50_ms / stats["before"].p50_ms, 4),
                            "iterations": stats["before"].iterations}
    return {"device": "ONNX Runtime CPU, FP32, 1 intra-op thread", "statistic": "p50", "batches": rows}


def _run(model, input_names, feeds, output_names) -> dict[str, np.ndarray]:
    import torch

    from ..reference import flatten_outputs

    n = next(iter(feeds.values())).shape[0]
    parts: list[list[np.ndarray]] = []
    names: list[str] = []
    with torch.inference_mode():
        for start in range(0, n, METRIC_BATCH):
            args = tuple(torch.from_numpy(np.ascontiguousarray(feeds[k][start:start + METRIC_BATCH]))
                         for k in input_names)
            names, leaves = flatten_outputs(call_module(model, input_names, args))
            parts.append([t.detach().cpu().numpy() for t in leaves])
    if output_names and len(output_names) == len(names):
        names = list(output_names)
    # A similarity matrix over the batch (logits_per_image) does not concatenate; metrics that read it
    # recompute it from the embeddings, so keep only the per-sample outputs.
    lengths = [min(METRIC_BATCH, n - s) for s in range(0, n, METRIC_BATCH)]
    merged = {}
    for i, name in enumerate(names):
        chunks = [p[i] for p in parts]
        per_sample = all(c.ndim and c.shape[0] == k and c.shape[1:] == chunks[0].shape[1:]
                         for c, k in zip(chunks, lengths))
        if per_sample:
            merged[name] = np.concatenate(chunks)
    return merged


def summary_lines(comparison: dict) -> list[str]:
    """Human-readable lines for the compile log and the report."""
    lines = []
    lat = comparison.get("latency")
    for branch, v in comparison.get("branches", {}).items():
        line = (f"{branch:8s} params {v['params_before']:,} -> {v['params_after']:,} "
                f"({_ratio(v['params_after'], v['params_before'])})  FLOPs {_ratio(v['flops_after'], v['flops_before'])}")
        if v.get("ms_before"):
            line += f"  {v['ms_before']:.2f} -> {v['ms_after']:.2f} ms ({_ratio(v['ms_after'], v['ms_before'])})"
        lines.append(line)
    if lat:
        lines.append(f"whole model {lat['total_ms_before']:.2f} -> {lat['total_ms_after']:.2f} ms "
                     f"({_ratio(lat['total_ms_after'], lat['total_ms_before'])}; {lat['device']}, batch "
                     f"{lat['batch']}, median of {lat['iterations']} interleaved calls)")
    onnx = onnx_summary(comparison.get("onnx_latency"))
    if onnx:
        lines.append(onnx)
    task = comparison.get("task")
    if task:
        lines.append(f"task {task['metric']} on {task['samples']} samples: unpruned {task['before']:.2f}, "
                     f"pruned {task['after']:.2f} ({task['after'] - task['before']:+.2f} points)")
    return lines


def onnx_summary(onnx: dict | None) -> str | None:
    """One line for ``onnx_latency()``'s result (or its failure note)."""
    if not onnx:
        return None
    if not onnx.get("batches"):
        return f"whole model as ONNX: {onnx.get('note', 'not measured')}"
    return "whole model as ONNX: " + ", ".join(
        f"batch {b} {r['ms_before']:.3f} -> {r['ms_after']:.3f} ms ({r['ratio']:.2f}x)"
        for b, r in onnx["batches"].items()) + f" ({onnx['device']}, p50 of interleaved calls)"


def _ratio(after, before) -> str:
    return f"{after / before:.2f}x" if before else "-"
