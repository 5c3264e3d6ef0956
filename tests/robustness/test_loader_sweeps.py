"""Damage at many offsets, straight through the loaders (in-process, so hundreds of variants stay fast):
every one is refused with an EdgemmError or, where the format has no integrity check (ONNX protobuf,
zip bookkeeping), loads as a valid file. Nothing else escapes."""

from __future__ import annotations

import io
import shutil
import struct
import zipfile
from pathlib import Path

import pytest

from edgemm import runtime
from edgemm.data import load_dataset
from edgemm.errors import BundleError, EdgemmError, InputError
from edgemm.frontends import load_model


def _offsets(size: int, count: int) -> list[int]:
    return sorted({0, 1, size - 1, *(size * k // count for k in range(1, count))})


def _member_data_ranges(path: Path) -> dict[str, tuple[int, int]]:
    data = path.read_bytes()
    ranges = {}
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26: info.header_offset + 30])
            start = info.header_offset + 30 + name_len + extra_len
            if info.compress_size:
                ranges[info.filename] = (start, start + info.compress_size)
    return ranges


def _content_unchanged(damaged: bytes, name: str, original: bytes) -> bool:
    """A flip in a deflate stream's spare end bits decodes to the same content; nothing is damaged then."""
    try:
        with zipfile.ZipFile(io.BytesIO(damaged)) as zf:
            return zf.read(name) == original
    except Exception:  # unreadable: damaged indeed
        return False


@pytest.mark.parametrize("fmt", ["torchscript", "pt2", "onnx"])
def test_truncated_model_files_are_refused(good, tmp_path, fmt):
    src = {"torchscript": good.torchscript, "pt2": good.pt2, "onnx": good.onnx}[fmt]
    data = src.read_bytes()
    for cut in _offsets(len(data), 24):
        path = tmp_path / f"cut{cut}{src.suffix}"
        path.write_bytes(data[:cut])
        with pytest.raises(EdgemmError) as info:
            load_model(str(path))
        assert str(path) in str(info.value), cut


@pytest.mark.parametrize("fmt", ["torchscript", "pt2"])
def test_any_flipped_archive_member_is_refused(good, tmp_path, fmt):
    """torch reads archives without checking CRCs; edgemm checks them, so a flipped bit in stored
    weights is refused rather than loaded as different weights."""
    src = good.torchscript if fmt == "torchscript" else good.pt2
    data = src.read_bytes()
    ranges = _member_data_ranges(src)
    assert len(ranges) > 10
    with zipfile.ZipFile(src) as zf:
        originals = {name: zf.read(name) for name in ranges}
    for name, (start, end) in ranges.items():
        for offset in {start, (start + end) // 2, end - 1}:
            damaged = bytearray(data)
            damaged[offset] ^= 0x10
            if _content_unchanged(bytes(damaged), name, originals[name]):
                continue
            path = tmp_path / f"flip{src.suffix}"
            path.write_bytes(bytes(damaged))
            with pytest.raises(InputError) as info:
                load_model(str(path))
            assert info.value.field == name, (name, offset, str(info.value))


def test_flipped_onnx_bytes_load_or_are_refused(good, tmp_path):
    """ONNX files carry no checksum: a flipped weight byte is a different, valid model. Every flip must
    load or be refused with an EdgemmError, never crash."""
    data = good.onnx.read_bytes()
    refused = 0
    for offset in _offsets(len(data), 80):
        damaged = bytearray(data)
        damaged[offset] ^= 0xFF
        path = tmp_path / "flip.onnx"
        path.write_bytes(bytes(damaged))
        try:
            load_model(str(path))
        except EdgemmError:
            refused += 1
    assert refused > 0


def test_truncated_manifests_are_refused(good, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(good.bundle, bundle)
    text = (good.bundle / "manifest.json").read_bytes().rstrip()
    for cut in _offsets(len(text), 40):  # every cut loses at least the closing brace
        (bundle / "manifest.json").write_bytes(text[:cut])
        with pytest.raises(BundleError):
            runtime.load(bundle)


def test_damaged_calibration_files_load_or_are_refused(good, tmp_path):
    data = good.calib.read_bytes()
    path = tmp_path / "calib.npz"
    for cut in _offsets(len(data), 30):
        path.write_bytes(data[:cut])
        with pytest.raises(InputError):
            load_dataset(path)
    refused = 0
    for offset in _offsets(len(data), 60):
        damaged = bytearray(data)
        damaged[offset] ^= 0xFF
        path.write_bytes(bytes(damaged))
        try:
            load_dataset(path)
        except InputError:
            refused += 1
    assert refused > 30   # array bytes are covered by the zip CRC, which numpy checks
