"""`edgemm verify`: bundle vs reference on eval data. Exit 0 pass, 1 parity failure, 2 input error."""

from __future__ import annotations

import json
import sys

import click

from .options import threshold_options, verbose_option


@click.command("verify")
@click.argument("bundle", type=click.Path())
@click.option("--reference", type=click.Path(), help="The source model (.pt, .pt2, .onnx, package.module:fn).")
@click.option("--weights", type=click.Path(), help="Weights for a factory reference.")
@click.option("--trust-pickle", is_flag=True, help="Allow unpickling a full nn.Module reference.")
@click.option("--data", required=True, type=click.Path(), help="Eval .npz (labels under `labels`).")
@click.option("--metric", type=click.Choice(["top1", "recall@1"]), help="Task metric (default from the bundle).")
@click.option("--metric-outputs", help="Comma-separated outputs the metric reads.")
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--iterations", type=int, default=50, show_default=True, help="Latency iterations (0 = skip).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--no-write", is_flag=True, help="Do not write report.json/report.md into the bundle.")
@threshold_options
@verbose_option
def command(bundle, reference, weights, trust_pickle, data, metric, metric_outputs, batch_size, iterations,
            as_json, no_write, min_cosine, min_top1_agreement, max_metric_drop):
    """Verify BUNDLE against --reference on --data."""
    from ..errors import InputError, ParityError
    from ..parity.verify import verify_bundle

    if iterations < 0:
        raise InputError("must be >= 0", field="--iterations", fix="e.g. --iterations 50")
    report = verify_bundle(bundle, data, reference=reference, weights=weights, trust_pickle=trust_pickle,
                           metric=metric, metric_outputs=metric_outputs.split(",") if metric_outputs else None,
                           batch_size=batch_size, iterations=iterations, write=not no_write,
                           overrides=dict(min_cosine=min_cosine, min_top1_agreement=min_top1_agreement,
                                          max_metric_drop=max_metric_drop),
                           progress=None if as_json else lambda d, n: None)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        from ..parity.report import render_markdown
        click.echo(render_markdown(report))
    if not report["passed"]:
        raise ParityError("; ".join(report["failures"]), file=bundle,
                          fix="see report.md in the bundle; recompile at higher precision or relax thresholds")
    return 0
