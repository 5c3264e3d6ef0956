import json
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest

from edgemm import runtime
from edgemm.errors import BundleError, InputError
from tests.fixtures.tiny_models import make_data


def feeds(n=2, seed=5):
    return make_data(n, seed=seed)


def test_run_returns_outputs_in_manifest_order(tiny_bundle):
    b = runtime.load(tiny_bundle)
    out = b.run(feeds(3))
    assert list(out) == [o.name for o in b.outputs] == ["logits", "text_embeds"]
    assert out["logits"].shape == (3, 5)
    assert [s.name for s in b.inputs] == ["image", "input_ids"]


def test_runtime_imports_neither_torch_nor_onnx(tiny_bundle):
    code = (
        "import sys, numpy as np\n"
        "import edgemm.runtime as rt\n"
        f"b = rt.load({str(tiny_bundle)!r})\n"
        "rng = np.random.default_rng(0)\n"
        "out = b.run({'image': rng.standard_normal((1,3,16,16)).astype(np.float32),"
        " 'input_ids': np.ones((1,8), np.int64)})\n"
        "assert out['logits'].shape == (1, 5)\n"
        "bad = [m for m in ('torch', 'onnx', 'modelopt', 'tensorrt') if m in sys.modules]\n"
        "print('LOADED', bad)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "LOADED []" in res.stdout


@pytest.mark.parametrize("bad, field, expect", [
    (lambda f: f.pop("image"), "feeds", "missing 'image'"),
    (lambda f: f.__setitem__("extra", np.zeros(1)), "feeds", "unexpected 'extra'"),
    (lambda f: f.__setitem__("input_ids", f["input_ids"].astype(np.int32)), "input_ids", "expected int64"),
    (lambda f: f.__setitem__("image", f["image"][:, :, :8]), "image", "axis 2 must be 16"),
    (lambda f: f.__setitem__("image", f["image"][0]), "image", "rank 3"),
    (lambda f: f.__setitem__("input_ids", f["input_ids"][:1]), "input_ids", "give every input the same batch"),
    (lambda f: f["image"].__setitem__((0, 0, 0, 0), np.nan), "image", "NaN"),
])
def test_feed_validation_names_input(tiny_bundle, bad, field, expect):
    b = runtime.load(tiny_bundle)
    f = feeds(2)
    bad(f)
    with pytest.raises(InputError) as info:
        b.run(f)
    assert field in str(info.value) and expect in str(info.value)


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path):
    dst = tmp_path / "b"
    shutil.copytree(tiny_bundle, dst)
    return dst


def test_flipped_byte_is_refused(bundle_copy):
    model = bundle_copy / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="does not match its sha256"):
        runtime.load(bundle_copy)


def test_extra_and_missing_files_are_refused(bundle_copy):
    (bundle_copy / "evil.so").write_bytes(b"x")
    with pytest.raises(BundleError, match="unexpected file"):
        runtime.load(bundle_copy)
    (bundle_copy / "evil.so").unlink()
    (bundle_copy / "model.onnx").unlink()
    with pytest.raises(BundleError, match="missing"):
        runtime.load(bundle_copy)


def test_manifest_path_escape_is_refused(bundle_copy):
    m = json.loads((bundle_copy / "manifest.json").read_text())
    m["files"]["../outside.onnx"] = m["files"].pop("model.onnx")
    (bundle_copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="escapes the bundle"):
        runtime.load(bundle_copy)


def test_future_format_version_is_refused(bundle_copy):
    m = json.loads((bundle_copy / "manifest.json").read_text())
    m["format_version"] = 99
    (bundle_copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="format_version"):
        runtime.load(bundle_copy)


def test_threads_match_single_thread(tiny_bundle):
    b = runtime.load(tiny_bundle)
    inputs = [feeds(1, seed=s) for s in range(16)]
    expected = [b.run(f)["logits"] for f in inputs]
    errors, mismatches = [], []

    def worker(k):
        try:
            for i in range(40):
                j = (i + k) % len(inputs)
                if not np.array_equal(b.run(inputs[j])["logits"], expected[j]):
                    mismatches.append(j)
        except Exception as exc:  # collected, asserted below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and not mismatches
