"""Issue 6 through the documented CLI: `edgemm compile --prune --recover` on a zoo model reports what
pruning bought and cost (per branch, before and after), and the pruned INT8 bundle still verifies."""

import json

import numpy as np
import pytest

from edgemm import zoo


@pytest.fixture(scope="module")
def dual_encoder(tmp_path_factory):
    from tests.conftest import run_cli

    ex = tmp_path_factory.mktemp("prune") / "ex"
    res = run_cli("example", "dual-encoder", "-o", ex, "--calib-size", 160)
    assert res.returncode == 0, res.stderr
    return ex


def test_example_writes_the_requested_calibration_size(dual_encoder):
    with np.load(dual_encoder / "calib.npz") as calib:
        assert {k: v.shape[0] for k, v in calib.items()} == {"image": 160, "input_ids": 160}


def test_compile_prune_recover_int8_reports_before_and_after(cli, tmp_path, dual_encoder):
    bundle = tmp_path / "bundle"
    res = cli("compile", dual_encoder / "model.pt2", "--prune", "0.3", "--recover", "40", "--recover-lr", "5e-4",
              "--int8", "--calib", dual_encoder / "calib.npz", "--eval", dual_encoder / "eval.npz", "-o", bundle,
              env={"OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr
    manifest = json.loads((bundle / "manifest.json").read_text())
    prune = manifest["prune"]
    assert prune["recovery"]["lr"] == pytest.approx(5e-4)
    assert prune["recovery"]["samples"] == 160          # recovery trains on every calibration sample
    comparison = prune["comparison"]
    assert set(comparison["branches"]) >= {"vision", "text"}
    for branch in ("vision", "text"):
        b = comparison["branches"][branch]
        assert b["params_after"] < b["params_before"] and b["flops_after"] < b["flops_before"]
        assert b["ms_before"] > 0 and b["ms_after"] > 0
    # The .pt2's attention heads are found in its reshapes and removed (1 of 4 per layer at 0.3).
    sites = prune["structured"]["attention"]
    assert len(sites) == 4 and all(s["heads_after"] == 3 < s["heads_before"] == 4 for s in sites)
    # The deployed graphs, unpruned and pruned, timed side by side in ONNX Runtime.
    onnx = comparison["onnx_latency"]
    assert set(onnx["batches"]) == {"1", "8"}
    for row in onnx["batches"].values():
        assert row["ms_before"] > 0 and row["ms_after"] > 0
        assert row["ratio"] == pytest.approx(row["ms_after"] / row["ms_before"], rel=1e-3)
    task = comparison["task"]
    card = zoo.get("dual-encoder")
    assert task["metric"] == card.metric and task["samples"] == 512
    assert abs(task["before"] - card.fp32_metric) < 0.5      # the unpruned model's own recall@1
    assert 0 <= task["after"] <= 100 and task["drop"] == pytest.approx(task["before"] - task["after"])
    # The pruned reference is what the bundle is verified against; its metric is the comparison's "after".
    report = json.loads((bundle / "report.json").read_text())
    assert report["passed"] and report["task"]["reference"] == pytest.approx(task["after"], abs=0.01)
    # ... and the bundle against the unpruned model, whose metric is the comparison's "before"
    assert report["vs_original"]["task"]["reference"] == pytest.approx(task["before"], abs=0.01)
    assert "pruned bundle vs the unpruned model (512 samples; pruning + precision):" in res.stdout
    assert "warning: --recover on 160 calibration samples" in res.stdout
    md = (bundle / "report.md").read_text()
    assert "Pruning: unpruned -> pruned" in md and f"unpruned {task['before']:.2f}" in md
    assert "task recall@1 on 512 samples: unpruned" in res.stdout
    assert "Whole model as ONNX: batch 1 " in md and "whole model as ONNX: batch 1 " in res.stdout

    # A later verify against the unpruned source keeps the pruning section and says why outputs differ.
    res = cli("verify", bundle, "--reference", dual_encoder / "model.pt2", "--data", dual_encoder / "eval.npz",
              "--iterations", "0")
    assert res.returncode in (0, 1), res.stderr
    if res.returncode:
        assert "fix: the bundle was pruned and --reference is the unpruned model" in res.stderr
    md = (bundle / "report.md").read_text()
    assert "Pruning: unpruned -> pruned" in md and "this bundle was pruned: --reference (the unpruned source)" in md


@pytest.mark.parametrize("value", ["0", "-1e-3", "nan", "2"])
def test_bad_recover_lr_is_one_line(cli, tmp_path, dual_encoder, value):
    res = cli("compile", dual_encoder / "model.pt2", "--prune", "0.3", "--recover", "5", "--recover-lr", value,
              "--calib", dual_encoder / "calib.npz", "-o", tmp_path / "b")
    assert res.returncode == 2
    assert "--recover-lr" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "b").exists()


def test_minilm_attention_heads_are_prunable():
    """The BERT-style tower keeps its head count in attributes, so whole heads are found and removed."""
    pytest.importorskip("torch_pruning")
    from edgemm.prune.heads import find_attention
    from edgemm.zoo.minilm_fused import HEADS, LAYERS, build_minilm_fused

    sites = find_attention(build_minilm_fused(pretrained=False))
    assert len(sites) == LAYERS
    assert all(s.heads == HEADS and s.layout == "separate" and s.out_path.endswith("attention_output")
               for s in sites)
