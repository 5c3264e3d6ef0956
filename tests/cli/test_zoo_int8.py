"""Issue-3 acceptance through the documented CLI: every zoo model's INT8 bundle keeps its task metric
within 1 point of the FP32 reference, as `edgemm verify` reports it."""

import json

import pytest

from edgemm import zoo


@pytest.mark.parametrize("name", zoo.names())
def test_zoo_int8_within_one_point(cli, tmp_path, name):
    ex = tmp_path / "ex"
    res = cli("example", name, "-o", ex)
    assert res.returncode == 0, res.stderr
    bundle = tmp_path / "bundle"
    res = cli("compile", ex / "model.pt2", "--int8", "--calib", ex / "calib.npz", "-o", bundle)
    assert res.returncode == 0, res.stderr
    res = cli("verify", bundle, "--reference", ex / "model.pt", "--data", ex / "eval.npz", "--json",
              "--iterations", "3", "--max-metric-drop", "1.0")
    assert res.returncode == 0, res.stderr
    task = json.loads(res.stdout)["task"]
    card = zoo.get(name)
    assert task["metric"] == card.metric
    assert abs(task["reference"] - card.fp32_metric) < 0.5     # the shipped weights' recorded FP32 metric
    assert task["reference"] - task["bundle"] <= 1.0
