"""The CPU engine search's candidate table as text, for the compile log and report.md (a leaf module:
parity/report.py renders it without importing the search, which judges with parity/verify.py)."""

from __future__ import annotations

from typing import Mapping, Sequence


def format_table(rows: Sequence[Mapping], batches: Sequence[int]) -> str:
    """The candidate table (rows as ``EngineRow.to_dict()``, or as the manifest stores them) for the
    compile log and report.md."""
    with_task = any(r.get("task_metric") is not None for r in rows)
    head = "| candidate | needs one of | " + " | ".join(f"p50/FP32 b{b}" for b in batches) + \
        " | min cosine | " + ("task metric | " if with_task else "") + "build s | status |"
    lines = ["CPU engine candidates (p50 ratio to ONNX Runtime FP32, same run):", head,
             "|" + "---|" * (len(batches) + 5 + with_task)]
    for r in rows:
        ratio = r.get("p50_ratio") or {}
        ratios = " | ".join(f"{ratio[str(b)]:.3f}" if str(b) in ratio else "–" for b in batches)
        need = ", ".join(r.get("requires_any") or []) or "–"
        cos = f"{r['min_cosine']:.5f}" if r.get("min_cosine") is not None else "–"
        build = f"{r['build_s']:.1f}" if r.get("build_s") is not None else "–"
        status = str(r.get("status")) + (f" ({str(r['note'])[:80]})" if r.get("note") else "")
        task = (f"{r['task_metric']:.2f} | " if r.get("task_metric") is not None else "– | ") if with_task else ""
        lines.append(f"| {r.get('name')} | {need} | {ratios} | {cos} | {task}{build} | {status} |")
    return "\n".join(lines)
