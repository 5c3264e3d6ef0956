"""TorchScript archives traced in eval mode under no_grad keep torch's fused transformer fast-path ops
(aten::_native_multi_head_attention, aten::_transformer_encoder_layer_fwd), which torch's TorchScript
ONNX exporter cannot take; edgemm exports them with ONNX forms of the same math (edgemm/onnx_fastpath.py).
Checked against the archive itself on held-out data, padded keys included."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn


class _SelfAttentionTower(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 32)
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, activation="gelu", norm_first=True,
                                                batch_first=True)
        self.head = nn.Linear(32, 5)

    def forward(self, tokens, padding):
        x = self.embed(tokens)
        y, _ = self.attn(x, x, x, key_padding_mask=padding, need_weights=False)
        return self.head(self.layer(y).mean(1))


def _data(n, seed):
    rng = np.random.default_rng(seed)
    padding = np.zeros((n, 8), bool)
    padding[:, 5:] = rng.random((n, 3)) < 0.5  # some keys padded, never all
    return {"tokens": rng.integers(0, 50, (n, 8)).astype(np.int64), "padding": padding}


def test_fast_path_attention_and_encoder_layer_compile_from_torchscript(cli, tmp_path):
    torch.manual_seed(0)
    model = _SelfAttentionTower().eval()
    calib, held = _data(64, 0), _data(32, 1)
    np.savez(tmp_path / "calib.npz", **calib)
    np.savez(tmp_path / "eval.npz", **held)
    with torch.no_grad():
        traced = torch.jit.trace(model, tuple(torch.from_numpy(calib[k][:2]) for k in ("tokens", "padding")))
    graph = str(traced.inlined_graph)
    assert "aten::_native_multi_head_attention" in graph and "aten::_transformer_encoder_layer_fwd" in graph
    torch.jit.save(traced, str(tmp_path / "model.pt"))
    r = cli("compile", tmp_path / "model.pt", "--calib", tmp_path / "calib.npz", "-o", tmp_path / "b",
            "--no-thread-tuning")
    assert r.returncode == 0, r.stdout + r.stderr
    v = cli("verify", tmp_path / "b", "--reference", tmp_path / "model.pt", "--data", tmp_path / "eval.npz",
            "--iterations", "0", "--no-write")
    assert v.returncode == 0, v.stdout + v.stderr
    assert "mean cosine 1.0000" in v.stdout or "1.000000" in v.stdout, v.stdout


class _CrossAttention(nn.Module):
    """Tokens attend to patches (key != query: nn.MultiheadAttention's slow path, packed K/V projection)."""

    def __init__(self):
        super().__init__()
        self.patches = nn.Linear(8, 32)
        self.tokens = nn.Embedding(50, 32)
        self.cross = nn.MultiheadAttention(32, 4, batch_first=True)
        self.head = nn.Linear(32, 5)

    def forward(self, image, tokens):
        q = self.tokens(tokens)
        kv = self.patches(image)
        y, _ = self.cross(q, kv, kv, need_weights=False)
        return self.head((q + y)[:, 0])


def test_cross_attention_traced_on_the_slow_path_compiles_from_torchscript(cli, tmp_path):
    """torch's own TorchScript exporter refuses this archive ("transpose for tensor of unknown rank" after
    aten::unflatten); edgemm's export restores the rank and the bundle matches the archive at another batch."""
    torch.manual_seed(0)
    model = _CrossAttention().eval()
    rng = np.random.default_rng(0)

    def data(n):
        return {"image": rng.standard_normal((n, 6, 8)).astype(np.float32),
                "tokens": rng.integers(0, 50, (n, 7)).astype(np.int64)}

    np.savez(tmp_path / "calib.npz", **data(32))
    np.savez(tmp_path / "eval.npz", **data(24))
    example = tuple(torch.from_numpy(v[:2]) for v in data(2).values())
    with torch.no_grad():
        traced = torch.jit.trace(model, example)
    assert "aten::unflatten" in str(traced.inlined_graph)
    torch.jit.save(traced, str(tmp_path / "model.pt"))
    with pytest.raises(Exception, match="unknown rank"):   # torch alone cannot export it
        torch.onnx.export(torch.jit.load(str(tmp_path / "model.pt")), example, str(tmp_path / "plain.onnx"),
                          dynamo=False)
    r = cli("compile", tmp_path / "model.pt", "--calib", tmp_path / "calib.npz", "-o", tmp_path / "b",
            "--no-thread-tuning")
    assert r.returncode == 0, r.stdout + r.stderr
    v = cli("verify", tmp_path / "b", "--reference", tmp_path / "model.pt", "--data", tmp_path / "eval.npz",
            "--iterations", "0", "--no-write", "--batch-size", "5")
    assert v.returncode == 0, v.stdout + v.stderr


def test_a_scripted_transformer_encoder_fails_in_one_line_naming_the_op_and_what_to_do(cli, tmp_path):
    """torch.jit.script keeps nn.TransformerEncoder's fast-path checks (aten::is_autocast_enabled), for
    which torch's TorchScript exporter has no ONNX form: the error names the op and says to save a .pt2,
    use the factory, or trace instead of script."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    model = nn.Sequential(nn.Linear(4, 16), nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)).eval()
    torch.jit.save(torch.jit.script(model), str(tmp_path / "model.pt"))
    np.savez(tmp_path / "calib.npz", input=np.random.default_rng(0).standard_normal((8, 5, 4)).astype(np.float32))
    r = cli("compile", tmp_path / "model.pt", "--calib", tmp_path / "calib.npz", "-o", tmp_path / "b",
            "--no-thread-tuning")
    assert r.returncode != 0
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "aten::is_autocast_enabled" in errors[0] and "(fix:" in errors[0] and ".pt2" in errors[0]
    assert "torch.jit.trace" in errors[0]
    assert not (tmp_path / "b").exists()
