"""A self-contained HTML verification report with plots (PNG, embedded): per-output error histograms,
per-sample cosine distributions, latency distributions, per-layer error when the report has it.

matplotlib is optional (``pip install 'edgemm[report]'``) and used through its object API with the Agg
canvas, so rendering never switches the backend of a process that imported pyplot (a pytest session).
"""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np

from ..errors import DependencyError

MAX_POINTS = 200_000  # per histogram: enough for its shape, keeps rendering fast on large eval sets


@dataclass
class PlotData:
    """Raw samples behind the plots. ``errors``/``cosines``: comparison ("vs reference", "vs golden")
    -> output -> values; ``latency_ms``: who ("bundle", "reference", "anchor") -> per-call times."""

    errors: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    cosines: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    latency_ms: dict[str, np.ndarray] = field(default_factory=dict)

    @classmethod
    def from_batches(cls, bundle: list[Mapping[str, np.ndarray]], *, reference: list[Mapping] | None = None,
                     golden: Mapping[str, list[np.ndarray]] | None = None,
                     latency_ms: Mapping[str, np.ndarray] | None = None) -> "PlotData":
        """Pair bundle outputs batch by batch with the reference's and/or the golden ones."""
        from .metrics import per_sample_cosine

        plots = cls(latency_ms=dict(latency_ms or {}))
        sources = {}
        if reference:
            sources["vs reference"] = [dict(r) for r in reference]
        if golden:
            sources["vs golden"] = [{n: g[i] for n, g in golden.items()} for i in range(len(bundle))]
        for label, other in sources.items():
            for name in bundle[0] if bundle else ():
                pairs = [(o[name], b[name]) for o, b in zip(other, bundle) if name in o]
                if not pairs or np.asarray(pairs[0][1]).dtype.kind not in "f":
                    continue
                errs, coss = [], []
                for ref, got in pairs:
                    ref64, got64 = np.asarray(ref, np.float64), np.asarray(got, np.float64)
                    if ref64.shape != got64.shape:
                        break
                    errs.append(np.abs(ref64 - got64).ravel())
                    coss.append(per_sample_cosine(ref64, got64))
                else:
                    plots.errors.setdefault(label, {})[name] = _thin(np.concatenate(errs))
                    plots.cosines.setdefault(label, {})[name] = np.concatenate(coss)
        return plots


def _thin(values: np.ndarray) -> np.ndarray:
    if values.size <= MAX_POINTS:
        return values
    return np.random.default_rng(0).choice(values, MAX_POINTS, replace=False)


def _figure(width=6.4, height=3.2):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise DependencyError(f"the HTML report needs matplotlib ({exc})", field="--html",
                              fix="pip install 'edgemm[report]'") from exc
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def error_histogram(label: str, name: str, errors: np.ndarray) -> str:
    fig = _figure()
    ax = fig.add_subplot()
    nonzero = errors[errors > 0]
    if nonzero.size:
        # Errors span decades (1e-8 .. 1e-1): bins are log-spaced, exact matches are counted in the title.
        lo, hi = np.log10(nonzero.min()), np.log10(nonzero.max())
        bins = np.logspace(lo, hi if hi > lo else lo + 1, 40)
        ax.hist(nonzero, bins=bins, color="#3b6ea5")
        ax.set_xscale("log")
    else:
        ax.text(0.5, 0.5, "every element identical", ha="center", va="center", transform=ax.transAxes)
    ax.set_yscale("log" if nonzero.size > 100 else "linear")
    ax.set_xlabel("absolute error")
    ax.set_ylabel("elements")
    exact = errors.size - nonzero.size
    ax.set_title(f"{name} {label}: max {errors.max():.3g}, {exact} of {errors.size} exact", fontsize=10)
    return _png(fig)


def cosine_plot(label: str, cosines: Mapping[str, np.ndarray]) -> str:
    fig = _figure()
    ax = fig.add_subplot()
    # 1 - cosine on a log axis separates 0.9999 from 0.99; the axis starts a decade below the data.
    distances = {name: np.maximum(1.0 - cos, 1e-16) for name, cos in cosines.items()}
    low = min(float(d.min()) for d in distances.values())
    bins = np.logspace(max(-16, np.floor(np.log10(low)) - 1), 0, 50)
    for name, distance in distances.items():
        ax.hist(distance, bins=bins, histtype="step", linewidth=1.5, label=f"{name} (min {cosines[name].min():.6f})")
    ax.set_xscale("log")
    ax.set_xlabel("1 - cosine (per sample)")
    ax.set_ylabel("samples")
    ax.legend(fontsize=8)
    ax.set_title(f"per-sample cosine {label}", fontsize=10)
    return _png(fig)


def latency_plot(latency_ms: Mapping[str, np.ndarray]) -> str:
    fig = _figure()
    ax = fig.add_subplot()
    names = [n for n in ("bundle", "reference", "anchor") if n in latency_ms and len(latency_ms[n])]
    names += [n for n in latency_ms if n not in names and len(latency_ms[n])]
    # Vertical boxes: the default orientation, whose keyword changed name across matplotlib versions.
    ax.boxplot([latency_ms[n] for n in names], showfliers=True)
    ax.set_xticks(range(1, len(names) + 1), names, fontsize=8)
    for i, n in enumerate(names, start=1):
        jitter = np.random.default_rng(i).uniform(-0.15, 0.15, len(latency_ms[n]))
        ax.scatter(i + jitter, latency_ms[n], s=4, alpha=0.4)
    ax.set_yscale("log")
    ax.set_ylabel("latency per call, ms (batch 1)")
    ax.set_title("latency distribution", fontsize=10)
    return _png(fig)


def per_layer_plot(per_layer: Mapping[str, Mapping]) -> str:
    """``per_layer``: layer -> {"mean_cosine": ..., "max_abs_error": ...}, in graph order."""
    names = list(per_layer)
    fig = _figure(height=max(2.5, 0.22 * len(names) + 1))
    ax = fig.add_subplot()
    key = "max_abs_error" if all("max_abs_error" in v for v in per_layer.values()) else "mean_cosine"
    values = [float(per_layer[n].get(key, np.nan)) for n in names]
    if key == "mean_cosine":
        values = [max(1.0 - v, 1e-16) for v in values]
    ax.barh(range(len(names)), values, color="#a55b3b")
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("max abs error" if key == "max_abs_error" else "1 - mean cosine")
    ax.set_title("per-layer error", fontsize=10)
    return _png(fig)


_CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.3em .6em;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}.pass{color:#1a7f37}.fail{color:#c62828}
.plots{display:flex;flex-wrap:wrap;gap:1em}figure{margin:0}img{max-width:100%}"""


def _table(header: list[str], rows: list[list]) -> str:
    def cell(v):
        if isinstance(v, float):
            return f"{v:.6g}"
        return html.escape("–" if v is None else str(v))
    out = ["<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"]
    out += ["<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows]
    return "".join(out) + "</table>"


def render_html(report: Mapping, plots: PlotData | None = None) -> str:
    """The whole report as one HTML page (images inline, so a CI artefact opens anywhere)."""
    plots = plots or PlotData()
    meta = report.get("bundle") or {}
    ok = report.get("passed")
    esc = html.escape
    body = [f"<h1>edgemm verification: <span class='{'pass' if ok else 'fail'}'>{'PASS' if ok else 'FAIL'}"
            "</span></h1>",
            f"<p>Bundle <code>{esc(str(meta.get('name')))}</code> · precision {esc(str(meta.get('precision')))} · "
            f"backend {esc(str(meta.get('backend')))} · target {esc(str(meta.get('target')))} · "
            f"{esc(str(report.get('samples')))} samples</p>"]
    if report.get("failures"):
        body.append("<h2>Failures</h2><ul>" + "".join(f"<li class='fail'>{esc(f)}</li>"
                                                       for f in report["failures"]) + "</ul>")
    if report.get("outputs"):
        from .metrics import top1_cell

        body.append("<h2>Bundle vs reference</h2>" + _table(
            ["output", "mean cosine", "min cosine", "max abs err", "top-1 / exact", "pass"],
            [[n, o.get("mean_cosine"), o.get("min_cosine"), o.get("max_abs_error"),
              top1_cell(o), "yes" if o.get("passed") else "NO"]
             for n, o in report["outputs"].items()]))
    gate = report.get("baseline")
    if gate:
        body.append(f"<h2>Baseline gate: {'PASS' if gate['passed'] else 'FAIL'}</h2><p>{esc(gate['file'])}</p>"
                    + _table(["output", "identical", "mean cosine", "max abs err", "limit", "pass"],
                             [[n, o.get("identical"), o.get("mean_cosine"), o.get("max_abs_error"),
                               o.get("max_abs_limit"), "yes" if o.get("passed") else "NO"]
                              for n, o in gate["outputs"].items()]))
        for title in ("notes", "changes"):
            if gate.get(title):
                body.append(f"<p>{title}:</p><ul>" + "".join(f"<li>{esc(x)}</li>" for x in gate[title]) + "</ul>")
    task = report.get("task")
    if task:
        body.append("<h2>Task metric</h2>" + _table(["metric", "reference", "bundle", "drop"],
                                                   [[task["metric"], task.get("reference"), task.get("bundle"),
                                                     task.get("drop")]]))
    lat = report.get("latency")
    if lat:
        body.append("<h2>Latency (batch 1, ms)</h2>" + _table(
            ["who", "p50", "p90", "p99", "mean"],
            [[w, s["p50_ms"], s["p90_ms"], s["p99_ms"], s["mean_ms"]] for w, s in lat.items() if isinstance(s, dict)]))

    figures = []
    for label, per_output in plots.errors.items():
        for name, errors in per_output.items():
            if errors.size:
                figures.append((f"error histogram: {name} {label}", error_histogram(label, name, errors)))
    for label, per_output in plots.cosines.items():
        if per_output:
            figures.append((f"cosine distribution {label}", cosine_plot(label, per_output)))
    if any(len(v) for v in plots.latency_ms.values()):
        figures.append(("latency distribution", latency_plot(plots.latency_ms)))
    per_layer = report.get("per_layer")
    if per_layer:
        figures.append(("per-layer error", per_layer_plot(per_layer)))
    body.append("<h2>Plots</h2>")
    if not per_layer:
        body.append("<p>Per-layer error: not available in this report.</p>")
    body.append("<div class='plots'>" + "".join(
        f"<figure><img alt='{esc(t)}' src='data:image/png;base64,{png}'><figcaption>{esc(t)}</figcaption></figure>"
        for t, png in figures) + "</div>")
    body.append("<details><summary>report.json</summary><pre>" + esc(json.dumps(report, indent=2, default=str))
                + "</pre></details>")
    return ("<!doctype html><html><head><meta charset='utf-8'><title>edgemm report</title>"
            f"<style>{_CSS}</style></head><body>" + "\n".join(body) + "</body></html>\n")


def write_html(path, report: Mapping, plots: PlotData | None = None) -> Path:
    from ..outputs import write_output_text

    return write_output_text(path, render_html(report, plots), field="--html")
