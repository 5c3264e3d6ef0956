"""`edgemm compile` flags for TensorRT engine options (issue #16): several optimization profiles
(--profile-batches), refittable engines (--refittable), CUDA graphs (--cuda-graph).

TensorRT is not installable here: these tests check what reaches the portable bundle (its manifest's build
options and the trtexec lines of build.sh) and the refusals; building and running the engine is
tests/gpu/run_on_device.sh's job on a device."""

from __future__ import annotations

import json
import shlex

import onnx
import pytest
from onnx import TensorProto, helper

from edgemm.config import CompileConfig
from edgemm.errors import InputError


@pytest.fixture
def relu_onnx(tmp_path):
    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 8, 8])
    y = helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 3, 8, 8])
    graph = helper.make_graph([helper.make_node("Relu", ["image"], ["out"])], "g", [x], [y])
    path = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _trtexec_lines(bundle):
    return [shlex.split(line.strip()) for line in (bundle / "build.sh").read_text().splitlines()
            if line.strip().startswith('"$TRTEXEC" "--onnx')]


def test_profiles_refit_and_graphs_reach_the_portable_bundle(relu_onnx, tmp_path, cli):
    out = tmp_path / "b"
    r = cli("compile", relu_onnx, "--target", "l4", "--profile-batches", "1:1:1", "--profile-batches", "2:16:64",
            "--refittable", "--cuda-graph", "-o", out)
    assert r.returncode == 0, r.stderr
    options = json.loads((out / "manifest.json").read_text())["backend"]["options"]
    assert options["profile_shapes"] == {"image": [[1, 3, 8, 8]] * 3}
    assert options["extra_profiles"] == [{"image": [[2, 3, 8, 8], [16, 3, 8, 8], [64, 3, 8, 8]]}]
    assert options["refittable"] is True and options["cuda_graph"] is True
    lines = _trtexec_lines(out)
    assert lines, "build.sh has no trtexec command"
    for argv in lines:  # one per TensorRT major the target ships
        assert "--refit" in argv
        at = argv.index("--profile=1")
        assert argv.index("--profile=0") < at
        assert argv[at + 1:at + 4] == ["--minShapes=image:2x3x8x8", "--optShapes=image:16x3x8x8",
                                       "--maxShapes=image:64x3x8x8"]


def test_a_batch_no_profile_holds_is_refused_before_a_bundle_exists(relu_onnx, tmp_path, cli):
    out = tmp_path / "b"
    r = cli("compile", relu_onnx, "--target", "l4", "--profile-batches", "1:1:1", "--profile-batches", "4:16:64",
            "-o", out)
    assert r.returncode != 0
    assert r.stderr.strip().splitlines()[-1] == (
        "error: --profile-batches: no profile holds batch 2 of the bundle's batch range 1..64 "
        "(fix: add a profile covering batch 2, or lower --max-batch to 1)")
    assert not out.exists()


@pytest.mark.parametrize("changes, flag, words", [
    ({"refittable": True}, "--refittable", "applies to TensorRT targets"),
    ({"cuda_graph": True}, "--cuda-graph", "applies to TensorRT targets"),
    ({"profile_batches": ["1:1:1"]}, "--profile-batches", "applies to TensorRT targets"),
    ({"target": "l4", "profile_batches": ["1:8"]}, "--profile-batches", "is not MIN:OPT:MAX"),
    ({"target": "l4", "profile_batches": ["4:2:8"]}, "--profile-batches", "is not MIN:OPT:MAX"),
    ({"target": "l4", "profile_batches": ["1:1:1", "1:1:1"]}, "--profile-batches", "given twice"),
    ({"target": "l4", "profile_batches": ["1:8:128"], "max_batch": 64}, "--profile-batches", "past --max-batch"),
    ({"target": "l4", "profile_batches": ["1:1:1"], "dynamic_batch": False}, "--profile-batches",
     "needs a dynamic batch"),
    ({"target": "jetson-orin-nx", "precision": "fp16", "dla": True, "profile_batches": ["1:1:1"]},
     "--profile-batches", "one static profile"),
    ({"target": "jetson-orin-nx", "precision": "fp16", "dla": True, "refittable": True}, "--refittable",
     "cannot be refitted"),
])
def test_refusals_name_the_flag(relu_onnx, changes, flag, words):
    cfg = CompileConfig(model=str(relu_onnx), **changes)
    with pytest.raises(InputError) as err:
        cfg.validate()
    assert err.value.field == flag and words in str(err.value)


def test_flags_live_in_the_config_files_tensorrt_section(relu_onnx):
    cfg = CompileConfig(model=str(relu_onnx), target="l4", refittable=True, profile_batches=["1:1:1", "2:8:64"])
    section = cfg.to_file_dict()["tensorrt"]
    assert section["refittable"] is True and section["profile_batches"] == ["1:1:1", "2:8:64"]


@pytest.mark.parametrize("flags", [["--dla"]])
def test_a_dla_bundle_promises_only_the_shapes_its_engine_runs(relu_onnx, tmp_path, cli, flags):
    """DLA runs min = opt = max: the engine pins each dynamic input to its opt shape, so the bundle's
    declared ranges must say the same (else the runtime and a Triton export would accept a batch of 8 that
    only fails inside TensorRT on the device)."""
    out = tmp_path / "dla"
    r = cli("compile", relu_onnx, "--target", "jetson-agx-orin", "--fp16", *flags, "-o", out)
    assert r.returncode == 0, r.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert [i["ranges"] for i in manifest["inputs"]] == [{"batch": [1, 1, 1]}]
    options = manifest["backend"]["options"]
    assert options["dla_core"] == 0 and options["profile_shapes"] == {"image": [[1, 3, 8, 8]] * 3}
