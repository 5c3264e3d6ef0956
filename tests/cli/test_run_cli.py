"""`edgemm run` keeps per-sample outputs row-aligned with the data, and never cuts a [batch, batch]
similarity down to its first call."""

import numpy as np


def test_batch_by_batch_outputs_are_saved_per_call(cli, tmp_path):
    ex = tmp_path / "ex"
    assert cli("example", "dual-encoder", "-o", ex).returncode == 0
    bundle = tmp_path / "b"
    res = cli("compile", ex / "model.pt2", "--calib", ex / "calib.npz", "-o", bundle)
    assert res.returncode == 0, res.stderr
    with np.load(ex / "eval.npz") as d:
        data = {k: d[k][:12] for k in ("image", "input_ids")}
    np.savez(tmp_path / "in.npz", **data)
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
