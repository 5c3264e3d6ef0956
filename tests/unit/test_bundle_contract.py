"""A bundle keeps to its manifest: a batch outside the compiled range is refused in one line on every
backend, and verify times the reference on the bundle's own thread count."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from edgemm.errors import InputError


def test_batch_outside_the_manifest_range_is_refused(tiny_bundle):
    from edgemm import runtime
    from tests.fixtures.tiny_models import make_data

    bundle = runtime.load(tiny_bundle)
    spec = next(s for s in bundle.inputs if s.name == "image")
    top = spec.ranges[spec.shape[0]].max
    assert bundle.run(make_data(top))              # the whole range runs
    with pytest.raises(InputError) as err:
        bundle.run(make_data(top + 1))
    text = str(err.value)
    assert "\n" not in text and f"1..{top}" in text and f"--batch-size {top}" in text


def test_verify_times_the_reference_on_the_bundles_thread_count(tiny, tiny_bundle, tmp_path, monkeypatch):
    import torch

    from edgemm.parity.verify import verify_bundle

    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["backend"]["intra_op_threads"] = 1          # as compile records when 1 thread is faster
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    seen, real = [], torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (seen.append(n), real(n)))
    before = torch.get_num_threads()
    report = verify_bundle(bundle, tiny["eval"], reference=str(tiny["torchscript"]), iterations=5, write=False)
    assert seen[0] == 1 and report["latency"]["intra_op_threads"] == 1
    assert torch.get_num_threads() == before            # restored afterwards
    assert np.isfinite(report["latency"]["p50_ratio"])
