"""The baseline gate (issue 7): record a bundle, then gate changed bundles against it — accuracy by
output and metric, latency as a ratio to an anchor timed in the same run — plus its HTML and JUnit
reports. Bundles are compiled once per session from the tiny fused model (FP32, CPU)."""

from __future__ import annotations

import base64
import json
import re
import shutil
import struct
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from edgemm.errors import InputError
from edgemm.parity import gate as bl

PERTURBATION = 0.02  # relative weight noise: a "changed model" (mean cosine ~0.9995, top-1 drops ~6 points)


def _export(model, path: Path) -> Path:
    import torch

    from tests.fixtures.tiny_models import example_args

    batch = torch.export.Dim("batch", min=1, max=64)
    torch.export.save(torch.export.export(model, example_args(), dynamic_shapes=({0: batch}, {0: batch})), str(path))
    return path


def _slow_variant():
    """The tiny model plus a heavy branch multiplied by zero: same outputs, ~10x the work."""
    from torch import nn

    from tests.fixtures.tiny_models import TinyFused, build_tiny

    class Slow(TinyFused):
        def __init__(self):
            super().__init__()
            self.heavy = nn.Sequential(nn.Linear(32, 512), *[nn.Linear(512, 512) for _ in range(4)], nn.Linear(512, 32))

        def forward(self, image, input_ids):
            out = super().forward(image, input_ids)
            return {"logits": out["logits"] + 0.0 * self.heavy(out["text_embeds"])[:, :1],
                    "text_embeds": out["text_embeds"]}

    model = Slow().eval()
    model.load_state_dict(build_tiny().state_dict(), strict=False)
    return model


def build_gate_bundles(root: Path) -> dict[str, Path]:
    """original / perturbed / slow FP32 bundles and eval data labelled by the original model (top-1 =
    100%), built once into ``root`` (shared by the gate tests of all modules in a session)."""
    paths = {"original": root / "original", "perturbed": root / "perturbed", "slow": root / "slow",
             "eval": root / "eval.npz", "model": root / "original.pt2"}
    if (root / "done").is_file():
        return paths
    import torch

    from edgemm.pipeline import compile_model
    from edgemm.config import CompileConfig
    from tests.fixtures.tiny_models import build_tiny, make_data

    root.mkdir(parents=True, exist_ok=True)
    original = build_tiny().eval()
    data = make_data(48, seed=2)
    with torch.no_grad():
        logits = original(torch.from_numpy(data["image"]), torch.from_numpy(data["input_ids"]))["logits"]
    np.savez(paths["eval"], **data, labels=logits.argmax(1).numpy())
    perturbed = build_tiny().eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in perturbed.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * p.std() * PERTURBATION)
    for name, model in (("original", original), ("perturbed", perturbed), ("slow", _slow_variant())):
        src = paths["model"] if name == "original" else root / f"{name}.pt2"
        _export(model, src)
        compile_model(CompileConfig(model=str(src), output=str(paths[name])), say=lambda m: None)
    (root / "done").write_text("ok")
    return paths


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    return build_gate_bundles(tmp_path_factory.getbasetemp() / "edgemm-gate-bundles")


@pytest.fixture(scope="module")
def recorded(bundles, tmp_path_factory):
    """A baseline of the original bundle, recorded with the reference model."""
    path = tmp_path_factory.mktemp("baselines") / "original.json"
    run = bl.run_gate(bundles["original"], bundles["eval"], save=path, reference=str(bundles["model"]), write=False)
    assert run.report["passed"] and run.report["baseline_saved"] == str(path)
    return path


def test_baseline_files_are_small_typed_and_not_pickled(recorded, bundles):
    doc = json.loads(recorded.read_text())
    assert doc["format"] == bl.FORMAT and doc["context"]["precision"] == "fp32"
    assert doc["context"]["backend"] == "onnxruntime" and doc["context"]["target"] == "cpu"
    assert doc["context"]["bundle"]["source_sha256"] and doc["context"]["host"]["cpu"]["model"]
    assert doc["task"] == {"metric": "top1", "outputs": ["logits"], "value": 100.0}
    assert doc["latency"]["ratio"] > 0 and doc["latency"]["percentile"] == bl.LATENCY_PERCENTILE
    assert set(doc["latency"]["gate_stats"]) == {"bundle", "anchor"}  # single-threaded, p50/p90/p99 kept
    assert {"bundle", "reference"} <= set(doc["latency"]["run_stats"]) and doc["latency"]["threads"] == 1
    npz = bl.golden_path(recorded)
    with np.load(npz, allow_pickle=False) as z:
        assert {z[k].dtype for k in z.files} == {np.dtype("float16")}
        assert len(z.files) == 2 * 3  # 2 outputs x 3 batches of 16
    assert npz.stat().st_size < 20_000
    for entry in doc["outputs"].values():
        assert len(entry["sha256"]) == 64 and entry["golden_error"] < 1e-3 * entry["stats"]["abs_max"]


def test_unchanged_bundle_passes_three_runs_on_a_noisy_machine(recorded, bundles):
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        changes = []
        for _ in range(3):
            report = bl.run_gate(bundles["original"], bundles["eval"], baseline=recorded, write=False).report
            assert report["passed"], report["failures"]
            gate = report["baseline"]
            assert all(o["identical"] for o in gate["outputs"].values())
            assert gate["task"]["drop"] == 0
            changes.append(gate["latency"]["change"])
    finally:
        for p in burners:
            p.kill()
            p.wait()
    assert all(0.67 < c < 1.5 for c in changes), changes


def test_changed_model_fails_naming_output_and_metric(recorded, bundles):
    report = bl.run_gate(bundles["perturbed"], bundles["eval"], baseline=recorded, write=False).report
    assert not report["passed"]
    failures = report["baseline"]["failures"]
    assert any(re.match(r"output logits: mean cosine vs golden 0\.\d+ < 0\.9999", f) for f in failures), failures
    assert any(f.startswith("task top1: ") and "vs baseline 100.00" in f for f in failures), failures
    assert "source model changed since the baseline" in report["baseline"]["changes"]
    assert all(f"baseline: {f}" in report["failures"] for f in failures)
    # Loosened tolerances let the same change through: the verdict follows the tolerances.
    loose = dict(min_cosine=0.99, min_top1_agreement=0.5, max_abs_rel=0.5, max_metric_drop=50)
    report = bl.run_gate(bundles["perturbed"], bundles["eval"], baseline=recorded, tolerances=loose,
                         write=False).report
    assert report["passed"], report["failures"]


def test_slower_bundle_fails_the_latency_gate(recorded, bundles):
    report = bl.run_gate(bundles["slow"], bundles["eval"], baseline=recorded, write=False).report
    lat = report["baseline"]["latency"]
    assert lat["change"] > 1.5 and not lat["passed"]
    failures = report["baseline"]["failures"]
    assert len(failures) == 1 and failures[0].startswith("latency: bundle/anchor p10 ratio"), failures
    # A tolerance above the slowdown lets it through.
    report = bl.run_gate(bundles["slow"], bundles["eval"], baseline=recorded, write=False,
                         tolerances={"latency_ratio": lat["change"] * 3}).report
    assert report["passed"], report["failures"]


def _relabelled(bundle: Path, dest: Path, **changes) -> Path:
    """A copy of the bundle whose manifest claims another context (manifest.json is not hashed)."""
    shutil.copytree(bundle, dest)
    manifest = json.loads((dest / "manifest.json").read_text())
    for key, value in changes.items():
        manifest[key]["name" if key in ("target", "backend") else "mode"] = value
    (dest / "manifest.json").write_text(json.dumps(manifest))
    return dest


def test_baseline_from_another_context_is_refused(recorded, bundles, tmp_path):
    fp16 = _relabelled(bundles["original"], tmp_path / "fp16", precision="fp16")
    with pytest.raises(InputError, match=r"baseline was recorded for precision 'fp32', this bundle is 'fp16'") as exc:
        bl.run_gate(fp16, bundles["eval"], baseline=recorded, write=False)
    assert exc.value.field == "context.precision" and "--save-baseline" in exc.value.fix
    jetson = _relabelled(bundles["original"], tmp_path / "jetson", target="jetson-orin-nx")
    with pytest.raises(InputError, match="target 'cpu'"):
        bl.run_gate(jetson, bundles["eval"], baseline=recorded, write=False)


def test_other_eval_data_and_batch_size_are_refused(recorded, bundles, tmp_path):
    with np.load(bundles["eval"]) as z:
        other = {k: z[k][:40] for k in z.files}
    np.savez(tmp_path / "other.npz", **other)
    with pytest.raises(InputError, match="eval data differs from the baseline's"):
        bl.run_gate(bundles["original"], tmp_path / "other.npz", baseline=recorded, write=False)
    with pytest.raises(InputError, match="batch size 8 differs from the baseline's 16"):
        bl.run_gate(bundles["original"], bundles["eval"], baseline=recorded, batch_size=8, write=False)


def test_tampered_or_missing_golden_file_is_refused(recorded, bundles, tmp_path):
    copy = tmp_path / "b.json"
    shutil.copy(recorded, copy)
    with pytest.raises(InputError, match="golden outputs file is missing"):
        bl.run_gate(bundles["original"], bundles["eval"], baseline=copy, write=False)
    with np.load(bl.golden_path(recorded)) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["o0_b0"] = arrays["o0_b0"] + np.float16(1)
    np.savez_compressed(bl.golden_path(copy), **arrays)
    with pytest.raises(InputError, match="sha256 differs"):
        bl.run_gate(bundles["original"], bundles["eval"], baseline=copy, write=False)


def test_digest_only_baseline_gates_on_statistics(bundles, tmp_path):
    path = tmp_path / "digest.json"
    bl.run_gate(bundles["original"], bundles["eval"], save=path, golden="none", iterations=0, write=False)
    assert not bl.golden_path(path).exists()
    same = bl.run_gate(bundles["original"], bundles["eval"], baseline=path, iterations=0, write=False).report
    assert same["passed"] and same["baseline"]["outputs"]["logits"]["identical"]
    assert any("latency not gated" in n for n in same["baseline"]["notes"])
    changed = bl.run_gate(bundles["perturbed"], bundles["eval"], baseline=path, iterations=0, write=False,
                          tolerances={"max_abs_rel": 1e-4}).report
    assert any(f.startswith("output logits: statistics differ") for f in changed["baseline"]["failures"])


def test_save_and_compare_exclude_each_other_and_need_json(bundles, recorded, tmp_path):
    with pytest.raises(InputError, match="exclude each other"):
        bl.run_gate(bundles["original"], bundles["eval"], baseline=recorded, save=tmp_path / "x.json")
    with pytest.raises(InputError, match=r"\.json"):
        bl.run_gate(bundles["original"], bundles["eval"], save=tmp_path / "x.npz")
    with pytest.raises(InputError, match="no such baseline"):
        bl.load_baseline(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text('{"format": "something-else"}')
    with pytest.raises(InputError, match="not an edgemm baseline"):
        bl.load_baseline(tmp_path / "bad.json")


def test_tolerances_default_by_precision_and_are_validated():
    fp32, int8 = bl.GateTolerances.for_precision("fp32"), bl.GateTolerances.for_precision("mixed:int8+fp16")
    assert fp32.min_cosine > int8.min_cosine and fp32.max_abs_rel < int8.max_abs_rel
    assert bl.GateTolerances.for_precision("fp32", min_cosine=0.9).min_cosine == 0.9
    with pytest.raises(InputError, match="below 1"):
        bl.GateTolerances.for_precision("fp32", latency_ratio=0.9)
    with pytest.raises(InputError, match="outside"):
        bl.GateTolerances.for_precision("fp32", min_cosine=1.5)
    with pytest.raises(InputError, match="unknown tolerance"):
        bl.GateTolerances.for_precision("fp32", min_cos=0.9)


def test_embedded_anchor_model_is_the_documented_gemv_chain():
    import onnxruntime as ort

    session = ort.InferenceSession(base64.b64decode(bl.anchor._ANCHOR_ONNX), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["x"] + [f"w{i}" for i in range(bl.ANCHOR_DEPTH)]
    rng = np.random.default_rng(3)
    feeds = {"x": rng.standard_normal((1, 40), dtype=np.float32)}
    feeds.update({f"w{i}": rng.standard_normal((40, 40), dtype=np.float32) / 7 for i in range(bl.ANCHOR_DEPTH)})
    expected = feeds["x"]
    for i in range(bl.ANCHOR_DEPTH):
        expected = np.tanh(expected @ feeds[f"w{i}"])
    np.testing.assert_allclose(session.run(None, feeds)[0], expected, rtol=1e-4, atol=1e-5)
    assert bl.anchor_workload(40)()[0].shape == (1, 40)


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_html_report_renders_its_plots(recorded, bundles, tmp_path):
    from edgemm.parity.html_report import PlotData, write_html

    run = bl.run_gate(bundles["perturbed"], bundles["eval"], baseline=recorded, reference=str(bundles["model"]),
                      keep_reference=True, write=False)
    plots = PlotData.from_batches(run.recorder.outputs["bundle"], reference=run.recorder.outputs["reference"],
                                  golden=run.baseline.golden(), latency_ms=run.latency_ms())
    assert set(plots.errors) == {"vs reference", "vs golden"}
    assert set(plots.latency_ms) == {"bundle", "reference", "bundle (gate, 1 thread)", "anchor (gate, 1 thread)"}
    report = dict(run.report, per_layer={"vision.0": {"max_abs_error": 1e-3}, "fusion.2": {"max_abs_error": 2e-2}})
    html = write_html(tmp_path / "r.html", report, plots).read_text()
    images = re.findall(r"<img alt='([^']*)' src='data:image/png;base64,([A-Za-z0-9+/=]+)'>", html)
    titles = [t for t, _ in images]
    for label in ("vs reference", "vs golden"):
        for output in ("logits", "text_embeds"):
            assert f"error histogram: {output} {label}" in titles
        assert f"cosine distribution {label}" in titles
    assert "latency distribution" in titles and "per-layer error" in titles and len(images) == 8
    for _, data in images:
        width, height = _png_size(base64.b64decode(data))
        assert width >= 400 and height >= 200
    assert "output logits: mean cosine vs golden" in html and "FAIL" in html


def test_junit_names_the_failed_checks(recorded, bundles):
    from edgemm.parity.junit import render_junit

    report = bl.run_gate(bundles["perturbed"], bundles["eval"], baseline=recorded, write=False).report
    root = ET.fromstring(render_junit(report, duration_s=1.5))
    suite = root.find("testsuite")
    cases = {c.get("name"): c for c in suite.findall("testcase")}
    assert set(cases) == {"output[logits]", "output[text_embeds]", "task[top1]", "latency"}
    failed = {n for n, c in cases.items() if c.find("failure") is not None}
    assert int(suite.get("failures")) == len(failed) and {"output[logits]", "task[top1]"} <= failed
    assert cases["output[logits]"].find("failure").get("message").startswith("output logits: ")
    assert cases["latency"].find("failure") is None
    assert suite.find("properties/property[@name='bundle.precision']").get("value") == "fp32"


def test_markdown_summary_leads_with_the_verdict(recorded, bundles):
    report = bl.run_gate(bundles["perturbed"], bundles["eval"], baseline=recorded, write=False).report
    text = bl.render_pr_summary(report)
    first = text.splitlines()[0]
    assert first.startswith("### ❌ edgemm gate FAILED") and "fp32" in first
    assert "- baseline: output logits: mean cosine vs golden" in text
    assert "<details>" in text and "## Baseline gate: FAIL" in text
