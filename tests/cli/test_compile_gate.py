"""Compile never passes what verify fails: a failing parity report is a non-zero exit with no bundle, with
or without --eval; without --eval the bundle is judged on calibration samples it was not calibrated on;
top-1 agreement is checked for class-score outputs whatever they are called."""

from __future__ import annotations

import json

import numpy as np
import pytest


def _report(bundle):
    return json.loads((bundle / "report.json").read_text())


def test_compile_exits_non_zero_when_its_own_report_fails(cli, tiny, tmp_path):
    out = tmp_path / "out" / "strict"
    out.parent.mkdir()
    r = cli("compile", tiny["torchscript"], "--int8", "--int8-recipe", "static_u8s8_per_channel", "--calib",
            tiny["calib"], "-o", out, "--min-cosine", "0.99999", "--no-thread-tuning")
    assert r.returncode == 1, r.stdout + r.stderr
    line = r.stderr.strip()
    assert len(line.splitlines()) == 1 and line.startswith(f"error: {tiny['calib']}:")
    assert "held-out samples" in line and "--min-cosine" in line
    assert not out.exists() and list(out.parent.iterdir()) == []     # nothing written, nothing left behind


def test_without_eval_the_bundle_is_judged_on_held_out_calibration_samples(cli, tiny, tmp_path):
    out = tmp_path / "held"
    r = cli("compile", tiny["torchscript"], "--int8", "--int8-recipe", "dynamic_per_channel", "--calib",
            tiny["calib"], "-o", out, "--calib-samples", "40", "--no-thread-tuning")
    assert r.returncode == 0, r.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    judged = _report(out)["judged_on"]
    # 64 samples, 40 calibrate: the 24 after them judge, and nothing is both
    assert manifest["calibration"]["samples"] == 40 and manifest["calibration"]["held_out"] == [40, 64]
    assert judged["source"] == "--calib" and judged["samples"] == 24 and judged["range"] == [40, 64]
    assert "held-out samples 40..63" in r.stdout
    r = cli("compile", tiny["torchscript"], "--fp32", "--calib", tiny["calib"], "--eval", tiny["eval"],
            "-o", tmp_path / "ev", "--no-thread-tuning")
    assert r.returncode == 0, r.stderr
    assert _report(tmp_path / "ev")["judged_on"]["source"] == "--eval"


def test_top1_checked_for_a_logits_output_named_anything(cli, tiny, tmp_path):
    """The tiny model's outputs renamed `foo` (a linear head: class scores) and `bar` (a mean-pooled
    embedding): top-1 agreement for foo, cosine only for bar, in compile and in verify alike."""
    out = tmp_path / "foo"
    r = cli("compile", tiny["torchscript"], "--fp32", "--calib", tiny["calib"], "-o", out,
            "--output-names", "foo,bar", "--no-thread-tuning")
    assert r.returncode == 0, r.stderr
    outputs = _report(out)["outputs"]
    assert outputs["foo"]["top1_agreement"] == 1.0 and outputs["foo"]["kind"] == "scores"
    assert "top1_agreement" not in outputs["bar"]
    r = cli("verify", out, "--reference", tiny["torchscript"], "--data", tiny["eval"], "--json")
    assert r.returncode == 0, r.stderr
    verified = json.loads(r.stdout)["outputs"]
    assert "top1_agreement" in verified["foo"] and "top1_agreement" not in verified["bar"]


def test_output_kinds_follow_the_graph_and_values_not_names():
    from edgemm.parity.metrics import ParityAccumulator
    from edgemm.parity.output_kinds import value_kind

    rng = np.random.default_rng(0)
    scores = rng.standard_normal((8, 5)).astype(np.float32)
    unit = scores / np.linalg.norm(scores, axis=1, keepdims=True)
    assert value_kind(scores) == "scores" and value_kind(unit) == "embedding"
    assert value_kind(scores, made_by_head=False) == "embedding"       # pooled features, by the graph
    assert value_kind(scores[:, :1]) == "other" and value_kind(scores.astype(np.int64)) == "other"
    acc = ParityAccumulator({"foo": True, "bar": False})
    acc.add({"foo": scores, "bar": scores}, {"foo": scores, "bar": scores})
    res = acc.result()
    assert res["foo"].top1_agreement == 1.0 and res["bar"].top1_agreement is None


def test_hold_out_never_judges_on_calibration_samples():
    from edgemm.data import hold_out

    s = hold_out(256)
    assert (s.calibrate, s.judge) == (slice(0, 192), slice(192, 256))
    s = hold_out(1000, cap=256)                   # beyond the cap: judged on samples never calibrated on
    assert (s.calibrate, s.judge) == (slice(0, 256), slice(256, 320))
    s = hold_out(12, multiple=4)                  # a static batch of 4: whole batches on both sides
    assert (s.calibrate, s.judge) == (slice(0, 8), slice(8, 12))
    s = hold_out(1)
    assert s.note and s.judge == s.calibrate


def test_failure_fix_names_the_flag_that_relaxes_it():
    from edgemm.parity.thresholds import relax_flags

    assert relax_flags(["output foo: top-1 agreement 0.9000 < 0.95"]) == "--min-top1"
    assert relax_flags(["output a: mean cosine 0.98 < 0.99", "task top1: 80 vs reference 90 (drop 10 > 1)"]) \
        == "--min-cosine, --max-metric-drop"


@pytest.mark.slow
def test_a_broken_int8_bundle_fails_top1_on_its_decisive_samples(cli, tiny, tmp_path):
    """A real INT8 bundle with its quantization broken (two output channels of the head's INT8 weight
    swapped, the hashes redone): verify fails top-1 on decisive samples, even with the cosine bar off.
    Near-ties are decided by the reference and the precision, so the broken bundle's error excuses nothing."""
    import hashlib

    import onnx
    from onnx import numpy_helper

    out = tmp_path / "int8"
    r = cli("compile", tiny["torchscript"], "--int8", "--int8-recipe", "dynamic_per_channel", "--calib",
            tiny["calib"], "-o", out, "--no-thread-tuning")
    assert r.returncode == 0, r.stderr
    good = _report(out)["outputs"]["logits"]
    assert good["top1_agreement"] == 1.0 and good["top1_decisive"] >= 10   # compile's held-out gate passed it

    model = onnx.load(str(out / "model.onnx"))
    head = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 2
            and i.dims[-1] == 5]
    assert len(head) == 1, [i.name for i in head]   # the 5-class head's INT8 weight
    weight = numpy_helper.to_array(head[0])
    head[0].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(weight[:, [1, 0, 2, 3, 4]]), head[0].name))
    onnx.save(model, str(out / "model.onnx"))
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["files"]["model.onnx"] = hashlib.sha256((out / "model.onnx").read_bytes()).hexdigest()
    (out / "manifest.json").write_text(json.dumps(manifest))

    r = cli("verify", out, "--reference", tiny["torchscript"], "--data", tiny["eval"], "--json", "--no-write",
            "--min-cosine", "0")
    assert r.returncode == 1, r.stdout + r.stderr
    report = json.loads(r.stdout)
    logits = report["outputs"]["logits"]
    assert logits["top1_decisive"] >= 10 and logits["top1_agreement"] < 0.95, logits
    assert [f for f in report["failures"] if f.startswith("output logits: top-1 agreement")], report["failures"]
    assert not [f for f in report["failures"] if "cosine" in f]   # top-1 alone failed it
