"""Target device profiles: the shipped data files load, are consistent, and refuse what a device cannot do."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgemm import targets
from edgemm.errors import InputError

REQUIRED = {"cpu", "jetson-orin-nano", "jetson-orin-nx", "jetson-agx-orin", "jetson-thor", "a100", "h100", "l4",
            "l40s"}


def test_every_required_target_ships_and_loads():
    assert REQUIRED <= set(targets.names())
    loaded = {t.name: t for t in targets.all_targets()}
    assert REQUIRED <= set(loaded)
    assert targets.all_targets()[0].name == "cpu"


@pytest.mark.parametrize("name", sorted(REQUIRED))
def test_profile_facts_are_consistent(name):
    t = targets.load(name)
    assert t.default_precision in t.precisions and "fp32" in t.precisions
    if t.backend == "tensorrt":
        assert t.cc is not None and t.tensorrt_versions and t.workspace_mb < t.memory_mb
        assert ("fp8" in t.precisions) == (t.cc >= targets.FP8_MIN_CC)
        assert all(m >= 10 for m in t.tensorrt_majors)
    else:
        assert t.kind == "cpu" and "fp8" not in t.precisions
    if t.dla_cores:
        assert t.kind == "jetson"


def test_known_device_facts():
    nano, nx, agx, thor = (targets.load(n) for n in ("jetson-orin-nano", "jetson-orin-nx", "jetson-agx-orin",
                                                      "jetson-thor"))
    assert (nano.dla_cores, nx.dla_cores, agx.dla_cores, thor.dla_cores) == (0, 2, 2, 0)
    assert nano.compute_capability == nx.compute_capability == agx.compute_capability == "8.7"
    # JetPack 6 keeps Orin on TensorRT 10.x; JetPack 7.2+ brings 11.4 to AGX Orin and Thor only.
    assert nano.tensorrt_majors == nx.tensorrt_majors == (10,)
    # The patch is part of the fact: 11.4.0 has no JetPack (nor DLA), 11.4.1 brings both.
    assert "11.4.1" in agx.tensorrt_versions and "11.4.1" in thor.tensorrt_versions
    assert "fp8" in thor.precisions and "fp8" not in agx.precisions
    assert "fp8" in targets.load("h100").precisions and "fp8" not in targets.load("a100").precisions
    assert {targets.load(n).compute_capability for n in ("l4", "l40s")} == {"8.9"}
    cpu = targets.load("cpu")
    assert (cpu.backend, cpu.precisions, cpu.default_precision) == ("onnxruntime", ("fp32", "fp16", "int8"), "int8")


def test_fp8_on_orin_nano_fails_in_one_line_naming_what_it_supports():
    with pytest.raises(InputError) as err:
        targets.load("jetson-orin-nano").validate("fp8")
    msg = str(err.value)
    assert "\n" not in msg
    assert "jetson-orin-nano does not support fp8 (supports: fp32, fp16, bf16, int8)" in msg
    assert "--int8" in msg and "8.9" in msg and "h100" in msg


def test_supported_requests_pass():
    targets.load("h100").validate("fp8")
    targets.load("jetson-agx-orin").validate("int8", dla=True)
    targets.load("jetson-orin-nx").validate("fp16", dla=1, sparsity="2:4")
    targets.load("cpu").validate("int8")


@pytest.mark.parametrize("name, precision, kwargs, pattern", [
    ("jetson-thor", "int8", {"dla": True}, "has no DLA cores"),
    ("jetson-orin-nano", "fp16", {"dla": True}, "has no DLA cores"),
    ("jetson-agx-orin", "fp32", {"dla": True}, "DLA runs fp16 or int8 only"),
    ("jetson-agx-orin", "int8", {"dla": 2}, "DLA cores 0..1"),
    ("cpu", "int8", {"sparsity": "2:4"}, "no sparse tensor cores"),
    ("h100", "fp16", {"sparsity": "1:2"}, "unknown sparsity pattern"),
    ("cpu", "fp8", {}, "does not support fp8"),
    ("a100", "int4", {}, "unknown precision"),
])
def test_refusals(name, precision, kwargs, pattern):
    with pytest.raises(InputError, match=pattern) as err:
        targets.load(name).validate(precision, **kwargs)
    assert "\n" not in str(err.value)


def test_unknown_target_lists_known_names():
    with pytest.raises(InputError) as err:
        targets.load("jetson-xavier")
    assert "jetson-xavier" in str(err.value) and "jetson-orin-nano" in str(err.value)


def test_custom_profile_file_is_checked(tmp_path):
    good = tmp_path / "orin-4gb.toml"
    good.write_text('name = "orin-4gb"\ndescription = "Orin Nano 4GB"\nkind = "jetson"\nbackend = "tensorrt"\n'
                    'compute_capability = "8.7"\nprecisions = ["fp32", "fp16", "int8"]\ndefault_precision = "int8"\n'
                    'dla_cores = 0\nmemory_mb = 4096\nworkspace_mb = 512\nsparse_tensor_cores = true\n'
                    'jetpack = "6.2"\ntensorrt_versions = ["10.3.0"]\n')
    assert targets.load(str(good)).workspace_mb == 512
    bad = tmp_path / "bad.toml"
    bad.write_text(good.read_text().replace('["fp32", "fp16", "int8"]', '["fp32", "int8", "fp8"]'))
    with pytest.raises(InputError, match="fp8 needs compute capability"):
        targets.load(str(bad))
    typo = tmp_path / "typo.toml"
    typo.write_text(good.read_text() + "dla_core = 1\n")
    with pytest.raises(InputError, match="unknown key"):
        targets.load(str(typo))


def test_to_dict_is_json_ready():
    d = targets.load("jetson-agx-orin").to_dict()
    assert json.loads(json.dumps(d))["tensorrt_versions"] == ["10.3.0", "11.4.1"]


def test_cli_table_and_single_target(cli):
    res = cli("targets")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].split()[:3] == ["NAME", "KIND", "BACKEND"]
    assert {line.split()[0] for line in lines[1:]} >= REQUIRED
    one = cli("targets", "jetson-orin-nx", "--json")
    assert one.returncode == 0 and json.loads(one.stdout)["dla_cores"] == 2
    missing = cli("targets", "nope")
    assert missing.returncode == 2 and "unknown target 'nope'" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1


def test_tensorrt_versions_need_the_patch(tmp_path):
    # "11.4" cannot tell 11.4.0 (no JetPack, no DLA on Jetson) from 11.4.1: a profile must say which.
    text = (Path(targets.__file__).parent / "profiles" / "jetson-agx-orin.toml").read_text()
    custom = tmp_path / "agx.toml"
    custom.write_text(text.replace('name = "jetson-agx-orin"', 'name = "agx"').replace('"11.4.1"', '"11.4"'))
    with pytest.raises(InputError, match="'11.4' is not MAJOR.MINOR.PATCH"):
        targets.load(str(custom))


@pytest.mark.parametrize("version,dla,int8", [
    ("10.3.0", True, False), ("10.7.0", True, False), ("10.8.0", False, False), ("11.3.0", False, False),
    ("11.4.0", False, False), ("11.4.1", True, True), ("11.4.1.12", True, True), ("11.5.0", False, False)])
def test_dla_exists_only_in_the_documented_tensorrt_releases(version, dla, int8):
    # work-with-dla.html (11.4.1): last 10.x DLA release is 10.7, none in 11.0-11.3, 11.4.0 Windows-on-ARM
    # only, 11.4.1 on AGX Orin; INT8 on 10.x DLA is implicit quantization only (Model-Optimizer PR #1661).
    assert targets.dla_supported(version) is dla
    assert targets.dla_precision_supported(version, "fp16") is dla
    assert targets.dla_precision_supported(version, "int8") is int8


def test_dla_int8_refused_before_work_where_only_tensorrt_10_is_shipped():
    # Old code accepted this and built the Q/DQ model with --int8 --useDLACore on TensorRT 10.3.
    with pytest.raises(InputError) as err:
        targets.load("jetson-orin-nx").validate("int8", dla=True)
    msg = str(err.value)
    assert "implicit quantization only" in msg and "--fp16" in msg and "11.4.1" in msg and "\n" not in msg
    targets.load("jetson-orin-nx").validate("fp16", dla=True)           # FP16 DLA stays possible on 10.3
    targets.load("jetson-agx-orin").validate("int8", dla=True)          # 11.4.1 is listed for AGX Orin
    assert targets.load("jetson-agx-orin").dla_versions("int8") == ("11.4.1",)
    assert targets.load("jetson-agx-orin").dla_versions("fp16") == ("10.3.0", "11.4.1")
