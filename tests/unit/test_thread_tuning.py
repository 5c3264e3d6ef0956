"""CPU bundles record a single intra-op thread when the compile measured it faster, and the runtime
opens its session that way unless the caller says otherwise."""

import json
import shutil

import numpy as np
import pytest

from edgemm import runtime
from edgemm.backends.ort.threads import MIN_GAIN, tune_intra_op_threads
from edgemm.errors import BundleError


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path):
    dst = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, dst)
    return dst


def _set_threads(bundle, value):
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["backend"]["intra_op_threads"] = value
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def _session_threads(bundle_obj) -> int:
    return bundle_obj._session._session.get_session_options().intra_op_num_threads


def test_compile_records_the_measured_choice(tiny_bundle):
    backend = json.loads((tiny_bundle / "manifest.json").read_text())["backend"]
    tuning = backend["threads_tuning"]
    if "p50_ms" not in tuning:  # a one-core host has nothing to choose from
        assert backend["intra_op_threads"] == 0
        return
    p50 = tuning["p50_ms"]
    assert p50["default"] > 0 and p50["1"] > 0 and tuning["batch"] == 1
    # The rule: one thread only when it wins by MIN_GAIN; otherwise ORT's default (0).
    assert backend["intra_op_threads"] == (1 if p50["1"] <= (1 - MIN_GAIN) * p50["default"] else 0)


def test_tuning_measures_both_settings(tiny_bundle, tiny):
    with np.load(tiny["calib"]) as data:
        feeds = {k: np.ascontiguousarray(data[k][:1]) for k in data.files}
    result = tune_intra_op_threads(tiny_bundle / "model.onnx", feeds)
    assert result["intra_op_threads"] in (0, 1)
    assert set(result.get("p50_ms", {"default": 1, "1": 1})) == {"default", "1"}


def test_runtime_honours_the_recorded_thread_count(bundle_copy):
    _set_threads(bundle_copy, 1)
    assert _session_threads(runtime.load(bundle_copy)) == 1
    # The caller's explicit choice wins over the manifest.
    assert _session_threads(runtime.load(bundle_copy, intra_op_threads=2)) == 2


@pytest.mark.parametrize("value", ["1", -1, 1.5, True, 10**6])
def test_bad_recorded_thread_count_is_a_bundle_error(bundle_copy, value):
    _set_threads(bundle_copy, value)
    with pytest.raises(BundleError) as info:
        runtime.load(bundle_copy)
    assert "backend.intra_op_threads" in str(info.value) and "\n" not in str(info.value)


def test_no_thread_tuning_keeps_ort_default(cli, tiny, tmp_path):
    out = tmp_path / "b"
    res = cli("compile", tiny["torchscript"], "--calib", tiny["calib"], "-o", out, "--no-thread-tuning")
    assert res.returncode == 0, res.stderr
    backend = json.loads((out / "manifest.json").read_text())["backend"]
    assert "intra_op_threads" not in backend and "threads_tuning" not in backend
    assert _session_threads(runtime.load(out)) == 0
