"""Structured pruning of a real Hugging Face BertModel text tower inside a fused image+text model.

The BERT tower is built from a small BertConfig with random weights: nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torch_pruning")
pytest.importorskip("transformers")
from torch import nn  # noqa: E402
from transformers import BertConfig, BertModel  # noqa: E402

from edgemm.prune import prune  # noqa: E402
from edgemm.prune.heads import find_attention  # noqa: E402

VOCAB = 1000
SEQ = 32
HEADS = 4
INTERMEDIATE = 512
CLASSES = 10
INPUTS = ("image", "input_ids", "attention_mask")
LAYERS = [f"text_tower.encoder.layer.{i}" for i in range(2)]
MODULE_NAME = "edgemm_test_hf_bert_fused"  # the factory module written for the CLI test


class BertImageFused(nn.Module):
    """A Hugging Face BERT text tower (its [CLS] state) and a conv image tower, joined by torch.cat into a
    linear head."""

    def __init__(self, config):
        super().__init__()
        self.text_tower = BertModel(config, add_pooling_layer=False)
        self.image_tower = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
                                         nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
                                         nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fusion = nn.Linear(config.hidden_size + 32, 10)

    def forward(self, image, input_ids, attention_mask):
        text = self.text_tower(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, 0]
        return self.fusion(torch.cat([self.image_tower(image), text], dim=-1))


def build():
    torch.manual_seed(0)
    config = BertConfig(vocab_size=1000, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=512, max_position_embeddings=64)
    return BertImageFused(config).eval()


def module_source() -> str:
    """The model definition above as a self-contained module, for `edgemm compile MODULE:build`."""
    header = "import torch\nfrom torch import nn\nfrom transformers import BertConfig, BertModel\n\n\n"
    return header + inspect.getsource(BertImageFused) + "\n\n" + inspect.getsource(build)


def make_data(n: int, seed: int) -> dict[str, np.ndarray]:
    """Token ids in [1, VOCAB), an attention mask that pads each row's tail (8 to 32 real tokens, varying
    per row; the first row unpadded, the last 8 tokens long), and images."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(8, SEQ + 1, n)
    lengths[0] = SEQ
    lengths[-1] = 8
    return {"image": rng.standard_normal((n, 3, 32, 32)).astype(np.float32),
            "input_ids": rng.integers(1, VOCAB, (n, SEQ)).astype(np.int64),
            "attention_mask": (np.arange(SEQ)[None, :] < lengths[:, None]).astype(np.int64)}


def run(model, feeds) -> np.ndarray:
    with torch.no_grad():
        return model(*(torch.from_numpy(feeds[k]) for k in INPUTS)).numpy()


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def pruned_bert():
    model = build()
    pruned, report = prune(model, make_data(4, seed=1), make_data(64, seed=0), {"*": 0.3})
    return model, pruned, report


def test_find_attention_recognises_each_bert_layer():
    sites = find_attention(build())
    assert [s.path for s in sites] == [f"{layer}.attention.self" for layer in LAYERS]
    for site in sites:
        assert site.layout == "separate" and site.heads == HEADS and site.head_dim == 128 // HEADS
        assert site.out_path.endswith("attention.output.dense")
        assert site.out_path.startswith(site.path.rsplit(".", 1)[0])  # this layer's output, not another's


def test_prune_removes_heads_and_mlp_channels_of_every_bert_layer(pruned_bert):
    model, pruned, report = pruned_bert
    sites = {s["path"]: s for s in report["attention"]}
    assert set(sites) == {f"{layer}.attention.self" for layer in LAYERS}
    for layer in LAYERS:
        site = sites[f"{layer}.attention.self"]
        assert site["branch"] == "text" and site["layout"] == "separate"
        assert site["heads_before"] == HEADS and 1 <= len(site["removed"]) == HEADS - site["heads_after"]
        attn = pruned.get_submodule(f"{layer}.attention.self")
        width = attn.num_attention_heads * attn.attention_head_size
        assert attn.num_attention_heads == site["heads_after"] < HEADS
        assert attn.all_head_size == width == attn.query.out_features == attn.key.out_features \
            == attn.value.out_features == pruned.get_submodule(f"{layer}.attention.output.dense").in_features
        assert pruned.get_submodule(f"{layer}.intermediate.dense").out_features < INTERMEDIATE
        assert pruned.get_submodule(f"{layer}.output.dense").in_features \
            == pruned.get_submodule(f"{layer}.intermediate.dense").out_features
        # the original is left alone
        assert model.get_submodule(f"{layer}.attention.self").num_attention_heads == HEADS
        assert model.get_submodule(f"{layer}.intermediate.dense").out_features == INTERMEDIATE
    assert report["branches"]["text"]["heads_removed"] >= len(LAYERS)
    total = report["total"]
    assert total["params_after"] < total["params_before"] == n_params(model)
    assert total["params_after"] == n_params(pruned)
    assert report["check"]["max_abs_diff_vs_masked"] < 1e-4

    feeds = make_data(32, seed=2)
    before, after = run(model, feeds), run(pruned, feeds)
    assert after.shape == before.shape == (32, CLASSES)
    assert np.isfinite(after).all()
    # no recovery here: outputs move, but must stay correlated with the unpruned model's
    assert float(cosines(before, after).mean()) > 0.5


def test_padding_is_still_masked_after_pruning(pruned_bert):
    _, pruned, _ = pruned_bert
    feeds = make_data(16, seed=3)
    padded = feeds["attention_mask"] == 0
    assert padded.any(axis=1).sum() >= 8  # most rows are padded
    base = run(pruned, feeds)

    def shifted(where):  # every id at `where` replaced by another valid id
        ids = feeds["input_ids"].copy()
        ids[where] = ids[where] % (VOCAB - 1) + 1
        return dict(feeds, input_ids=ids)

    np.testing.assert_allclose(run(pruned, shifted(padded)), base, atol=1e-5, rtol=0)
    # the same change at attended positions does move the output (the check above is not vacuous)
    assert np.abs(run(pruned, shifted(~padded)) - base).max() > 1e-3


def test_bert_heads_are_pruned_in_an_exported_program(tmp_path):
    """In a .pt2, BERT's head split is view([B, N, -1, head_dim]): the head count is width / head_dim,
    and the -1 follows the pruned width without a rewrite."""
    from edgemm.frontends import load_model
    from edgemm.prune import prunable_module, with_pruned_module

    feeds = make_data(4, seed=1)
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(build(), tuple(torch.from_numpy(feeds[k]) for k in INPUTS),
                                  dynamic_shapes={k: {0: batch} for k in INPUTS})
    torch.export.save(program, tmp_path / "bert.pt2")
    loaded = load_model(str(tmp_path / "bert.pt2"))
    module = prunable_module(loaded)
    assert [(s.path, s.heads) for s in find_attention(module)] == [(f"{layer}.attention.self", HEADS)
                                                                   for layer in LAYERS]
    pruned, report = prune(module, feeds, make_data(64, seed=0), {"*": 0.3}, input_names=loaded.input_names)
    assert report["branches"]["text"]["heads_removed"] == len(LAYERS) and not report["notes"]
    new = with_pruned_module(loaded, pruned, feeds)
    check = make_data(5, seed=4)
    np.testing.assert_allclose(run(new.module, check), run(pruned, check), atol=1e-5)


def test_cli_compile_prunes_recovers_and_quantizes_a_bert_factory(cli, tmp_path, monkeypatch):
    (tmp_path / f"{MODULE_NAME}.py").write_text(module_source())
    # the CLI runs in a subprocess: make `MODULE_NAME:build` importable there
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH")) if p))
    spec = importlib.util.spec_from_file_location(MODULE_NAME, tmp_path / f"{MODULE_NAME}.py")
    written = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(written)
    want = build().state_dict()
    got = written.build().state_dict()
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)  # the model under test

    calib, evalf, out = tmp_path / "calib.npz", tmp_path / "eval.npz", tmp_path / "bundle"
    np.savez(calib, **make_data(64, seed=0))
    eval_feeds = make_data(32, seed=5)
    np.savez(evalf, **eval_feeds)
    # One torch thread: on a busy 2-core machine, two spinning threads in the subprocess run ~50x slower.
    res = cli("compile", f"{MODULE_NAME}:build", "--prune", "0.3", "--recover", "20", "--int8",
              "--calib", calib, "--eval", evalf, "-o", out, "--force", env={"OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["precision"]["mode"] == "int8"
    sites = {s["path"]: s for s in manifest["prune"]["structured"]["attention"]}
    assert set(sites) == {f"{layer}.attention.self" for layer in LAYERS}
    assert all(s["removed"] and s["heads_after"] < HEADS for s in sites.values())
    recovery = manifest["prune"]["recovery"]
    assert recovery["steps"] == 20 and recovery["loss_after"] < recovery["loss_before"]
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] is True

    from edgemm import runtime

    outputs = runtime.load(out).run(eval_feeds)
    (logits,) = outputs.values()
    assert logits.shape == (32, CLASSES) and np.isfinite(logits).all()
