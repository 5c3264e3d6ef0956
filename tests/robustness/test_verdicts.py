"""Wrong verdicts and unclear errors (issue 14, class 7), and the resource bounds of class 6 that are flags
rather than files: NaN/inf thresholds, a full disk, names that would forge output or break reports, a
model input named `labels`, bench's batch. Each CLI case: exit code, one `error:` line naming the flag
or file, no traceback, nothing created or changed outside the intended output."""

from __future__ import annotations

import json
import math
import resource
import shutil
import signal
import subprocess
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from edgemm.errors import InputError, StorageError
from tests.robustness.helpers import cli_env, edgemm_cmd, error_lines, run_edgemm, single_error_line, tree_snapshot
from tests.robustness.make_corpus import copy_bundle, edit_manifest, good_feeds, rehash, save_npz


def _refused(proc, starts: str):
    assert proc.returncode == 2, proc.stdout + proc.stderr
    line = single_error_line(proc)
    assert line.startswith(starts), proc.stderr
    return line


@pytest.fixture
def work(good, tmp_path):
    bundle = copy_bundle(good, tmp_path)
    data = save_npz(tmp_path / "data.npz", good_feeds(good))
    return tmp_path, bundle, data


# -- NaN and infinite thresholds -------------------------------------------------------------------

@pytest.mark.parametrize("flag,value", [("--max-metric-drop", "nan"), ("--min-cosine", "nan"),
                                        ("--min-top1", "-inf"), ("--baseline-max-metric-drop", "nan"),
                                        ("--baseline-max-abs-rel", "inf"), ("--latency-tolerance", "nan"),
                                        ("--baseline-min-cosine", "NaN")])
def test_verify_refuses_non_finite_thresholds(work, flag, value):
    tmp, bundle, data = work
    before = tree_snapshot(tmp)
    proc = run_edgemm(["verify", bundle, "--data", data, "--save-baseline", tmp / "b.json", flag, value], cwd=tmp)
    assert "not a finite number" in _refused(proc, f"error: {flag}: ")
    assert tree_snapshot(tmp) == before


@pytest.mark.parametrize("flag", ["--max-metric-drop", "--min-cosine"])
def test_compile_refuses_non_finite_thresholds(good, tmp_path, flag):
    before = tree_snapshot(tmp_path)
    proc = run_edgemm(["compile", good.onnx, "--calib", good.calib, "-o", tmp_path / "b", flag, "nan"],
                      cwd=tmp_path)
    _refused(proc, f"error: {flag}: ")
    assert tree_snapshot(tmp_path) == before


def test_config_file_nan_threshold_is_refused(good, tmp_path):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"model": str(good.onnx), "calib": str(good.calib), "output": str(tmp_path / "b")})
                      .replace("}", ', "max_metric_drop": NaN}'))
    proc = run_edgemm(["compile", "--config", config], cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and not (tmp_path / "b").exists()
    assert len(error_lines(proc.stderr)) == 1


def test_python_api_refuses_nan_thresholds(good, tmp_path):
    from edgemm.parity.gate import GateTolerances
    from edgemm.parity.thresholds import defaults_for, with_overrides
    from edgemm.parity.verify import verify_bundle

    data = save_npz(tmp_path / "data.npz", good_feeds(good))
    with pytest.raises(InputError, match="--max-metric-drop: nan is not a finite number"):
        verify_bundle(good.bundle, data, reference=str(good.onnx), overrides={"max_metric_drop": math.nan},
                      write=False, iterations=0)
    with pytest.raises(InputError, match="--min-cosine"):
        with_overrides(defaults_for("int8"), min_cosine=float("nan"))
    with pytest.raises(InputError, match="--latency-tolerance"):
        GateTolerances.for_precision("fp32", latency_ratio=math.inf)
    with pytest.raises(InputError, match="--baseline-max-abs-rel"):
        GateTolerances.for_precision("fp32", max_abs_rel=math.nan)


# -- a full disk is not an inaccurate recipe --------------------------------------------------------

def _file_size_limit(limit: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # then writes past the limit fail with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_run_output_on_a_full_disk_is_one_line(good, work):
    tmp, bundle, data = work
    before = tree_snapshot(tmp)
    proc = subprocess.run(edgemm_cmd("run", bundle, "--data", data, "-o", tmp / "out.npz"), cwd=tmp,
                          env=cli_env(), capture_output=True, text=True, preexec_fn=_file_size_limit(400))
    assert "File too large" in _refused(proc, f"error: {tmp / 'out.npz'}: -o: cannot be written")
    assert tree_snapshot(tmp) == before  # no partial output, no temp file


def test_compile_on_a_full_disk_says_so(good, tmp_path):
    before = tree_snapshot(tmp_path)
    proc = subprocess.run(edgemm_cmd("compile", good.onnx, "--int8", "--calib", good.calib, "-o", tmp_path / "b"),
                          cwd=tmp_path, env=cli_env(), capture_output=True, text=True,
                          preexec_fn=_file_size_limit(20_000))
    line = _refused(proc, "error: ")
    assert "too large" in line and "recipe" not in line and "internal error" not in line
    assert tree_snapshot(tmp_path) == before


def test_int8_search_reports_enospc_not_accuracy(good, tmp_path, monkeypatch):
    import errno

    from edgemm.pipeline import compile_model
    from edgemm.config import CompileConfig
    from edgemm.quant.ort_int8 import OrtInt8Quantizer

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "int8.onnx"))

    monkeypatch.setattr(OrtInt8Quantizer, "build", disk_full)   # each recipe candidate's build (quant/ort_int8.py)
    with pytest.raises(StorageError, match="the disk is full"):
        compile_model(CompileConfig(model=str(good.onnx), precision="int8", calib=str(good.calib),
                                    output=str(tmp_path / "b")), say=lambda m: None)
    assert list(tmp_path.iterdir()) == []


# -- names from input files -------------------------------------------------------------------------

EVIL = "logits\x1b[2K\rerror: forged\n<img src=x onerror=alert(1)>|\x07\x01"


@pytest.fixture
def evil_bundle(good, tmp_path):
    """The good bundle with its first output renamed to EVIL (model and manifest agree: a valid bundle)."""
    import onnx

    bundle = copy_bundle(good, tmp_path)
    model = onnx.load(str(bundle / "model.onnx"))
    for node in model.graph.node:
        node.output[:] = [EVIL if o == "logits" else o for o in node.output]
    for out in model.graph.output:
        if out.name == "logits":
            out.name = EVIL
    onnx.save(model, str(bundle / "model.onnx"))
    edit_manifest(bundle, lambda m: m["outputs"][0].update(name=EVIL))
    rehash(bundle)
    return bundle


def test_control_characters_in_names_are_escaped_everywhere(good, evil_bundle, tmp_path):
    data = save_npz(tmp_path / "data.npz", good_feeds(good))
    run = run_edgemm(["run", evil_bundle, "--data", data, "-o", tmp_path / "out.npz"], cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "\x1b" not in run.stdout + run.stderr and "\\x1b[2K" in run.stdout
    assert len(run.stdout.strip().splitlines()) == 1  # the newline in the name forges no line
    inspect = run_edgemm(["inspect", evil_bundle], cwd=tmp_path)
    assert inspect.returncode == 0 and "\x1b" not in inspect.stdout and "\x07" not in inspect.stdout
    proc = run_edgemm(["verify", evil_bundle, "--data", data, "--save-baseline", tmp_path / "b.json",
                       "--iterations", "0", "--no-write"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    proc = run_edgemm(["verify", evil_bundle, "--data", data, "--baseline", tmp_path / "b.json",
                       "--junit", tmp_path / "j.xml", "--markdown", tmp_path / "m.md", "--iterations", "0"],
                      cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "\x1b" not in proc.stdout + proc.stderr
    ET.parse(tmp_path / "j.xml")  # valid XML despite \x1b, \x07 and \x01 in a test case's name
    markdown = (tmp_path / "m.md").read_text()
    assert "<img" not in markdown and "&lt;img" in markdown and "\x1b" not in markdown


def test_error_lines_escape_names(good, evil_bundle, tmp_path):
    feeds = good_feeds(good)
    feeds["image"] = feeds["image"][:, :, :4]   # wrong shape: the error names the bundle and input
    data = save_npz(tmp_path / "data.npz", feeds)
    edit_manifest(evil_bundle, lambda m: m["inputs"][0].update(name="image\x1b[31m\nerror: forged"))
    proc = run_edgemm(["run", evil_bundle, "--data", data, "-o", tmp_path / "o.npz"], cwd=tmp_path)
    assert proc.returncode == 2 and "\x1b" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


# -- `labels` is a model input when the model says so -----------------------------------------------

def test_a_model_input_named_labels_runs_from_an_npz(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Cast", ["labels"], ["lf"], to=TensorProto.FLOAT),
         helper.make_node("Add", ["x", "lf"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4]),
         helper.make_tensor_value_info("labels", TensorProto.INT64, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(tmp_path / "m.onnx"))
    rng = np.random.default_rng(0)
    x, labels = rng.standard_normal((8, 4)).astype(np.float32), rng.integers(0, 9, (8, 4))
    save_npz(tmp_path / "d.npz", {"x": x, "labels": labels})
    proc = run_edgemm(["compile", "m.onnx", "--calib", "d.npz", "-o", "b", "--no-thread-tuning"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    proc = run_edgemm(["run", "b", "--data", "d.npz", "-o", "o.npz"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    with np.load(tmp_path / "o.npz") as out:
        np.testing.assert_allclose(out["y"], x + labels, rtol=1e-6)


# -- bench runs and labels the batch it really can ---------------------------------------------------

def test_bench_refuses_a_batch_beyond_the_bundle(good, tmp_path):
    proc = run_edgemm(["bench", good.bundle, "--batch", "1000000000", "--iterations", "1", "--warmup", "0"],
                      cwd=tmp_path)
    assert "beyond the batch range" in _refused(proc, "error: --batch: ")


def test_bench_refuses_inputs_larger_than_memory(good, tmp_path):
    """A bundle whose batch range is unbounded (edited manifest, hashes intact) still cannot make bench
    allocate more than a quarter of the machine's memory."""
    bundle = copy_bundle(good, tmp_path)

    def unbounded(m):
        for spec in m["inputs"]:
            spec.pop("ranges", None)
    edit_manifest(bundle, unbounded)
    proc = run_edgemm(["bench", bundle, "--batch", "1000000000", "--iterations", "1", "--warmup", "0"],
                      cwd=tmp_path)
    assert "GiB of inputs" in _refused(proc, "error: --batch: ")


def test_bench_labels_the_batch_it_ran(good, tmp_path):
    proc = run_edgemm(["bench", good.bundle, "--batch", "3", "--iterations", "3", "--warmup", "0", "--json"],
                      cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["batch"] == 3
    shutil.rmtree(tmp_path / "unused", ignore_errors=True)
