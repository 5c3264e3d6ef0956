"""Baselines for the CI gate (edgemm verify --baseline / --save-baseline): record a bundle's outputs,
task metric and latency once, then fail later runs whose accuracy or latency drifted beyond tolerance.

A baseline is two files: ``NAME.json`` (context, statistics, digests, task metric, latency) and
``NAME.npz`` beside it (golden outputs, float16 by default, never pickled). Latency is gated as a ratio
(bundle / a fixed anchor workload timed interleaved in the same run, 10th percentiles) against the
baseline's stored ratio, never in absolute milliseconds, so that a busy CI machine slows both alike.

Modules: ``tolerances`` (how far a run may drift), ``context`` (what a baseline is valid for), ``anchor``
(the latency anchor and the run recorder), ``golden`` (the baseline's files), ``compare`` (the verdict),
``run`` (verify + gate + reports), ``markdown`` (report.md section, PR summary), ``schema`` (the .json's
fields, checked on load).
"""

from __future__ import annotations

from .anchor import ANCHOR_DEPTH, ANCHOR_NAME, ANCHOR_WIDTH_RANGE, LATENCY_PERCENTILE, Recorder, anchor_width, \
    anchor_workload, measure_gate_latency
from .compare import compare_to_baseline
from .context import bundle_context, check_context, gpu_info
from .golden import FORMAT, FORMAT_VERSION, GOLDEN_MODES, Baseline, check_baseline_outputs, golden_path, \
    load_baseline, save_baseline
from .markdown import render_gate_markdown, render_pr_summary
from .run import GateRun, run_gate, write_gate_reports
from .tolerances import GateTolerances

__all__ = ["ANCHOR_DEPTH", "ANCHOR_NAME", "ANCHOR_WIDTH_RANGE", "LATENCY_PERCENTILE", "Recorder", "anchor_width",
           "anchor_workload", "measure_gate_latency", "compare_to_baseline", "bundle_context", "check_context",
           "gpu_info", "FORMAT", "FORMAT_VERSION", "GOLDEN_MODES", "Baseline", "check_baseline_outputs",
           "golden_path", "load_baseline", "save_baseline", "render_gate_markdown", "render_pr_summary", "GateRun",
           "run_gate", "write_gate_reports", "GateTolerances"]
