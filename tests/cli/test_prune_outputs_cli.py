"""`edgemm compile --prune 0.3` on fused models whose tower embedding is also a model output: the bundle
keeps every output's width, the summary reports the pruned bundle against the *unpruned* model (not only
against the pruned one, which reads cosine 1.000 for FP32), a too-small recovery set is warned about, and
`edgemm verify` runs on the bundle. Towers: conv + pooling, nn.TransformerEncoder mean, HF BERT pooler."""

import json
import os

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("torch_pruning")

MODULE = "edgemm_test_prune_outputs_models"
SOURCE = '''
import torch
from torch import nn


class ConvPool(nn.Module):
    """Pooled conv features are both an output and the fusion input (listed after the fused logits)."""

    def __init__(self):
        super().__init__()
        self.vision = nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1), nn.BatchNorm2d(32), nn.ReLU(),
                                    nn.Conv2d(32, 32, 3, 2, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.text = nn.Sequential(nn.Embedding(30, 16), nn.Flatten(), nn.Linear(96, 64), nn.ReLU(), nn.Linear(64, 32))
        self.head = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 5))

    def forward(self, image, input_ids):
        v, t = self.vision(image), self.text(input_ids)
        return {"logits": self.head(torch.cat([v, t], -1)), "image_embeds": v, "text_embeds": t}


class TransformerMean(nn.Module):
    """nn.TransformerEncoder text tower; its mean over tokens is an output and the fusion input."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(30, 32)
        self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, batch_first=True), 2,
                                             enable_nested_tensor=False)
        self.vision = nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(64, 5)

    def forward(self, image, input_ids):
        t = self.encoder(self.embed(input_ids)).mean(1)
        return {"logits": self.head(torch.cat([self.vision(image), t], -1)), "text_embeds": t}


class BertPooler(nn.Module):
    """Hugging Face BertModel text tower: its pooler output is returned and fed to the fusion head."""

    def __init__(self):
        super().__init__()
        from transformers import BertConfig, BertModel

        self.text = BertModel(BertConfig(vocab_size=30, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=64, max_position_embeddings=16))
        self.vision = nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(64, 5)

    def forward(self, image, input_ids):
        t = self.text(input_ids=input_ids).pooler_output
        return {"logits": self.head(torch.cat([self.vision(image), t], -1)), "text_embeds": t}


def bert_pooler():
    torch.manual_seed(0)
    return BertPooler()


def conv_pool():
    torch.manual_seed(0)
    return ConvPool()


def transformer_mean():
    torch.manual_seed(0)
    return TransformerMean()
'''


@pytest.fixture()
def factory(tmp_path, monkeypatch):
    (tmp_path / f"{MODULE}.py").write_text(SOURCE)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH")) if p))
    rng = np.random.default_rng(0)
    for name, n in (("calib", 48), ("eval", 24)):
        np.savez(tmp_path / f"{name}.npz", image=rng.standard_normal((n, 3, 16, 16)).astype(np.float32),
                 input_ids=rng.integers(1, 30, (n, 6)).astype(np.int64))
    return tmp_path


@pytest.mark.parametrize("fn, widths", [
    ("conv_pool", {"logits": 5, "image_embeds": 32, "text_embeds": 32}),
    pytest.param("transformer_mean", {"logits": 5, "text_embeds": 32}, marks=pytest.mark.slow),
    pytest.param("bert_pooler", {"logits": 5, "text_embeds": 32}, marks=pytest.mark.slow)])
def test_pruned_bundle_keeps_output_widths_and_reports_against_the_unpruned_model(cli, factory, fn, widths):
    bundle = factory / "bundle"
    res = cli("compile", f"{MODULE}:{fn}", "--prune", "0.3", "--recover", "10", "--calib", factory / "calib.npz",
              "--eval", factory / "eval.npz", "-o", bundle, "--no-thread-tuning", env={"OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert {o["name"]: o["shape"][1] for o in manifest["outputs"]} == widths
    structured = manifest["prune"]["structured"]
    assert structured["total"]["params_after"] < structured["total"]["params_before"]
    assert not any("broke" in n for n in structured["notes"])
    # 48 samples is far too few for recovery: said in the log and recorded
    (warning,) = [w for w in manifest["prune"]["recovery"]["warnings"] if "48 calibration samples" in w]
    assert f"warning: {warning}" in res.stdout

    report = json.loads((bundle / "report.json").read_text())
    # against the pruned model, an FP32 bundle matches (precision changed nothing) ...
    assert all(o["mean_cosine"] > 0.9999 for o in report["outputs"].values())
    # ... against the unpruned model, pruning shows, and that is what the summary leads with
    original = report["vs_original"]
    assert set(original["outputs"]) == set(widths)
    assert min(o["mean_cosine"] for o in original["outputs"].values()) < 0.9999
    assert "pruned bundle vs the unpruned model (24 samples; pruning + precision):" in res.stdout
    assert res.stdout.index("vs the unpruned model") < res.stdout.index("bundle vs the pruned model")
    md = (bundle / "report.md").read_text()
    assert "Pruned bundle vs the unpruned model" in md and f"> Note: {warning}" in md

    res = cli("verify", bundle, "--reference", f"{MODULE}:{fn}", "--data", factory / "eval.npz", "--iterations", "0")
    assert res.returncode in (0, 1), res.stderr  # runs; the unpruned reference may fail the FP32 bar
    assert "Traceback" not in res.stderr
