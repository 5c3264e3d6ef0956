"""One deterministic case per class of escape the fuzzers found (tests/robustness/test_fuzz_parsers.py in
explore mode, and exhaustive sweeps): each input is refused with an EdgemmError, never an internal error."""

from __future__ import annotations

import io
import struct
import zipfile

import pytest

from edgemm import targets
from edgemm.backends.tensorrt.options import parse_profile_batches
from edgemm.config import CompileConfig
from edgemm.data import load_dataset
from edgemm.errors import BundleError, InputError
from edgemm.iospec import parse_dynamic_flag, parse_input_flag
from edgemm.runtime.tensorrt_session import version_tuple
from edgemm.split.build import parse_placement

HUGE = "9" * 5000   # past Python's 4300-digit int() limit: int() raises ValueError


def _npy(header: str) -> bytes:
    body = header.encode("latin1")
    pad = 64 - (10 + len(body) + 1) % 64
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(body) + pad + 1) + body + b" " * pad + b"\n" + b"\0" * 192


# numpy's .npy header parser (ast + tokenize) raises these on forged headers: TokenError, IndexError
FORGED_HEADERS = {"unclosed": "{'descr': '<f4', 'fortran_order': False, 'shape': (4, 12 }",
                  "empty-descr": "{'descr': (), 'fortran_order': False, 'shape': (4, 12), }",
                  "open-string": "{'descr': '<f4', 'fortran_order': False, 'shape': (4, '''), }"}


@pytest.mark.parametrize("header", sorted(FORGED_HEADERS))
@pytest.mark.parametrize("container", ["npz", "raw-npy"])
def test_forged_npy_headers_are_input_errors(tmp_path, header, container):
    data = _npy(FORGED_HEADERS[header])
    if container == "npz":
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as zf:
            zf.writestr("image.npy", data)
        data = buffer.getvalue()
    path = tmp_path / "calib.npz"
    path.write_bytes(data)
    with pytest.raises(InputError) as info:
        load_dataset(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("parse, text", [
    (parse_input_flag, f"image:1x{HUGE}:float32"),
    (parse_dynamic_flag, f"input_ids:1=1:8:{HUGE}"),
    (parse_dynamic_flag, f"input_ids:{HUGE}=1:8:16"),
    (lambda t: parse_profile_batches([t]), f"1:1:{HUGE}"),
    (lambda t: parse_placement(t, targets.load("jetson-agx-orin")), "vision=dla²"),   # '²'.isdigit(), int('²') fails
    (lambda t: parse_placement(t, targets.load("jetson-agx-orin")), f"vision=dla{HUGE}"),
])
def test_numbers_in_flags_are_input_errors(parse, text):
    with pytest.raises(InputError):
        parse(text)


def test_placement_still_reads_ascii_cores():
    assert parse_placement("vision=dla1,text=gpu", targets.load("jetson-agx-orin")) == {"vision": "dla1", "text": "gpu"}


def test_version_numbers_never_raise():
    assert version_tuple("10.3.0") == (10, 3, 0)
    assert version_tuple("8.²") == (8, 0)           # was ValueError (compute capability from a manifest)
    assert version_tuple(HUGE + ".1") == (int("9" * 18), 1)
    assert targets.version_parts("1²0.3") == (10, 3, 0)


PROFILE = """name = "custom"
description = "d"
kind = "jetson"
backend = "tensorrt"
compute_capability = "8.7"
precisions = ["fp32", "fp16", "int8"]
default_precision = "int8"
dla_cores = 2
memory_mb = 65536
workspace_mb = 4096
sparse_tensor_cores = true
jetpack = "6.2"
tensorrt_versions = [{versions}]
"""


@pytest.mark.parametrize("versions", ['"²0.3.0"', '"10.².0"', f'"1{"0" * 60}.3.0"'])
def test_custom_target_profile_versions_are_input_errors(tmp_path, versions):
    path = tmp_path / "custom.toml"
    path.write_text(PROFILE.format(versions=versions), encoding="utf-8")
    with pytest.raises(InputError) as info:
        targets.load(str(path))
    assert "tensorrt_versions" in str(info.value)


def test_custom_target_profile_still_loads(tmp_path):
    path = tmp_path / "custom.toml"
    path.write_text(PROFILE.format(versions='"10.3.0"'), encoding="utf-8")
    assert targets.load(str(path)).dla_versions("fp16") == ("10.3.0",)


@pytest.mark.parametrize("name", ["x" * 5000 + ".toml", "a\0b.toml"])
def test_unreadable_target_paths_are_input_errors(name):
    with pytest.raises(InputError) as info:
        targets.load(name)
    assert info.value.field == "--target"
    with pytest.raises(InputError):
        CompileConfig(model="m.onnx", target=name).validate()


@pytest.mark.parametrize("measured", [[1], {"p50_ratio": [0.5]}, "fast"])
def test_variant_measurements_of_the_wrong_type_are_bundle_errors(measured):
    from edgemm.runtime.variants import parse_variants

    def bad(message, field=None):
        return BundleError(message, field=field)

    variant = {"name": "v", "backend": {"name": "onnxruntime"}, "requires_any": [], "measured": measured}
    with pytest.raises(BundleError) as info:
        parse_variants([variant], bad)
    assert info.value.field == "[0].measured"
    parse_variants([dict(variant, measured={"p50_ratio": {"1": 0.5}})], bad)
    parse_variants([dict(variant, measured=None)], bad)


def test_batch_routes_skip_batch_keys_that_are_not_ascii_numbers():
    from edgemm.runtime.variants import batch_routes

    def variant(name, ratios):
        return {"name": name, "backend": {"name": "onnxruntime"}, "requires_any": [],
                "measured": {"p50_ratio": ratios}}

    variants = [variant("a", {"²": 0.9, HUGE: 0.9, "1": 0.1, "8": 0.9}),
                variant("b", {"²": 0.1, HUGE: 0.1, "1": 0.9, "8": 0.1})]
    assert batch_routes(variants, 0, set(), installed=lambda b: True) == {1: 0, 8: 1}
