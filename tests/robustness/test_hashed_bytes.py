"""What the backend reads is what was hashed (issue 14, class 5): a bundle's ONNX external data reaches
ONNX Runtime from the checked bytes in memory, never from the disk, so a file swapped after the check
is not used, and a model cannot read a bundle file that the manifest does not hash (the corpus cases
bundle-external-data-* cover the refusals)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

import edgemm.runtime as rt
from tests.robustness.make_corpus import _t_external, edit_manifest, good_feeds, rehash


@pytest.fixture
def external_bundle(good, tmp_path):
    """The good bundle with its weights as external data in weights.bin, a hashed file of the bundle."""
    bundle = tmp_path / "bundle"
    shutil.copytree(good.bundle, bundle)
    _t_external("weights.bin")(bundle, good, tmp_path)
    edit_manifest(bundle, lambda m: m["files"].update({"weights.bin": "0" * 64}))
    rehash(bundle)
    return bundle


def test_hashed_external_data_loads(good, external_bundle):
    feeds = good_feeds(good, 2)
    want = rt.load(good.bundle).run(feeds)
    got = rt.load(external_bundle).run(feeds)
    assert all(np.array_equal(want[k], got[k]) for k in want)


def test_external_data_swapped_after_the_check_is_not_used(good, external_bundle, monkeypatch):
    """Swap every bundle file for other bytes right before ONNX Runtime builds its session (the window
    between hashing and loading): the session still holds the checked weights."""
    import onnxruntime as ort

    feeds = good_feeds(good, 2)
    want = rt.load(good.bundle).run(feeds)
    real = ort.InferenceSession

    def swap_then_load(*args, **kwargs):
        for name in ("weights.bin", "model.onnx"):
            path = external_bundle / name
            path.write_bytes(bytes(len(path.read_bytes())))  # zeros, same size
        return real(*args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", swap_then_load)
    got = rt.load(external_bundle).run(feeds)
    assert all(np.array_equal(want[k], got[k]) for k in want)
