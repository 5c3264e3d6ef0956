"""`edgemm verify --save-baseline / --baseline` as a CI job runs it: exit codes, the one-line error naming
the output and metric, and the JUnit / Markdown / HTML files left for the CI system."""

from __future__ import annotations

import json
import re
import shutil
import xml.etree.ElementTree as ET

import pytest

from tests.unit.test_baseline import build_gate_bundles


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    return build_gate_bundles(tmp_path_factory.getbasetemp() / "edgemm-gate-bundles")


@pytest.fixture(scope="module")
def baseline(bundles, tmp_path_factory):
    from tests.conftest import run_cli

    path = tmp_path_factory.mktemp("ci") / "baselines" / "tiny.json"
    res = run_cli("verify", bundles["original"], "--data", bundles["eval"], "--save-baseline", path,
                  "--iterations", "30", "--no-write")
    assert res.returncode == 0, res.stderr
    assert f"baseline written: {path}" in res.stderr
    return path


def last_line(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr
    return lines[-1]


def test_unchanged_bundle_passes_and_leaves_ci_reports(cli, bundles, baseline, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(bundles["original"], bundle)
    out = tmp_path / "reports"
    res = cli("verify", bundle, "--data", bundles["eval"], "--baseline", baseline, "--iterations", "30",
              "--junit", out / "edgemm.xml", "--markdown", out / "comment.md", "--html", out / "report.html")
    assert res.returncode == 0, res.stderr
    assert "## Baseline gate: PASS" in res.stdout and "| logits | identical |" in res.stdout
    suite = ET.parse(out / "edgemm.xml").getroot().find("testsuite")
    assert suite.get("failures") == "0" and int(suite.get("tests")) == 4
    assert (out / "comment.md").read_text().startswith("### ✅ edgemm gate passed: `original`")
    html = (out / "report.html").read_text()
    assert len(re.findall(r"src='data:image/png;base64,", html)) == 4  # 2 error histograms, cosine, latency
    report = json.loads((bundle / "report.json").read_text())  # the bundle's own report carries the gate
    assert report["baseline"]["passed"] and "## Baseline gate: PASS" in (bundle / "report.md").read_text()


def test_changed_model_exits_1_naming_output_and_metric(cli, bundles, baseline, tmp_path):
    res = cli("verify", bundles["perturbed"], "--data", bundles["eval"], "--baseline", baseline, "--iterations",
              "30", "--no-write", "--junit", tmp_path / "j.xml", "--markdown", tmp_path / "c.md")
    assert res.returncode == 1, res.stderr
    error = last_line(res.stderr)
    assert error.startswith("error: ") and "baseline: output logits: mean cosine vs golden" in error
    assert "baseline: task top1: " in error and "re-record the baseline" in error
    suite = ET.parse(tmp_path / "j.xml").getroot().find("testsuite")
    failed = [c.get("name") for c in suite.findall("testcase") if c.find("failure") is not None]
    assert "output[logits]" in failed and "task[top1]" in failed and "latency" not in failed
    assert (tmp_path / "c.md").read_text().startswith("### ❌ edgemm gate FAILED")


def test_refusals_exit_2_with_one_line(cli, bundles, baseline, tmp_path):
    relabelled = tmp_path / "int8"
    shutil.copytree(bundles["original"], relabelled)
    manifest = json.loads((relabelled / "manifest.json").read_text())
    manifest["precision"]["mode"] = "int8"
    (relabelled / "manifest.json").write_text(json.dumps(manifest))
    cases = [
        (["verify", relabelled, "--baseline", baseline], "context.precision: baseline was recorded for precision "
                                                         "'fp32', this bundle is 'int8'"),
        (["verify", bundles["original"], "--baseline", baseline, "--save-baseline", tmp_path / "n.json"],
         "exclude each other"),
        (["verify", bundles["original"], "--baseline", tmp_path / "missing.json"], "no such baseline"),
        (["verify", bundles["original"], "--baseline", baseline, "--batch-size", "4"],
         "batch size 4 differs from the baseline's 16"),
        (["verify", bundles["original"], "--baseline", baseline, "--latency-tolerance", "0.5"], "below 1"),
    ]
    for args, message in cases:
        res = cli(*args, "--data", bundles["eval"], "--no-write", "--iterations", "5")
        assert res.returncode == 2, (args, res.stderr)
        assert message in last_line(res.stderr), (args, res.stderr)
