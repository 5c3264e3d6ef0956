"""Markdown rendering of a verification report (also fits a pull-request comment)."""

from __future__ import annotations

from ..display import md_code, md_text
from .metrics import NEAR_TIE_NOTE, NEAR_ZERO_NOTE, cosine_text, top1_cell


def _fmt(value, digits=6):
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _label(report: dict, who: str) -> str:
    if who == "reference":
        return "reference (FP32 source model)"
    return f"bundle ({str(report.get('bundle', {}).get('precision', '?')).upper()})"


def render_markdown(report: dict) -> str:
    status = "PASS" if report.get("passed") else "FAIL"
    lines = [f"# edgemm parity report: {status}", ""]
    meta = report.get("bundle", {})
    if meta:
        lines.append(f"Bundle `{md_code(meta.get('name'))}` · precision **{md_text(meta.get('precision'))}** · "
                     f"backend {md_text(meta.get('backend'))} · target {md_text(meta.get('target'))} · "
                     f"{report.get('samples')} samples")
        lines.append("")
    if report.get("simulated"):
        lines += [f"> Simulated: {report['simulated']}", ""]
    lines += ["| output | mean cosine | min cosine | max abs err | top-1 agree | pass |",
              "|---|---|---|---|---|---|"]
    for name, o in report.get("outputs", {}).items():
        lines.append(f"| {md_text(name)} | {_fmt(o.get('mean_cosine'))} | {_fmt(o.get('min_cosine'))} | "
                     f"{_fmt(o.get('max_abs_error'), 4)} | {_fmt(top1_cell(o))} | {'yes' if o.get('passed') else 'NO'} |")
    if any(o.get("top1_near_ties") for o in report.get("outputs", {}).values()):
        lines += ["", f"> {md_text(NEAR_TIE_NOTE)}"]
    near_zero = [f"{name}: {cosine_text(o)}" for name, o in report.get("outputs", {}).items()
                 if o.get("near_zero_samples")]
    if near_zero:
        lines += ["", f"> {md_text(NEAR_ZERO_NOTE)}: {md_text('; '.join(near_zero))}"]
    from .split_parts import render_parts

    lines += render_parts(report)
    task = report.get("task")
    if task:
        lines += ["", f"Task metric **{task['metric']}**: {_label(report, 'reference')} "
                      f"{_fmt(task.get('reference'), 2)}, {_label(report, 'bundle')} {_fmt(task.get('bundle'), 2)}"
                      + (f", drop {_fmt(task.get('drop'), 2)} points" if "drop" in task else "")]
    lat = report.get("latency")
    if lat:
        lines += ["", "| latency (batch 1, ms) | p50 | p90 | p99 |", "|---|---|---|---|"]
        for who in ("bundle", "reference"):
            if who in lat:
                s = lat[who]
                lines.append(f"| {_label(report, who)} | {s['p50_ms']:.3f} | {s['p90_ms']:.3f} | {s['p99_ms']:.3f} |")
        if "p50_ratio" in lat:
            lines.append(f"\np50 ratio bundle / reference: **{lat['p50_ratio']:.3f}** (measured side by side)")
    lines += [f"\n> Note: {md_text(note)}" for note in report.get("notes", [])]
    lines += _vs_original_section(report.get("vs_original"))
    lines += _prune_section(report.get("prune"))
    lines += _engines_section(report.get("cpu_engines"))
    if report.get("failures"):
        lines += ["", "## Failures", *[f"- {md_text(f)}" for f in report["failures"]]]
    return "\n".join(lines) + "\n"


def _engines_section(section: dict | None) -> list[str]:
    """The CPU engine search's candidates, measured on the compiling host (quant/cpu_engines.py)."""
    if not section or not isinstance(section.get("table"), list) or not isinstance(section.get("batches"), list):
        return []
    from ..quant.engine_table import format_table

    title, *table = format_table(section["table"], section["batches"]).splitlines()
    carried = ", ".join(section.get("variants") or []) or "the ONNX Runtime model only"
    return ["", "## CPU engines", "", title, "", *table, "",
            f"Variants in this bundle (the runtime runs the first this host supports): {md_text(carried)}"]


def _vs_original_section(section: dict | None) -> list[str]:
    """A pruned bundle against the unpruned source model (the table above compares it with the pruned one)."""
    if not section:
        return []
    lines = ["", "## Pruned bundle vs the unpruned model (pruning + precision)", "",
             f"The table above compares the bundle with the pruned model; this one with the model before "
             f"pruning, on the same {section.get('samples')} samples.", "",
             "| output | mean cosine | min cosine | max abs err | top-1 agree |", "|---|---|---|---|---|"]
    for name, o in section.get("outputs", {}).items():
        lines.append(f"| {md_text(name)} | {_fmt(o.get('mean_cosine'))} | {_fmt(o.get('min_cosine'))} | "
                     f"{_fmt(o.get('max_abs_error'), 4)} | {_fmt(top1_cell(o))} |")
    task = section.get("task")
    if task and "reference" in task:
        lines += ["", f"Task metric **{task['metric']}**: unpruned {_fmt(task['reference'], 2)}, "
                      f"bundle {_fmt(task['bundle'], 2)} ({_fmt(-task['drop'], 2)} points)"]
    return lines


def _prune_section(comparison: dict | None) -> list[str]:
    """The unpruned vs pruned source model (torch), per branch: what pruning bought and cost."""
    if not comparison:
        return []
    lines = ["", "## Pruning: unpruned -> pruned source model", ""]
    branches = comparison.get("branches") or {}
    if branches:
        lat = comparison.get("latency") or {}
        lines += [f"| branch | params | FLOPs | torch CPU ms (batch {lat.get('batch', '?')}) |", "|---|---|---|---|"]
        for name, b in branches.items():
            ms = (f"{b['ms_before']:.2f} -> {b['ms_after']:.2f}" if b.get("ms_before") is not None else "–")
            lines.append(f"| {md_text(name)} | {b['params_before']:,} -> {b['params_after']:,} | "
                         f"{b['flops_before']:,} -> {b['flops_after']:,} | {ms} |")
        if lat:
            lines.append(f"| whole model | | | {lat['total_ms_before']:.2f} -> {lat['total_ms_after']:.2f} |")
    from ..prune.compare import onnx_summary  # numpy only: reports stay torch-free

    onnx = onnx_summary(comparison.get("onnx_latency"))
    if onnx:
        lines += ["", onnx[0].upper() + onnx[1:] + "."]
    task = comparison.get("task")
    if task:
        lines += ["", f"Task metric **{task['metric']}** on {task['samples']} samples: unpruned "
                      f"{task['before']:.2f}, pruned {task['after']:.2f} ({-task['drop']:+.2f} points)"]
    lines += [f"\n> Note: {note}" for note in comparison.get("notes", [])]
    return lines


REPORT_NAMES = ("report.json", "report.md")


def check_report_places(bundle_dir, names=REPORT_NAMES) -> None:
    """Refuse (one-line BundleError) when a folder sits where a report goes: os.replace cannot put a
    file there. Called before a long evaluation so it fails at once, and again right before writing."""
    import os
    import stat
    from pathlib import Path

    from ..errors import BundleError

    for name in names:
        path = Path(bundle_dir) / name
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise BundleError(f"cannot check the report's place ({exc.strerror or exc})", file=path,
                              fix="check the bundle folder's permissions") from exc
        if stat.S_ISDIR(mode):
            raise BundleError("is a folder where edgemm writes its report", file=path,
                              fix=f"remove or rename the folder {name!r}, then rerun")


def write_bundle_reports(bundle_dir, files) -> list:
    """Write report files (``[(name, text), ...]``, e.g. report.json and report.md) into a bundle.

    Each goes to a fresh temp file beside it, then is renamed over the old one: a symbolic link in
    the report's place is replaced itself (never written through), and a failure removes the temp
    file. A folder in a report's place is refused before any report is written (one-line BundleError);
    anything else there (a file, a link, a FIFO) is replaced."""
    from pathlib import Path

    from ..errors import BundleError
    from ..runtime.manifest import write_bytes_atomic

    bundle_dir = Path(bundle_dir)
    check_report_places(bundle_dir, [name for name, _ in files])
    written = []
    for name, text in files:
        path = bundle_dir / name
        try:
            write_bytes_atomic(path, text.encode("utf-8"))
        except OSError as exc:
            raise BundleError(f"cannot write the report ({exc.strerror or exc})", file=path,
                              fix="check the bundle folder's permissions and free space") from exc
        written.append(path)
    return written
