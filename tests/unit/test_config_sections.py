"""The compile config file in sections (precision, prune, tensorrt, ...), flat files of earlier versions
still read, and the checks run once per configuration."""

import json
from dataclasses import fields
from pathlib import Path

import pytest

from edgemm.config import SECTIONS, TOP_LEVEL, CompileConfig
from edgemm.errors import InputError

FLAT = Path(__file__).parents[1] / "fixtures" / "config_flat.json"   # what --dump-config wrote before sections


def test_every_field_has_exactly_one_place_in_the_file():
    places = list(TOP_LEVEL) + [attr for keys in SECTIONS.values() for attr in keys.values()]
    assert sorted(places) == sorted(f.name for f in fields(CompileConfig))


def test_a_flat_config_of_earlier_versions_loads_as_its_nested_dump(tmp_path):
    flat = CompileConfig.from_file(FLAT)
    assert flat.opt_level == 2 and flat.prune == "vision=0.3" and flat.exclude == ["op:Softmax"]
    nested = flat.to_file_dict()
    assert nested["tensorrt"]["opt_level"] == 2 and nested["prune"]["ratios"] == "vision=0.3"
    assert nested["precision"]["mode"] == "int8" and "opt_level" not in nested and "trust_pickle" not in nested
    path = tmp_path / "nested.json"
    path.write_text(json.dumps(nested))
    assert CompileConfig.from_file(path) == flat
    assert dict(flat.section("calibration")) == {"data": "calib.npz", "samples": 256}


@pytest.mark.parametrize("doc, field, what", [
    ({"tensorrt": {"opt_level": 99}}, "tensorrt.opt_level", "must be 0..5"),
    ({"tensorrt": {"opt_level": "3"}}, "tensorrt.opt_level", "must be an integer"),
    ({"tensorrt": {"opt_levle": 3}}, "tensorrt.opt_levle", "unknown key 'opt_levle' in section 'tensorrt'"),
    ({"prune": {"ratios": "0.3", "recover": -1}, "calibration": {"data": "c.npz"}}, "prune.recover", "must be >= 0"),
    ({"precision": {"mode": "int8"}}, "calibration.data", "needs calibration data"),
    ({"precision": {"mode": "int8"}, "calib": "a.npz", "calibration": {"data": "b.npz"}}, "calibration.data",
     "is given twice (also as 'calib')"),
    ({"split": {"enabled": False, "place": "vision=gpu"}}, "split.place", "places the parts of a split bundle"),
    ({"trust_pickle": True}, "trust_pickle", "cannot switch on --trust-pickle"),
    # spec strings and input paths are checked with the rest (they were checked at compile, naming the flag)
    ({"prune": {"ratios": "x"}, "calibration": {"data": __file__}}, "prune.ratios", "'x' is not a number"),
    # the per-branch policy's errors name its key, not precision.mode (the CLI calls both --precision/--int8)
    ({"precision": {"mode": "int8", "per_branch": "vision=int9"}, "calibration": {"data": "c.npz"}},
     "precision.per_branch", "unknown precision 'int9' for vision"),
    ({"precision": {"per_branch": "visio=int8"}, "calibration": {"data": "c.npz"}}, "precision.per_branch",
     "unknown branch 'visio'"),
    ({"precision": {"per_branch": "vision=fp8"}, "calibration": {"data": "c.npz"}}, "precision.per_branch",
     "does not support fp8"),
    ({"precision_policy": "vision=int9", "calib": "c.npz"}, "precision_policy", "unknown precision 'int9'"),
    ({"precision": {"mode": "int9"}}, "precision.mode", "unknown precision 'int9'"),
    # no upper bound made `edgemm export triton` promise max_batch_size 100000000
    ({"io": {"max_batch": 100000000}}, "io.max_batch", "must be from 1 to 65536"),
    ({"io": {"dynamic": ["audio:2=1:50:10000000"]}}, "io.dynamic", "MAX 10000000 is past 4,194,304"),
    ({"target": "h100", "tensorrt": {"profile_batches": ["1:8:100000000"]}}, "tensorrt.profile_batches",
     "is past 65,536"),
])
def test_a_nested_file_is_checked_naming_its_own_keys(tmp_path, doc, field, what):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"model": "/tmp/nowhere/model.onnx", **doc}))
    with pytest.raises(InputError) as info:
        CompileConfig.from_file(path)
    assert str(info.value).startswith(f"{path}: {field}: ") and what in str(info.value), str(info.value)


def test_every_compile_flag_names_a_config_field():
    """A check names the flag; --config relabels it to the file's key through the field the flag sets, so
    every flag must lead to its field (``--precision`` is the per-branch policy, ``--int8`` the mode)."""
    from edgemm.cli.compile import command as compile_cmd
    from edgemm.config import field_of_flag

    names = {f.name for f in fields(CompileConfig)}
    not_config = {"--config", "--dump-config", "--json", "--verbose"}
    flags = [max(p.opts, key=len) for p in compile_cmd.params if max(p.opts, key=len) not in not_config]
    assert len(flags) > 40
    assert [f for f in flags if field_of_flag(f) not in names] == []


def test_a_flat_file_with_a_missing_key_is_named_flat(tmp_path):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"model": "/tmp/nowhere/model.onnx", "precision": "int8"}))
    with pytest.raises(InputError, match=r"cfg.json: calib: .*needs calibration data"):
        CompileConfig.from_file(path)


def test_the_checks_run_once_per_configuration(monkeypatch):
    calls = []
    real = CompileConfig._check
    monkeypatch.setattr(CompileConfig, "_check", lambda self: calls.append(1) or real(self))
    cfg = CompileConfig.from_file(FLAT)             # the file's load checks it
    cfg.trust_pickle = True                         # as the CLI sets it after --config: no check depends on it
    cfg.validate()                                  # the CLI asks again ...
    cfg.validate()                                  # ... and compile_model
    assert len(calls) == 1
    cfg.opt_level = 9                               # a changed configuration is checked again
    with pytest.raises(InputError, match="--opt-level"):
        cfg.validate()
    assert len(calls) == 2


@pytest.mark.parametrize("flag, value, what", [
    ("max_batch", 100000000, "--max-batch: must be from 1 to 65536"),
    ("dynamic", ["audio:2=1:50:10000000"], "--dynamic: 'audio:2=1:50:10000000': MAX 10000000 is past 4,194,304"),
    ("dynamic", ["x:0=1:8:100000"], "--dynamic: 'x:0=1:8:100000': MAX 100000 is past 65,536, the largest batch"),
])
def test_batch_and_dynamic_bounds_are_refused_naming_the_flag(flag, value, what):
    cfg = CompileConfig(model="/tmp/nowhere/model.onnx", **{flag: value})
    with pytest.raises(InputError) as info:
        cfg.validate()
    assert str(info.value).startswith(what) and "(fix: " in str(info.value), str(info.value)
    ok = {"max_batch": 65536, "dynamic": ["audio:2=1:50:4194304", "x:0=1:8:65536"]}[flag]
    CompileConfig(model="/tmp/nowhere/model.onnx", **{flag: ok}).validate()   # the bounds themselves pass
