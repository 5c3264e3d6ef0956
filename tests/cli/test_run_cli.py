"""`edgemm run` keeps per-sample outputs row-aligned with the data, and never cuts a [batch, batch]
similarity down to its first call."""

import json

import numpy as np
import pytest

from edgemm.cli.run import _per_sample
from edgemm.iospec import TensorSpec


@pytest.fixture(scope="module")
def dual_encoder(tmp_path_factory):
    from tests.conftest import run_cli

    ex = tmp_path_factory.mktemp("run") / "ex"
    res = run_cli("example", "dual-encoder", "-o", ex)
    assert res.returncode == 0, res.stderr
    return ex


def _bundle_and_inputs(cli, tmp_path, model, calib, evalf, n):
    """Compile ``model`` into tmp_path/b and write its first ``n`` eval samples to tmp_path/in.npz."""
    bundle = tmp_path / "b"
    res = cli("compile", model, "--calib", calib, "-o", bundle)
    assert res.returncode == 0, res.stderr
    with np.load(evalf) as d:
        np.savez(tmp_path / "in.npz", **{k: d[k][:n] for k in ("image", "input_ids")})
    return bundle


def test_batch_by_batch_outputs_are_saved_per_call(cli, tmp_path, dual_encoder):
    ex = dual_encoder
    bundle = _bundle_and_inputs(cli, tmp_path, ex / "model.pt2", ex / "calib.npz", ex / "eval.npz", 12)
    res = cli("run", bundle, "--data", tmp_path / "in.npz", "-o", tmp_path / "out.npz", "--batch-size", 5)
    assert res.returncode == 0, res.stderr
    assert "logits_per_image" in res.stderr and "saved per call" in res.stderr
    with np.load(tmp_path / "out.npz") as out:
        assert out["image_embeds"].shape[0] == out["text_embeds"].shape[0] == 12
        assert [out[f"logits_per_image.{i}"].shape for i in range(3)] == [(5, 5), (5, 5), (2, 2)]
        assert "logits_per_image" not in out.files
        # Each call's matrix is that call's image x text similarity (up to the logit scale).
        sim = out["image_embeds"][5:10] @ out["text_embeds"][5:10].T
        scale = out["logits_per_image.1"][0, 0] / sim[0, 0]
        np.testing.assert_allclose(out["logits_per_image.1"], scale * sim, rtol=1e-4, atol=1e-4)
    res = cli("run", bundle, "--data", tmp_path / "in.npz", "-o", tmp_path / "all.npz", "--batch-size", 12)
    assert res.returncode == 0 and "saved per call" not in res.stderr
    with np.load(tmp_path / "all.npz") as out:
        assert out["logits_per_image"].shape == (12, 12)


def test_torchscript_batch_by_batch_output_with_two_symbols_is_saved_per_call(cli, tmp_path, dual_encoder):
    """The TorchScript exporter names the similarity's axes after different tensors
    (Divimage_embeds_dim_0 x Divtext_embeds_dim_0); edgemm renames both to the batch symbol they equal.
    Calls of equal size must still not be stacked."""
    ex = dual_encoder
    bundle = _bundle_and_inputs(cli, tmp_path, ex / "model.pt", ex / "calib.npz", ex / "eval.npz", 64)
    logits_shape = next(o["shape"] for o in json.loads((bundle / "manifest.json").read_text())["outputs"]
                        if o["name"] == "logits_per_image")
    assert logits_shape == ["batch", "batch"], logits_shape
    # 64 samples in 2 calls of 32: every call has the same shape, so only the call size can tell.
    res = cli("run", bundle, "--data", tmp_path / "in.npz", "-o", tmp_path / "out.npz", "--batch-size", 32)
    assert res.returncode == 0, res.stderr
    assert "note: logits_per_image" in res.stderr and "saved per call" in res.stderr
    with np.load(tmp_path / "out.npz") as out:
        assert "logits_per_image" not in out.files
        assert [out[f"logits_per_image.{i}"].shape for i in range(2)] == [(32, 32), (32, 32)]
        assert "logits_per_image.2" not in out.files
        assert out["image_embeds"].shape == out["text_embeds"].shape == (64, 64)
        sim = out["image_embeds"][32:] @ out["text_embeds"][32:].T
        scale = out["logits_per_image.1"][0, 0] / sim[0, 0]
        np.testing.assert_allclose(out["logits_per_image.1"], scale * sim, rtol=1e-4, atol=1e-4)
    # [batch, 64] embeddings at --batch-size 64 over 128 samples: 64 is a fixed int, so rows still stack.
    with np.load(ex / "eval.npz") as d:
        np.savez(tmp_path / "in128.npz", **{k: d[k][:128] for k in ("image", "input_ids")})
    res = cli("run", bundle, "--data", tmp_path / "in128.npz", "-o", tmp_path / "out64.npz", "--batch-size", 64)
    assert res.returncode == 0, res.stderr
    notes = [line for line in res.stderr.splitlines() if line.startswith("note:")]
    assert [n.split()[1] for n in notes] == ["logits_per_image"]
    with np.load(tmp_path / "out64.npz") as out:
        assert out["image_embeds"].shape == out["text_embeds"].shape == (128, 64)
        assert [out[f"logits_per_image.{i}"].shape for i in range(2)] == [(64, 64), (64, 64)]


def test_fixed_width_output_is_concatenated_when_the_batch_equals_its_width(cli, tmp_path, tiny, tiny_bundle):
    """tiny's logits are [batch, 5]: at --batch-size 5 every call gives [5, 5], still one row per sample."""
    with np.load(tiny["eval"]) as d:
        data = {k: d[k][:10] for k in ("image", "input_ids")}
    np.savez(tmp_path / "in.npz", **data)
    res = cli("run", tiny_bundle, "--data", tmp_path / "in.npz", "-o", tmp_path / "out.npz", "--batch-size", 5)
    assert res.returncode == 0, res.stderr
    assert "saved per call" not in res.stderr
    with np.load(tmp_path / "out.npz") as out:
        assert out["logits"].shape == (10, 5)
        assert out["text_embeds"].shape == (10, 32)
        assert sorted(out.files) == ["logits", "text_embeds"]


def _spec(name, *shape):
    return TensorSpec(name, "float32", tuple(shape))


DYNAMIC = [_spec("image", "batch", 3, 8, 8), _spec("ids", "batch", "seq")]


@pytest.mark.parametrize("shape, sizes, part_shapes, expected", [
    (("batch", 10), [10, 10], [(10, 10), (10, 10)], True),            # fixed width equal to the batch
    (("a_dim_0", "b_dim_0"), [4, 4], [(4, 4), (4, 4)], False),        # made-up symbols, both follow the call
    (("batch", "batch"), [4, 2], [(4, 4), (2, 2)], False),
    (("a_dim_0", "b_dim_0"), [4, 2], [(4, 4), (2, 2)], False),        # changes with the call size
    (("a_dim_0", "n_boxes"), [4, 2], [(4, 7), (2, 7)], True),         # a symbol that is not the batch
    (("a_dim_0", "n_boxes"), [4, 4], [(4, 4), (4, 4)], False),        # ...cannot be told from it here
    (("batch", "seq"), [4, 4], [(4, 4), (4, 4)], True),               # an input's sequence axis
    (("batch", "batch_x"), [4, 2], [(4, 3), (2, 5)], False),          # varies between calls: no stacking
    ((16, 10), [16, 16], [(16, 10), (16, 10)], False),                # fixed axis 0 in a dynamic bundle
    ((), [4, 4], [(), ()], False),
])
def test_per_sample_rule(shape, sizes, part_shapes, expected):
    parts = [np.zeros(s, np.float32) for s in part_shapes]
    assert _per_sample(_spec("y", *shape), parts, sizes, DYNAMIC) is expected


def test_per_sample_rule_static_batch():
    static = [_spec("image", 4, 3, 8, 8)]
    four = [np.zeros((4, 10)), np.zeros((4, 10))]
    assert _per_sample(_spec("y", 4, 10), four, [4, 4], static) is True
    square = [np.zeros((4, 4)), np.zeros((4, 4))]
    assert _per_sample(_spec("y", 4, 4), square, [4, 4], static) is False   # [k, k]: may be a similarity
    assert _per_sample(_spec("y", 1, 1), [np.zeros((1, 1))] * 3, [1, 1, 1], [_spec("x", 1, 3)]) is True
