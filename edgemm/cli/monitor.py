"""`edgemm monitor`: is this data still what the bundle was calibrated for? Imports numpy + onnxruntime only.

Exit 0: every input within the bound; 1: an input's out-of-range or unknown-token fraction passed
--max-out-of-range, a value was NaN/Inf, or a call failed; 2: bad input (bundle, data, flags)."""

from __future__ import annotations

import json

import click

from ..iospec import call_batch
from .options import FINITE_FLOAT, signature_options, trust_options, verbose_option


@click.command("monitor")
@click.argument("bundle", type=click.Path())
@click.option("--data", required=True, type=click.Path(), help="Inputs .npz (or folder): keys = input names.")
@click.option("--max-out-of-range", type=FINITE_FLOAT, default=0.01, show_default=True,
              help="Largest fraction of an input's values outside the calibrated range (and of token ids "
                   "outside the vocabulary) before the data counts as drifted.")
@click.option("--batch-size", type=int, default=None,
              help="Samples per call (default 32, or the bundle's largest batch if smaller).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@signature_options
@verbose_option
def command(bundle, data, max_out_of_range, batch_size, as_json, trusted_keys, require_signature):
    """Run --data through BUNDLE and report, per input, how it compares with the calibration data:
    values outside the calibrated range, NaN/Inf, unknown token ids; plus calls, errors and latency."""
    from .. import runtime
    from ..data import load_dataset
    from ..display import printable
    from ..errors import InputError
    from ..runtime.drift_report import drift_report

    if not 0 <= max_out_of_range <= 1:
        raise InputError(f"{max_out_of_range:g} is not a fraction", field="--max-out-of-range",
                         fix="give a number in [0, 1], e.g. 0.01 for 1%")
    if batch_size is not None and batch_size < 1:
        raise InputError("must be >= 1", field="--batch-size", fix="e.g. --batch-size 32")
    b = runtime.load(bundle, monitor=True, max_out_of_range=max_out_of_range,
                     **trust_options(trusted_keys, require_signature))
    # NaN/Inf stay in: counting them is part of the report
    ds = load_dataset(data, specs=b.inputs, allow_labels=True, role="--data", allow_nonfinite=True)
    report = drift_report(b, ds, batch_size=batch_size or call_batch(b.inputs, 32))
    report["data"] = str(data)
    # names and error texts come from files: each line printed without control characters
    click.echo(json.dumps(report, indent=2) if as_json else "\n".join(map(printable, render(report))))
    return 0 if report["passed"] else 1


def _pct(v) -> str:
    return "n/a" if v is None else f"{v:.2%}"


def _batches(sizes: dict) -> str:
    """'batch 8' or 'batch 32 x3, 4 x1': the sizes actually sent, not the --batch-size asked for."""
    if len(sizes) == 1:
        return f"batch {next(iter(sizes))}"
    return "batch " + ", ".join(f"{b} x{n}" for b, n in sorted(sizes.items(), reverse=True)) if sizes else "no call"


def _range(r) -> str:
    return "n/a" if r is None else f"[{r[0]:.4g}, {r[1]:.4g}]"


def render(report: dict) -> list[str]:
    s = report["stats"]
    lat = s["latency_ms"]
    lines = [f"{report['bundle']}: {report['samples']} samples of {report.get('data', '')} in {s['calls']} calls "
             f"({_batches(report['batch_sizes'])}), {s['errors']} failed",
             "latency ms: " + ("n/a (no call succeeded)" if lat["p50"] is None else
                               f"p50 {lat['p50']:.3f}  p90 {lat['p90']:.3f}  p99 {lat['p99']:.3f}")]
    if report["drift"] != "known":
        lines.append(f"drift: {report['drift']}")
    header = ("input", "out of range", "NaN/Inf", "unknown tokens", "calibrated range", "data range")
    rows = [header] + [(name, _pct(f["out_of_range_fraction"]), str(f["nonfinite"]), _pct(f["unknown_token_fraction"]),
                        _range(f["range"]), _range(f["data_range"])) for name, f in s["inputs"].items()]
    if report["outputs"]:
        rows.append(("output (vs FP32 on calibration)", "", "", "", "", ""))
        rows += [(f"  {name}", _pct(f["out_of_range_fraction"]), str(f["nonfinite"]), "", _range(f["range"]), "")
                 for name, f in report["outputs"].items()]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    for err in report["errors_seen"]:
        lines.append(f"call failed: {err}")
    if report["passed"]:
        lines.append(f"ok: every input within {report['max_out_of_range']:.2%} of the calibrated ranges"
                     if report["drift"] == "known" else "ok: no NaN/Inf (drift unknown)")
    else:
        if report["failed_calls"]:
            lines.append(f"FAILED: {report['failed_calls']} of {report['calls']} call(s) failed"
                         + (f": {report['errors_seen'][0]}" if report["errors_seen"] else ""))
        lines += [f"DRIFT: {f}" for f in report["failures"]]
    return lines
