"""The gate's Markdown: its section of report.md and a short pull-request summary."""

from __future__ import annotations

from typing import Mapping

from ...display import md_code, md_text


def render_gate_markdown(report: Mapping) -> str:
    """The baseline section: outputs vs golden, task metric, latency ratio, context changes."""
    from ..metrics import top1_cell

    gate = report.get("baseline")
    if not gate:
        return ""
    lines = [f"## Baseline gate: {'PASS' if gate['passed'] else 'FAIL'}", "",
             f"Against `{md_code(gate['file'])}` (recorded {md_text(gate.get('created'))}).", "",
             "| output | vs golden | mean cosine | max abs err (limit) | top-1 / exact | pass |",
             "|---|---|---|---|---|---|"]
    for name, o in gate["outputs"].items():
        how = "missing" if o.get("missing") else ("identical" if o.get("identical") else
                                                  ("stats only" if o.get("golden") is False else "changed"))
        cos = f"{o['mean_cosine']:.6f}" if o.get("mean_cosine") is not None else "–"
        mae = (f"{o['max_abs_error']:.4g} ({o['max_abs_limit']:.3g})" if "max_abs_limit" in o else "–")
        agree = top1_cell(o)
        lines.append(f"| {md_text(name)} | {how} | {cos} | {mae} | {'–' if agree is None else md_text(agree)} | "
                     f"{'yes' if o.get('passed') else '**NO**'} |")
    task = gate.get("task")
    if task:
        lines += ["", f"Task **{md_text(task['metric'])}**: {task['now']:.2f} (baseline {task['baseline']:.2f}, "
                      f"drop {task['drop']:.2f} points) {'ok' if task['passed'] else '**FAIL**'}"]
    lat = gate.get("latency") or {}
    if "change" in lat:
        lines += ["", f"Latency: bundle/anchor {lat['statistic']} ratio {lat['ratio']:.3g} vs baseline "
                      f"{lat['baseline_ratio']:.3g} → **{lat['change']:.2f}x** (tolerance {lat['tolerance']}x) "
                      f"{'ok' if lat['passed'] else '**FAIL**'}; bundle {lat['statistic']} {lat['bundle_ms']:.3f} ms "
                      f"(baseline {lat['baseline_bundle_ms']:.3f} ms, on its own machine)"]

    if gate["failures"]:
        lines += ["", "Failures:", *[f"- {md_text(f)}" for f in gate["failures"]]]
    for title, items in (("Notes", gate.get("notes")), ("Changed since the baseline", gate.get("changes"))):
        if items:
            lines += ["", f"{title}:", *[f"- {md_text(i)}" for i in items]]
    return "\n".join(lines) + "\n"


def render_pr_summary(report: Mapping) -> str:
    """A short Markdown summary for a pull-request comment: verdict first, details folded."""
    from ..report import render_markdown

    meta = report.get("bundle") or {}
    ok = report.get("passed")
    head = (f"### {'✅' if ok else '❌'} edgemm gate {'passed' if ok else 'FAILED'}: `{md_code(meta.get('name'))}` "
            f"({md_text(meta.get('precision'))}, {md_text(meta.get('backend'))}, target {md_text(meta.get('target'))})")
    lines = [head, ""]
    if report.get("failures"):
        lines += [*[f"- {md_text(f)}" for f in report["failures"]], ""]
    gate = report.get("baseline")
    if gate:
        lat = gate.get("latency") or {}
        bits = [f"{sum(1 for o in gate['outputs'].values() if o.get('passed'))}/{len(gate['outputs'])} outputs "
                "within tolerance of the baseline"]
        if gate.get("task"):
            t = gate["task"]
            bits.append(f"{md_text(t['metric'])} {t['now']:.2f} (baseline {t['baseline']:.2f})")
        if "change" in lat:
            bits.append(f"latency {lat['change']:.2f}x the baseline ratio (tolerance {lat['tolerance']}x)")
        elif lat.get("skipped"):
            bits.append(f"latency not gated ({lat['skipped']})")
        lines += ["; ".join(bits) + ".", ""]
    if report.get("baseline_saved"):
        lines += [f"Baseline recorded: `{md_code(report['baseline_saved'])}`.", ""]
    details = render_markdown(report) + ("\n" + render_gate_markdown(report) if gate else "")
    lines += ["<details><summary>Full report</summary>", "", details, "</details>"]
    return "\n".join(lines) + "\n"
