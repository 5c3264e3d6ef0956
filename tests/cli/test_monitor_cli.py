"""`edgemm monitor BUNDLE --data X.npz`: data judged against the bundle's calibration profile."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from tests.fixtures.tiny_models import make_data
from tests.robustness.helpers import single_error_line


def _save(path, data):
    np.savez(path, **data)
    return path


def test_in_distribution_data_passes(cli, tiny_bundle, tmp_path):
    data = _save(tmp_path / "fresh.npz", make_data(48, seed=11))
    proc = cli("monitor", tiny_bundle, "--data", data)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ok: every input within 1.00%" in proc.stdout and "DRIFT" not in proc.stdout
    proc = cli("monitor", tiny_bundle, "--data", data, "--json")
    report = json.loads(proc.stdout)
    assert report["passed"] and report["samples"] == 48 and report["stats"]["errors"] == 0
    assert all(f["out_of_range_fraction"] < 0.005 and f["nonfinite"] == 0 for f in report["stats"]["inputs"].values())
    assert report["stats"]["calls"] == 2 and report["stats"]["batch_sizes"] == {"32": 1, "16": 1}


def test_scale_shift_fails_with_the_input_named(cli, tiny_bundle, tmp_path):
    data = make_data(16, seed=11)
    data["image"] = data["image"] * 3
    proc = cli("monitor", tiny_bundle, "--data", _save(tmp_path / "scaled.npz", data))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "DRIFT: image:" in proc.stdout and "DRIFT: input_ids" not in proc.stdout
    # a looser bound lets the same data pass
    proc = cli("monitor", tiny_bundle, "--data", tmp_path / "scaled.npz", "--max-out-of-range", "0.5")
    assert proc.returncode == 0, proc.stdout


def test_nan_and_unknown_tokens_are_reported(cli, tiny_bundle, tmp_path):
    data = make_data(16, seed=11)
    data["image"][3, 0, 0, :3] = np.nan  # refused by the runtime: counted all the same
    data["input_ids"][8:, :2] = 60       # the embedding table has 50 rows
    proc = cli("monitor", tiny_bundle, "--data", _save(tmp_path / "bad.npz", data), "--json", "--batch-size", "8")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    inputs = report["stats"]["inputs"]
    assert inputs["image"]["nonfinite"] == 3
    assert inputs["input_ids"]["unknown_token_fraction"] == pytest.approx(16 / data["input_ids"].size)
    assert report["stats"]["calls"] == 2 and report["stats"]["errors"] >= 1
    assert any("NaN" in e for e in report["errors_seen"])
    assert any(f.startswith("input_ids:") and "embedding table" in f for f in report["failures"])


def test_outputs_of_refused_calls_are_not_reported_as_in_range(cli, tiny_bundle, tmp_path):
    """Every call refused (NaN in the only batch): no output was measured, so its fraction is unknown
    (it read 0.00%, as if the outputs had been checked and found in range)."""
    data = make_data(8, seed=11)
    data["image"][0, 0, 0, 0] = np.nan
    path = _save(tmp_path / "nan.npz", data)
    report = json.loads(cli("monitor", tiny_bundle, "--data", path, "--json").stdout)
    assert report["stats"]["errors"] == report["stats"]["calls"] == 1
    assert all(o["values"] == 0 and o["out_of_range_fraction"] is None for o in report["outputs"].values())
    text = cli("monitor", tiny_bundle, "--data", path).stdout
    assert "0.00%" not in text.split("output (vs FP32")[1]


def test_bundle_without_profile_says_drift_is_unknown(cli, tiny_bundle, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(tiny_bundle, old)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["calibration_profile"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    data = make_data(8, seed=11)
    data["image"] = data["image"] + 100
    proc = cli("monitor", old, "--data", _save(tmp_path / "shifted.npz", data))
    assert proc.returncode == 0, proc.stdout + proc.stderr  # nothing to judge drift by
    assert "drift: unknown" in proc.stdout and "latency ms: p50" in proc.stdout


@pytest.mark.parametrize("args, field", [(["--max-out-of-range", "1.5"], "--max-out-of-range"),
                                         (["--max-out-of-range", "nan"], "--max-out-of-range"),
                                         (["--batch-size", "0"], "--batch-size")])
def test_bad_flags_are_one_line_errors(cli, tiny_bundle, tmp_path, args, field):
    data = _save(tmp_path / "d.npz", make_data(2))
    line = single_error_line(cli("monitor", tiny_bundle, "--data", data, *args))
    assert field in line


def test_wrong_data_is_a_one_line_error(cli, tiny_bundle, tmp_path):
    data = make_data(2)
    data["input_ids"] = data["input_ids"].astype(np.float32)
    line = single_error_line(cli("monitor", tiny_bundle, "--data", _save(tmp_path / "d.npz", data)))
    assert "input_ids" in line and "int64" in line


def test_monitor_on_a_device_imports_neither_torch_nor_onnx(tiny_bundle, tmp_path):
    import subprocess
    import sys

    data = _save(tmp_path / "d.npz", make_data(4))
    code = ("import sys\n"
            "from edgemm.cli.main import main\n"
            f"rc = main(['monitor', {str(tiny_bundle)!r}, '--data', {str(data)!r}])\n"
            "import edgemm.runtime as rt\n"
            f"rt.load({str(tiny_bundle)!r}, monitor=True).metrics_text()\n"
            "print('LOADED', rc, [m for m in ('torch', 'onnx', 'modelopt', 'tensorrt') if m in sys.modules])\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "LOADED 0 []" in res.stdout, res.stdout + res.stderr


def test_failed_calls_fail_the_report_and_batches_are_those_sent(tiny_bundle, tmp_path, monkeypatch):
    """In-range data whose every call fails checked nothing: the verdict is a failure (it said 'ok' and
    exit 0). And the header names the batches actually sent (it printed the asked-for 32 for 8 samples)."""
    from edgemm import runtime
    from edgemm.cli.monitor import render
    from edgemm.data import load_dataset
    from edgemm.runtime.drift_report import drift_report

    bundle = runtime.load(tiny_bundle, monitor=True)
    data = load_dataset(_save(tmp_path / "fresh.npz", make_data(8, seed=11)), specs=bundle.inputs)
    ok = drift_report(bundle, data, batch_size=32)
    assert ok["passed"] and ok["batch_sizes"] == {8: 1} and "(batch 8)" in render(ok)[0]

    def broken(feeds):
        raise RuntimeError("backend crashed")

    monkeypatch.setattr(bundle, "_plain_run", broken)
    report = drift_report(bundle, data, batch_size=3)
    assert not report["passed"] and report["failed_calls"] == report["calls"] == 3
    lines = render(report)
    assert "(batch 3 x2, 2 x1)" in lines[0]
    assert any(line.startswith("FAILED: 3 of 3 call(s) failed: backend crashed") for line in lines)
    assert not any(line.startswith("ok:") for line in lines)
