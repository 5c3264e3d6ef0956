"""ONNX files as authors export them (the TorchScript exporter, batch axis named `b`, an L2-normalised
embedding beside logits), through the CLI: found by trying models nobody here wrote."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from edgemm.errors import InputError


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.img = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.aud = nn.Sequential(nn.Linear(16, 8), nn.Tanh())
        self.proj = nn.Linear(16, 12)
        self.cls = nn.Linear(16, 5)

    def forward(self, image, audio):
        z = torch.cat([self.img(image), self.aud(audio)], -1)
        return self.cls(z), F.normalize(self.proj(z), dim=-1)


@pytest.fixture(scope="module")
def two_heads(tmp_path_factory):
    folder = tmp_path_factory.mktemp("onnx-b")
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    data = {"image": rng.standard_normal((48, 3, 16, 16)).astype(np.float32),
            "audio": rng.standard_normal((48, 16)).astype(np.float32)}
    np.savez(folder / "calib.npz", **data)
    args = tuple(torch.from_numpy(v[:2]) for v in data.values())
    axes = {n: {0: "b"} for n in ("image", "audio", "logits", "embedding")}
    torch.onnx.export(TwoHeads().eval(), args, str(folder / "model.onnx"), input_names=["image", "audio"],
                      output_names=["logits", "embedding"], dynamic_axes=axes, dynamo=False)
    return folder


def test_an_onnx_files_batch_axis_is_batch_in_outputs_too(cli, two_heads, tmp_path):
    """Inputs were renamed to `batch` but outputs kept the file's `b`, so `export triton` found no shared
    batch axis and wrote max_batch_size 0 (no batching) for a model that batches."""
    import edgemm.runtime as rt
    from edgemm.serving.triton_config import find_batching

    res = cli("compile", two_heads / "model.onnx", "--calib", two_heads / "calib.npz", "-o", tmp_path / "b",
              "--no-thread-tuning", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert [o["shape"][0] for o in manifest["outputs"]] == ["batch", "batch"]
    assert manifest["outputs"][1]["shape"][1] == "embedding_dim1"        # not the exporter's Div... name
    bundle = rt.load(tmp_path / "b")
    assert find_batching(bundle.inputs, bundle.outputs).max_batch == 64
    out = bundle.run({"image": np.zeros((3, 3, 16, 16), np.float32), "audio": np.zeros((3, 16), np.float32)})
    assert out["logits"].shape == (3, 5) and out["embedding"].shape == (3, 12)


def test_accuracy_target_compiles_and_reports_strict_json(cli, two_heads, tmp_path):
    """--accuracy-target turned the gate's metric bar off with inf, which the threshold check refuses:
    every --accuracy-target compile ended in 'error: --max-metric-drop: inf is not a finite number'."""
    res = cli("compile", two_heads / "model.onnx", "--int8", "--accuracy-target", "cosine>=0.99",
              "--calib", two_heads / "calib.npz", "-o", tmp_path / "b", "--cpu-engines", "onnxruntime",
              "--no-thread-tuning", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    report = json.loads((tmp_path / "b" / "report.json").read_text(),
                        parse_constant=lambda c: pytest.fail(f"report.json holds {c}"))
    assert report["passed"] and report["thresholds"]["max_metric_drop"] == 100.0


def test_a_user_inf_bar_is_still_refused():
    from edgemm.parity.thresholds import DEFAULTS, with_overrides

    with pytest.raises(InputError, match="max-metric-drop"):
        with_overrides(DEFAULTS["int8"], max_metric_drop=float("inf"))
