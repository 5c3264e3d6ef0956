"""Compiling from --input shapes alone (no calibration or eval data) must still give a bundle whose
batch really is dynamic, as its manifest says."""

import os
from pathlib import Path

import numpy as np

from edgemm import runtime

ROOT = Path(__file__).resolve().parents[2]

# A ViT-style image tower with a GRU audio tower: exported from a batch-1 example, the GRU specialises
# the batch to 1 (the bug this guards against).
MODEL = '''
import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, d=32, h=4):
        super().__init__()
        self.h = h
        self.norm = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, N, 3, self.h, C // self.h).permute(2, 0, 3, 1, 4).unbind(0)
        a = ((q @ k.transpose(-2, -1)) * (C // self.h) ** -0.5).softmax(-1)
        return x + self.proj((a @ v).transpose(1, 2).reshape(B, N, C))


class ClsTokenNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 32, 4, 4)
        self.cls = nn.Parameter(torch.randn(1, 1, 32))
        self.block = Block()
        self.audio = nn.GRU(8, 16, num_layers=2, batch_first=True, bidirectional=True)
        self.head = nn.Linear(64, 4)

    def forward(self, image, audio):
        x = self.patch(image).flatten(2).transpose(1, 2)
        x = self.block(torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1))
        a, _ = self.audio(audio)
        return self.head(torch.cat([x[:, 0], a.mean(1)], -1))


def build():
    torch.manual_seed(0)
    return ClsTokenNet().eval()
'''


def test_input_flags_only_give_a_dynamic_batch_bundle(cli, tmp_path):
    (tmp_path / "clsnet.py").write_text(MODEL)
    out = tmp_path / "b"
    res = cli("compile", "clsnet:build", "--input", "image:1x3x16x16:float32", "--input", "audio:1x10x8:float32",
              "-o", out, env={"PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"})
    assert res.returncode == 0, res.stderr
    bundle = runtime.load(out)
    assert [s.shape[0] for s in bundle.inputs] == ["batch", "batch"]
    rng = np.random.default_rng(3)
    feeds = {"image": rng.standard_normal((5, 3, 16, 16)).astype(np.float32),
             "audio": rng.standard_normal((5, 10, 8)).astype(np.float32)}
    outputs = bundle.run(feeds)
    assert all(np.asarray(v).shape[0] == 5 for v in outputs.values())


def test_max_metric_drop_reaches_the_compile_verification(cli, tiny, tmp_path):
    out = tmp_path / "b"
    res = cli("compile", tiny["torchscript"], "--calib", tiny["calib"], "--eval", tiny["eval"],
              "--max-metric-drop", "2.5", "-o", out)
    assert res.returncode == 0, res.stderr
    import json
    assert json.loads((out / "report.json").read_text())["thresholds"]["max_metric_drop"] == 2.5
    res = cli("compile", tiny["torchscript"], "--calib", tiny["calib"], "--eval", tiny["eval"],
              "--max-metric-drop", "-1", "-o", tmp_path / "c")
    assert res.returncode == 2 and "--max-metric-drop" in res.stderr and not (tmp_path / "c").exists()


def test_static_batch_on_a_program_with_a_dynamic_batch_is_refused(cli, tiny, tmp_path):
    """A .pt2 carries its own dims: --static-batch cannot fix them, and must not be silently ignored."""
    res = cli("compile", tiny["pt2"], "--static-batch", "--calib", tiny["calib"], "-o", tmp_path / "b")
    assert res.returncode == 2 and not (tmp_path / "b").exists()
    line, = res.stderr.strip().splitlines()
    assert "--static-batch: axis 0 of" in line and "is dynamic in the model file itself" in line
    assert str(tiny["pt2"]) in line
