"""The issue-2 acceptance path through the CLI: compile (TorchScript and .pt2; FP32/FP16/INT8), run,
verify, inspect — and the one-line errors for bad input."""

import json

import numpy as np
import pytest


def one_line_error(res):
    lines = [l for l in res.stderr.strip().splitlines() if l.strip()]
    assert lines and lines[-1].startswith("error:"), res.stderr
    assert "Traceback" not in res.stderr
    return lines[-1]


@pytest.mark.parametrize("fmt, precision", [("torchscript", "fp32"), ("pt2", "fp16"), ("pt2", "int8"),
                                            ("torchscript", "int8")])
def test_compile_run_verify(cli, tiny, tmp_path, fmt, precision):
    out = tmp_path / "bundle"
    res = cli("compile", tiny[fmt], f"--{precision}", "--calib", tiny["calib"], "--eval", tiny["eval"],
              "-o", out)
    assert res.returncode == 0, res.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["precision"]["mode"] == precision
    assert manifest["inputs"][0]["shape"][0] == "batch"
    assert manifest["calibration"]["samples"] == 64
    assert set(manifest["files"]) == {"model.onnx"}
    assert manifest["versions"]["onnxruntime"] and "int8_isa" in manifest["host"]["cpu"]
    assert manifest["export"]["exporter"] == ("dynamo" if fmt == "pt2" else "torchscript")
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] and report["outputs"]["logits"]["mean_cosine"] > 0.99

    res = cli("run", out, "--data", tiny["eval"], "-o", tmp_path / "out.npz")
    assert res.returncode == 0, res.stderr
    with np.load(tmp_path / "out.npz") as npz:
        assert npz["logits"].shape == (48, 5)

    res = cli("verify", out, "--reference", tiny[fmt], "--data", tiny["eval"], "--json", "--iterations", "5")
    assert res.returncode == 0, res.stderr
    rep = json.loads(res.stdout)
    assert rep["passed"] and {"bundle", "reference"} <= set(rep["latency"])
    assert rep["latency"]["bundle"]["p50_ms"] > 0
    assert rep["task"]["metric"] == "top1" and "reference" in rep["task"]


def test_int8_recipe_recorded_and_model_smaller(cli, tiny, tmp_path):
    fp32, int8 = tmp_path / "fp32", tmp_path / "int8"
    assert cli("compile", tiny["pt2"], "--calib", tiny["calib"], "-o", fp32).returncode == 0
    res = cli("compile", tiny["pt2"], "--int8", "--calib", tiny["calib"], "-o", int8)
    assert res.returncode == 0, res.stderr
    recipe = json.loads((int8 / "manifest.json").read_text())["precision"]["recipe"]
    assert recipe["name"] and recipe["selected_by"] == "search"
    ops = json.loads(cli("inspect", int8, "--json").stdout)["ops"]
    assert any(op in ops for op in ("MatMulInteger", "DynamicQuantizeLinear", "QLinearConv", "QuantizeLinear",
                                    "ConvInteger", "QLinearMatMul", "DynamicQuantizeMatMul", "MatMulIntegerToFloat"))


def test_verify_fails_with_exit_1_on_impossible_bar(cli, tiny, tmp_path):
    out = tmp_path / "b"
    assert cli("compile", tiny["pt2"], "--int8", "--calib", tiny["calib"], "-o", out).returncode == 0
    res = cli("verify", out, "--reference", tiny["pt2"], "--data", tiny["eval"], "--min-cosine", "1.0",
              "--iterations", "0")
    assert res.returncode == 1
    assert "mean cosine" in one_line_error(res)


def test_int8_without_calibration_is_refused(cli, tiny, tmp_path):
    res = cli("compile", tiny["torchscript"], "--int8", "-o", tmp_path / "b")
    assert res.returncode == 2
    assert "--calib" in one_line_error(res)
    assert not (tmp_path / "b").exists()


def test_nan_calibration_names_file_and_input(cli, tiny, tmp_path):
    with np.load(tiny["calib"]) as npz:
        data = dict(npz)
    data["image"][3, 0, 0, 0] = np.nan
    bad = tmp_path / "bad.npz"
    np.savez(bad, **data)
    res = cli("compile", tiny["torchscript"], "--int8", "--calib", bad, "-o", tmp_path / "b")
    assert res.returncode == 2
    line = one_line_error(res)
    assert str(bad) in line and "image" in line and "NaN" in line
    assert not (tmp_path / "b").exists()


def test_failed_compile_leaves_no_bundle_and_existing_is_kept(cli, tiny, tmp_path):
    out = tmp_path / "b"
    assert cli("compile", tiny["torchscript"], "--calib", tiny["calib"], "-o", out).returncode == 0
    before = (out / "manifest.json").read_text()
    res = cli("compile", tiny["torchscript"], "--calib", tiny["calib"], "-o", out)
    assert res.returncode == 2 and "--force" in one_line_error(res)
    res = cli("compile", tiny["torchscript"], "--input", "image:1x3x16x16:float32", "-o", out, "--force")
    assert res.returncode == 2  # input_ids missing
    assert (out / "manifest.json").read_text() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".edgemm-staging")]


def test_input_flags_without_data(cli, tiny, tmp_path):
    res = cli("compile", tiny["torchscript"], "--input", "image:1x3x16x16:float32",
              "--input", "input_ids:1x8:int64", "-o", tmp_path / "b")
    assert res.returncode == 0, res.stderr


def test_dump_and_replay_config(cli, tiny, tmp_path):
    res = cli("compile", tiny["torchscript"], "--calib", tiny["calib"], "-o", tmp_path / "b", "--dump-config")
    assert res.returncode == 0
    cfg = tmp_path / "cfg.json"
    cfg.write_text(res.stdout)
    assert cli("compile", "--config", cfg).returncode == 0
    assert (tmp_path / "b" / "manifest.json").is_file()
    # A flag beside --config would be silently dropped: refused, naming the flag.
    res = cli("compile", "--config", cfg, "-o", tmp_path / "other")
    assert res.returncode == 2 and not (tmp_path / "other").exists()
    assert res.stderr.strip().splitlines() == [
        "error: -o: given with --config, which carries the whole config (fix: put it in the JSON file "
        "(edgemm compile ... --dump-config writes one), or drop --config)"]


def test_target_refusals_come_before_missing_calibration(cli, tiny, tmp_path):
    res = cli("compile", tiny["pt2"], "--fp8", "--target", "jetson-orin-nano", "-o", tmp_path / "b")
    assert res.returncode == 2 and "error: --target: target jetson-orin-nano does not support fp8" in res.stderr
    res = cli("compile", tiny["pt2"], "--sparsity", "2:4", "-o", tmp_path / "b")
    assert res.returncode == 2 and res.stderr.startswith("error: --sparsity: target cpu")


def test_max_batch_lowers_a_programs_own_batch_bound(cli, tiny, tmp_path):
    res = cli("compile", tiny["pt2"], "--calib", tiny["calib"], "--max-batch", "8", "-o", tmp_path / "b")
    assert res.returncode == 0, res.stderr
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert all(spec["ranges"]["batch"][2] == 8 for spec in manifest["inputs"])
    own = json.loads(cli("inspect", tiny["pt2"], "--json").stdout)["inputs"][0]["ranges"]["batch"][2]
    res = cli("compile", tiny["pt2"], "--calib", tiny["calib"], "--max-batch", str(own + 1), "-o", tmp_path / "c")
    assert res.returncode == 2 and "--max-batch: the model's own batch range" in res.stderr


def test_inspect_model_and_bundle(cli, tiny, tiny_bundle):
    info = json.loads(cli("inspect", tiny["pt2"], "--json").stdout)
    assert info["format"] == "exported_program" and info["parameters"] > 0
    info = json.loads(cli("inspect", tiny_bundle, "--json").stdout)
    assert info["precision"] == "fp32" and info["ops"]


def test_bench_times_bundles_side_by_side_and_refuses_a_repeat(cli, tiny_bundle, tiny, tmp_path):
    res = cli("bench", tiny_bundle, tiny_bundle, "--iterations", "3", "--warmup", "1")
    assert res.returncode == 2 and "BUNDLES: given twice" in res.stderr
    res = cli("bench", tiny_bundle, "--reference", tiny["pt2"], "--iterations", "3", "--warmup", "1", "--json")
    assert res.returncode == 0, res.stderr
    rows = json.loads(res.stdout)["results"]
    assert len(rows) == 2 and rows[0]["p50_ratio_to_first"] == 1.0 and rows[1]["p50_ms"] > 0


def test_compile_json_prints_the_manifest_it_wrote(cli, tiny, tmp_path):
    out = tmp_path / "bundle"
    res = cli("compile", tiny["torchscript"], "--calib", tiny["calib"], "-o", out, "--json")
    assert res.returncode == 0, res.stderr
    printed = json.loads(res.stdout)
    assert printed["manifest"] == json.loads((out / "manifest.json").read_text())
    assert printed["manifest"]["format_version"] >= 2 and printed["bundle"] == str(out)
    summary = cli("compile", tiny["torchscript"], "--calib", tiny["calib"], "-o", out, "--force")
    assert summary.returncode == 0 and "precision fp32 (" in summary.stdout and "backend onnxruntime" in summary.stdout


def test_bench_names_the_host_and_warns_on_unlocked_jetson_clocks(tiny_bundle, monkeypatch):
    """Figures are only comparable on the same host state: bench prints the CPU ISA, and on a Jetson the
    power mode and whether the GPU clocks were locked (TensorRT Best Practices), warning when not."""
    from click.testing import CliRunner

    from edgemm.backends.tensorrt import jetson
    from edgemm.cli.main import cli as main

    args = ["bench", str(tiny_bundle), "--iterations", "2", "--warmup", "0"]
    monkeypatch.setattr(jetson, "jetson_state", lambda: None)
    plain = CliRunner().invoke(main, args)
    assert plain.exit_code == 0, plain.output
    assert "host: " in plain.output and "Jetson" not in plain.output and "warning" not in plain.output
    state = {"release": "# R36 (release), REVISION: 4.0", "power_mode": "15W", "clocks_locked": False,
             "gpu_clock": {"min_hz": 306000000, "max_hz": 918000000, "cur_hz": 306000000}}
    monkeypatch.setattr(jetson, "jetson_state", lambda: state)
    res = CliRunner().invoke(main, args + ["--json"])
    assert res.exit_code == 0, res.output
    assert "warning: GPU clocks are not locked (power mode 15W)" in res.output
    report = json.loads(res.output[res.output.index("{"):])
    assert report["host"]["jetson"] == state and report["host"]["cpu"]["isa"] == \
        __import__("edgemm.hostinfo", fromlist=["cpu_info"]).cpu_info()["isa"]


def test_a_pt2_exported_at_batch_one_compiles_and_verifies_with_data(cli, tmp_path):
    """`torch.export.export(m, (), kwargs=...)` without dynamic shapes guards batch == 1: export, parity,
    verify and run must feed it one sample per call (it was 'internal error: Guard failed ... == 1')."""
    import numpy as np
    import torch

    class Fuse(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.img, self.txt = torch.nn.Linear(12, 4), torch.nn.Embedding(20, 4)

        def forward(self, *, pixels, ids):
            return {"logits": self.img(pixels) + self.txt(ids).mean(1)}

    torch.manual_seed(0)
    ex = {"pixels": torch.randn(1, 12), "ids": torch.randint(0, 20, (1, 5))}
    prog = torch.export.export(Fuse().eval(), (), kwargs=ex)
    torch.export.save(prog, tmp_path / "m.pt2")
    rng = np.random.default_rng(0)
    data = {"pixels": rng.standard_normal((10, 12)).astype(np.float32),
            "ids": rng.integers(0, 20, (10, 5)).astype(np.int64)}
    np.savez(tmp_path / "data.npz", **data)
    out = tmp_path / "b"
    res = cli("compile", tmp_path / "m.pt2", "--calib", tmp_path / "data.npz", "-o", out)
    assert res.returncode == 0, res.stderr
    res = cli("verify", out, "--reference", tmp_path / "m.pt2", "--data", tmp_path / "data.npz")
    assert res.returncode == 0, res.stderr
    res = cli("run", out, "--data", tmp_path / "data.npz", "-o", tmp_path / "out.npz")
    assert res.returncode == 0, res.stderr
    assert np.load(tmp_path / "out.npz")["logits"].shape == (10, 4)
