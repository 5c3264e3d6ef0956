"""`--precision vision=int8,text=fp32` without `--branch` hints on a model wrapped in one top-level module,
whose fusion is an nn.MultiheadAttention cross-attention: the towers are found from the data flow (the
wrapper is looked through), only the vision tower is quantized, and the bundle verifies."""

import json
import os

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("onnx")

MODULE = "edgemm_test_branches_wrapped"
SOURCE = '''
import torch
from torch import nn


class CrossAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.vision = nn.Sequential(nn.Conv2d(3, 32, 4, 4), nn.ReLU(), nn.Conv2d(32, 32, 1), nn.ReLU())
        self.text = nn.Embedding(30, 32)
        self.text_mix = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32))
        self.cross = nn.MultiheadAttention(32, 4, batch_first=True)
        self.head = nn.Linear(32, 5)

    def forward(self, image, input_ids):
        patches = self.vision(image).flatten(2).transpose(1, 2)
        queries = self.text_mix(self.text(input_ids))
        fused, _ = self.cross(queries, patches, patches, need_weights=False)
        return self.head(fused.mean(1))


class Wrapped(nn.Module):
    def __init__(self):
        super().__init__()
        self.model = CrossAttention()

    def forward(self, image, input_ids):
        return self.model(image, input_ids)


def build():
    torch.manual_seed(0)
    return Wrapped()
'''


def test_per_branch_precision_on_a_wrapped_model_without_hints(cli, tmp_path, monkeypatch):
    (tmp_path / f"{MODULE}.py").write_text(SOURCE)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH")) if p))
    rng = np.random.default_rng(0)
    for name, n in (("calib", 32), ("eval", 16)):
        np.savez(tmp_path / f"{name}.npz", image=rng.standard_normal((n, 3, 16, 16)).astype(np.float32),
                 input_ids=rng.integers(0, 30, (n, 6)).astype(np.int64))
    bundle = tmp_path / "bundle"
    res = cli("compile", f"{MODULE}:build", "--precision", "vision=int8,text=fp32", "--calib", tmp_path / "calib.npz",
              "--eval", tmp_path / "eval.npz", "-o", bundle, "--no-thread-tuning", env={"OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr
    section = json.loads((bundle / "manifest.json").read_text())["precision"]
    # The mode is a structured value (edgemm/precision.py), not the "mixed:fp32+int8" text of older bundles.
    assert section["mode"] == "mixed" and section["precisions"] == ["fp32", "int8"]
    assert section["per_branch"] == {"vision": "int8", "text": "fp32", "fusion": "fp32"}
    recipe = section["recipe"]
    table = recipe["branches"]
    assert table["vision"]["precision"] == "int8" and table["text"]["precision"] == "fp32"
    assert table["vision"]["inputs"] == ["image"] and table["text"]["inputs"] == ["input_ids"]
    assert "model.vision" in table["vision"]["modules"] and "model.cross" in table["fusion"]["modules"]
    assert table["vision"]["quantized_nodes"] >= 2                   # both vision convs
    assert table["text"]["quantized_nodes"] == 0 == table["fusion"]["quantized_nodes"]

    res = cli("verify", bundle, "--reference", f"{MODULE}:build", "--data", tmp_path / "eval.npz", "--iterations", "0")
    assert res.returncode == 0, res.stdout + res.stderr
