"""`edgemm verify`: bundle vs reference on eval data, and the CI gate against a recorded baseline.
Exit 0 pass, 1 parity (or gate) failure, 2 input error."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from ..outputs import write_output_text
from .options import FINITE_FLOAT, signature_options, threshold_options, trust_options, verbose_option


def gate_options(f):
    """The baseline gate and CI outputs (edgemm.parity.gate, .junit, .html_report)."""
    for decorator in reversed([
        click.option("--baseline", type=click.Path(), help="Gate against this baseline .json (from --save-baseline)."),
        click.option("--save-baseline", type=click.Path(),
                     help="Record this run as a baseline .json (+ golden outputs .npz beside it)."),
        click.option("--golden", type=click.Choice(["float16", "float32", "none"]), default="float16",
                     show_default=True, help="How --save-baseline stores golden outputs (none: digests + stats)."),
        click.option("--baseline-min-cosine", type=FINITE_FLOAT, help="Least mean cosine vs the golden outputs "
                                                               "[default: the precision's --min-cosine]."),
        click.option("--baseline-min-top1", "baseline_min_top1", type=FINITE_FLOAT,
                     help="Least top-1 agreement with the golden logits."),
        click.option("--baseline-max-abs-rel", type=FINITE_FLOAT,
                     help="Largest |now - golden| as a fraction of max |golden| [default: 0.01 fp32 .. 0.1 fp8]."),
        click.option("--baseline-max-metric-drop", type=FINITE_FLOAT,
                     help="Largest task-metric drop vs the baseline, points."),
        click.option("--latency-tolerance", type=FINITE_FLOAT, default=1.5, show_default=True,
                     help="Fail when the bundle/anchor latency ratio (1 thread, p10) grows beyond this "
                          "factor of the baseline's."),
        click.option("--latency-any-host", is_flag=True,
                     help="Gate latency even when the baseline was recorded on another CPU/GPU."),
        click.option("--junit", type=click.Path(), help="Write JUnit XML here (for CI test reports)."),
        click.option("--markdown", type=click.Path(), help="Write a Markdown summary here (a PR comment)."),
        click.option("--html", type=click.Path(), help="Write an HTML report with plots here (needs matplotlib)."),
    ]):
        f = decorator(f)
    return f


@click.command("verify")
@click.argument("bundle", type=click.Path())
@click.option("--reference", type=click.Path(),
              help="The source model (.pt, .pt2, .onnx, package.module:fn); optional with --baseline.")
@click.option("--weights", type=click.Path(), help="Weights for a factory reference.")
@click.option("--trust-pickle", is_flag=True,
              help="Trust the reference's code: unpickle a full nn.Module, run operators beyond pure tensor math.")
@click.option("--data", required=True, type=click.Path(), help="Eval .npz (labels under `labels`).")
@click.option("--metric", type=click.Choice(["top1", "recall@1"]), help="Task metric (default from the bundle).")
@click.option("--metric-outputs", help="Comma-separated outputs the metric reads.")
@click.option("--batch-size", type=int, default=None, help="Samples per call [default: 16, or the baseline's].")
@click.option("--iterations", type=int, default=50, show_default=True, help="Latency iterations (0 = skip).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--no-write", is_flag=True, help="Do not write report.json/report.md into the bundle.")
@threshold_options
@gate_options
@signature_options
@verbose_option
def command(bundle, reference, weights, trust_pickle, data, metric, metric_outputs, batch_size, iterations,
            as_json, no_write, min_cosine, min_top1_agreement, max_metric_drop, baseline, save_baseline, golden,
            baseline_min_cosine, baseline_min_top1, baseline_max_abs_rel, baseline_max_metric_drop,
            latency_tolerance, latency_any_host, junit, markdown, html, trusted_keys, require_signature):
    """Verify BUNDLE against --reference and/or a --baseline on --data."""
    from ..errors import InputError, ParityError

    if not (reference or baseline or save_baseline):
        raise InputError("nothing to compare the bundle with", field="--reference",
                         fix="pass --reference MODEL (its source model) and/or --baseline FILE, or --save-baseline FILE")
    if iterations < 0:
        raise InputError("must be >= 0", field="--iterations", fix="e.g. --iterations 50")
    if batch_size is not None and batch_size < 1:
        raise InputError("must be >= 1", field="--batch-size", fix="e.g. --batch-size 16")
    _check_outputs(bundle, data, reference, weights, baseline, save_baseline, junit, markdown, html)
    common = dict(reference=reference, weights=weights, trust_pickle=trust_pickle, metric=metric,
                  metric_outputs=metric_outputs.split(",") if metric_outputs else None, iterations=iterations,
                  write=not no_write, overrides=dict(min_cosine=min_cosine, min_top1_agreement=min_top1_agreement,
                                                     max_metric_drop=max_metric_drop),
                  **trust_options(trusted_keys, require_signature))
    start = time.perf_counter()
    run = None
    if baseline or save_baseline or html:
        from ..parity.gate import run_gate

        tolerances = dict(min_cosine=baseline_min_cosine, min_top1_agreement=baseline_min_top1,
                          max_abs_rel=baseline_max_abs_rel, max_metric_drop=baseline_max_metric_drop,
                          latency_ratio=latency_tolerance, latency_any_host=latency_any_host or None)
        run = run_gate(bundle, data, baseline=baseline, save=save_baseline, batch_size=batch_size,
                       tolerances=tolerances, golden=golden, keep_reference=bool(html), **common)
        report = run.report
    else:
        from ..parity.verify import verify_bundle

        report = verify_bundle(bundle, data, batch_size=batch_size,
                               progress=None if as_json else lambda d, n: None, **common)
    duration = time.perf_counter() - start

    from ..parity.gate import render_gate_markdown, render_pr_summary
    from ..parity.report import render_markdown

    text = render_markdown(report) + ("\n" + render_gate_markdown(report) if report.get("baseline") else "")
    click.echo(json.dumps(report, indent=2) if as_json else text)
    if junit:
        from ..parity.junit import write_junit
        write_junit(junit, report, duration_s=duration, system_out=text)
    if markdown:
        write_output_text(markdown, render_pr_summary(report), field="--markdown")
    if html:
        from ..parity.html_report import PlotData, write_html

        golden_arrays = run.baseline.golden() if run.baseline is not None else None
        for name, res in (report.get("baseline") or {}).get("outputs", {}).items():
            if res.get("identical") and golden_arrays and name in golden_arrays:  # exact, not float16-rounded
                golden_arrays[name] = [b[name] for b in run.recorder.outputs["bundle"]]
        plots = PlotData.from_batches(run.recorder.outputs["bundle"], reference=run.recorder.outputs["reference"],
                                      golden=golden_arrays, latency_ms=run.latency_ms())
        write_html(html, report, plots)
    if report.get("baseline_saved"):
        click.echo(f"baseline written: {report['baseline_saved']}", err=True)
    if not report["passed"]:
        pruned = report.get("reference_is_unpruned") and not report.get("baseline")
        fix = ("the bundle was pruned and --reference is the unpruned model: gate it against a --baseline, "
               "or relax the thresholds (--max-metric-drop, --min-cosine, --min-top1)" if pruned else
               "see report.md in the bundle; recompile at higher precision, relax thresholds, or "
               "re-record the baseline if the change is intended")
        raise ParityError("; ".join(report["failures"]), file=bundle, fix=fix)
    return 0


def _check_outputs(bundle, data, reference, weights, baseline, save_baseline, junit, markdown, html) -> None:
    """Before any work: every file verify writes is writable-looking and overwrites no input (nor another
    output): not the eval data, the bundle (or a file in it), the reference, the baseline or its golden
    outputs."""
    from ..outputs import check_output_file
    from ..parity.gate import check_baseline_outputs, golden_path

    inputs = {"BUNDLE": bundle, "--data": data, "--reference": reference, "--weights": weights,
              "--baseline": baseline}
    if baseline:
        inputs["--baseline (golden outputs)"] = golden_path(Path(baseline))
    outputs = {"--junit": junit, "--markdown": markdown, "--html": html}
    if save_baseline:
        outputs["--save-baseline"] = save_baseline
        outputs["--save-baseline (golden outputs)"] = golden_path(Path(save_baseline))
        check_baseline_outputs(save_baseline, inputs, outputs)
    for flag in ("--junit", "--markdown", "--html"):
        if outputs[flag]:
            check_output_file(outputs[flag], field=flag, inputs=inputs, outputs=outputs)
