"""JUnit XML from a verification report, for CI systems that show test results (GitHub, GitLab,
Jenkins, Azure). One test case per checked item: each output vs the reference, the task metric, and,
when gated, each output vs its golden copy, the task metric and latency vs the baseline."""

from __future__ import annotations

import socket
import xml.etree.ElementTree as ET
from datetime import datetime, timezone
from pathlib import Path
from typing import Mapping

from ..display import xml_text
from ..outputs import write_output_text


def _messages(failures: list[str], prefix: str) -> list[str]:
    return [f for f in failures if f.startswith(prefix)]


def junit_cases(report: Mapping) -> list[dict]:
    """(classname suffix, name, failure messages, skipped reason) for every check in the report."""
    cases = []
    failures = [f for f in report.get("failures", []) if not f.startswith("baseline: ")]
    for name in report.get("outputs", {}):
        cases.append({"group": "parity", "name": f"output[{name}]",
                      "failures": _messages(failures, f"output {name}:")})
    task = report.get("task")
    if task and "drop" in task:
        cases.append({"group": "parity", "name": f"task[{task['metric']}]",
                      "failures": _messages(failures, f"task {task['metric']}:")})
    gate = report.get("baseline")
    if gate:
        for name in gate["outputs"]:
            cases.append({"group": "baseline", "name": f"output[{name}]",
                          "failures": _messages(gate["failures"], f"output {name}:")})
        if gate.get("task"):
            metric = gate["task"]["metric"]
            cases.append({"group": "baseline", "name": f"task[{metric}]",
                          "failures": _messages(gate["failures"], f"task {metric}:")})
        lat = gate.get("latency") or {}
        cases.append({"group": "baseline", "name": "latency", "failures": _messages(gate["failures"], "latency:"),
                      "skipped": lat.get("skipped")})
    if not cases:
        cases.append({"group": "parity", "name": "run", "failures": [],
                      "skipped": "nothing to compare: pass --reference or --baseline"})
    # Anything not matched above (a future check) still fails the suite, under its own case.
    matched = {(c["group"], m) for c in cases for m in c["failures"]}
    rest = [f for f in failures if ("parity", f) not in matched]
    rest += [f"baseline: {f}" for f in (gate or {}).get("failures", []) if ("baseline", f) not in matched]
    if rest:
        cases.append({"group": "parity", "name": "other", "failures": rest})
    return cases


def render_junit(report: Mapping, *, duration_s: float = 0.0, system_out: str | None = None) -> str:
    meta = report.get("bundle") or {}
    bundle = str(meta.get("name") or "bundle")
    cases = junit_cases(report)
    n_fail = sum(1 for c in cases if c["failures"])
    n_skip = sum(1 for c in cases if c.get("skipped") and not c["failures"])
    root = ET.Element("testsuites", name="edgemm", tests=str(len(cases)), failures=str(n_fail),
                      errors="0", skipped=str(n_skip), time=f"{duration_s:.3f}")
    suite = ET.SubElement(root, "testsuite", name=f"edgemm.verify.{bundle}", tests=str(len(cases)),
                          failures=str(n_fail), errors="0", skipped=str(n_skip), time=f"{duration_s:.3f}",
                          timestamp=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                          hostname=socket.gethostname())
    props = ET.SubElement(suite, "properties")
    for key in ("name", "path", "precision", "backend", "target"):
        if meta.get(key) is not None:
            ET.SubElement(props, "property", name=f"bundle.{key}", value=str(meta[key]))
    gate = report.get("baseline")
    if gate:
        ET.SubElement(props, "property", name="baseline", value=str(gate["file"]))
        lat = gate.get("latency") or {}
        if "change" in lat:
            ET.SubElement(props, "property", name="latency.change", value=f"{lat['change']:.4f}")
    for case in cases:
        el = ET.SubElement(suite, "testcase", classname=f"edgemm.{bundle}.{case['group']}", name=case["name"],
                           time="0")
        if case["failures"]:
            failure = ET.SubElement(el, "failure", message=case["failures"][0], type="ParityFailure")
            failure.text = "\n".join(case["failures"])
        elif case.get("skipped"):
            ET.SubElement(el, "skipped", message=str(case["skipped"]))
    if system_out:
        ET.SubElement(suite, "system-out").text = system_out
    for el in root.iter():  # names from the bundle may hold characters XML 1.0 cannot carry
        if el.text:
            el.text = xml_text(el.text)
        el.attrib = {k: xml_text(v) for k, v in el.attrib.items()}
    ET.indent(root)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def write_junit(path, report: Mapping, **kwargs) -> Path:
    path = Path(path)
    text = render_junit(report, **kwargs)
    return write_output_text(path, text, field="--junit")
