"""A monitor's figures in the Prometheus text exposition format (version 0.0.4).

Hand-written rather than through ``prometheus_client``: the format is a few lines of text, and the
runtime must not need another package on a device (``prometheus_client`` is a dev extra, used by the
tests to parse this output). Metric names and types are stable (the Triton backend re-exports them):

    edgemm_calls_total, edgemm_errors_total                      counter
    edgemm_batch_size_calls_total{batch_size}                    counter
    edgemm_latency_seconds                                       histogram (le: 4 bounds per decade)
    edgemm_latency_quantile_seconds{quantile}                    gauge (0.5, 0.9, 0.99)
    edgemm_input_values_total{input}                             counter
    edgemm_input_out_of_range_total{input}                       counter   (inputs with a calibrated range)
    edgemm_input_out_of_range_fraction{input}                    gauge
    edgemm_input_nonfinite_total{input}                          counter
    edgemm_input_unknown_tokens_total{input}                     counter   (token inputs with a known vocabulary)
    edgemm_input_unknown_token_fraction{input}                   gauge
    edgemm_drift_known                                           gauge (1: the bundle has a calibration profile)
    edgemm_drift_windows_total                                   counter (windows past the bound)

Every sample carries ``bundle="<name>"``.
"""

from __future__ import annotations

import math


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(**labels) -> str:
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}"


def _num(v: float) -> str:
    if isinstance(v, float) and math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v)) if isinstance(v, float) else str(v)


def render(stats: dict, histogram: tuple[list[tuple[float, int]], int, float]) -> str:
    bundle = stats.get("bundle", "")
    lines: list[str] = []

    def family(name: str, kind: str, help_text: str, samples) -> None:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        for suffix, labels, value in samples:
            lines.append(f"{name}{suffix}{_labels(bundle=bundle, **labels)} {_num(value)}")

    family("edgemm_calls_total", "counter", "Calls of the bundle's run (failed ones included).",
           [("", {}, stats["calls"])])
    family("edgemm_errors_total", "counter", "Calls that raised (refused inputs, backend failures).",
           [("", {}, stats["errors"])])
    family("edgemm_batch_size_calls_total", "counter", "Calls by batch size.",
           [("", {"batch_size": str(b)}, n) for b, n in stats["batch_sizes"].items()])
    buckets, count, total = histogram
    family("edgemm_latency_seconds", "histogram", "Latency of successful calls.",
           [("_bucket", {"le": _num(le)}, n) for le, n in buckets]
           + [("_bucket", {"le": "+Inf"}, count), ("_count", {}, count), ("_sum", {}, total)])
    family("edgemm_latency_quantile_seconds", "gauge", "Latency percentiles of successful calls.",
           [("", {"quantile": q}, stats["latency_ms"][p] / 1000.0)
            for q, p in (("0.5", "p50"), ("0.9", "p90"), ("0.99", "p99")) if stats["latency_ms"][p] is not None])
    inputs = stats["inputs"]
    family("edgemm_input_values_total", "counter", "Input values seen.",
           [("", {"input": n}, f["values"]) for n, f in inputs.items()])
    family("edgemm_input_out_of_range_total", "counter", "Input values outside the calibrated range.",
           [("", {"input": n}, f["out_of_range"]) for n, f in inputs.items() if f["out_of_range"] is not None])
    family("edgemm_input_out_of_range_fraction", "gauge", "Fraction of input values outside the calibrated range.",
           [("", {"input": n}, f["out_of_range_fraction"]) for n, f in inputs.items()
            if f["out_of_range_fraction"] is not None])
    family("edgemm_input_nonfinite_total", "counter", "NaN or Inf input values.",
           [("", {"input": n}, f["nonfinite"]) for n, f in inputs.items()])
    family("edgemm_input_unknown_tokens_total", "counter", "Token ids outside the embedding table.",
           [("", {"input": n}, f["unknown_tokens"]) for n, f in inputs.items() if f["unknown_tokens"] is not None])
    family("edgemm_input_unknown_token_fraction", "gauge", "Fraction of token ids outside the embedding table.",
           [("", {"input": n}, f["unknown_token_fraction"]) for n, f in inputs.items()
            if f["unknown_token_fraction"] is not None])
    family("edgemm_drift_known", "gauge", "1 when the bundle carries a calibration profile to judge drift by.",
           [("", {}, 1 if stats["drift"] == "known" else 0)])
    family("edgemm_drift_windows_total", "counter", "Windows in which an input passed the out-of-range bound.",
           [("", {}, stats["drift_windows"])])
    return "\n".join(lines) + "\n"
