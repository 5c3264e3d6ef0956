"""Jetson power/clock state and the memory check before a build, against a fake /etc + /sys + /proc tree
and a stand-in nvpmodel. What they cannot prove: that every JetPack release names its GPU devfreq node
and prints `nvpmodel -q` like these fakes (taken from JetPack 6 on Orin: 17000000.ga10b, "NV Power Mode:")."""

from __future__ import annotations

import logging
import os
import stat

import pytest

from edgemm.backends.tensorrt.jetson import available_memory_mb, jetson_state, warn_if_unlocked


def _tree(root, *, locked: bool, mem_kb: int = 3_000_000):
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "nv_tegra_release").write_text("# R36 (release), REVISION: 4.3\n")
    node = root / "sys" / "class" / "devfreq" / "17000000.ga10b"
    node.mkdir(parents=True)
    (node / "name").write_text("17000000.ga10b\n")
    (node / "max_freq").write_text("918000000\n")
    (node / "min_freq").write_text(("918000000" if locked else "306000000") + "\n")
    (node / "cur_freq").write_text("612000000\n")
    (root / "proc").mkdir()
    (root / "proc" / "meminfo").write_text(f"MemTotal: 7800000 kB\nMemAvailable: {mem_kb} kB\n")


@pytest.fixture
def nvpmodel(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    tool = bin_dir / "nvpmodel"
    tool.write_text("#!/bin/sh\necho 'NV Power Mode: 15W'\necho 0\n")
    tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def test_state_reports_power_mode_and_whether_clocks_are_locked(tmp_path, nvpmodel, caplog):
    _tree(tmp_path / "a", locked=False)
    state = jetson_state(tmp_path / "a")
    assert state["power_mode"] == "15W" and state["clocks_locked"] is False
    assert state["gpu_clock"] == {"min_hz": 306000000, "max_hz": 918000000, "cur_hz": 612000000}
    with caplog.at_level(logging.WARNING, logger="edgemm"):
        warn_if_unlocked(state, "building")
    assert "sudo jetson_clocks" in caplog.text
    _tree(tmp_path / "b", locked=True)
    assert jetson_state(tmp_path / "b")["clocks_locked"] is True
    assert jetson_state(tmp_path / "not-a-jetson") is None
    assert available_memory_mb(tmp_path / "b") == 3_000_000 // 1024


def test_build_on_a_jetson_records_the_state_and_refuses_what_memory_cannot_hold(monkeypatch, tmp_path):
    # Old code recorded nothing about clocks and started building whatever the memory left.
    from edgemm.backends.tensorrt import TensorRTOptions, builder
    from edgemm.errors import DependencyError
    from tests.unit.test_tensorrt_builder import _stub

    calls = _stub(monkeypatch, "10.3.0.30")
    sys_modules_cudart = __import__("sys").modules["cuda.bindings.runtime"]
    assert sys_modules_cudart.cudaGetDeviceProperties(0)[1].integrated == 1      # the stand-in is a Jetson
    state = {"release": "R36", "power_mode": "15W", "gpu_clock": None, "clocks_locked": False}
    monkeypatch.setattr(builder, "jetson_state", lambda: state)
    onnx = tmp_path / "m" / "model.onnx"
    onnx.parent.mkdir()
    onnx.write_bytes(b"x" * (3 << 20))
    monkeypatch.setattr(builder, "available_memory_mb", lambda: 1000)
    with pytest.raises(DependencyError, match="needs about 1030 MiB .* but 1000 MiB"):
        builder.build_engine(onnx, tmp_path / "e.plan", TensorRTOptions(precision="fp16", workspace_mb=1024),
                             timing_cache=tmp_path / "t.cache")
    assert "parse" not in calls
    monkeypatch.setattr(builder, "available_memory_mb", lambda: 4000)
    built = builder.build_engine(onnx, tmp_path / "e.plan", TensorRTOptions(precision="fp16", workspace_mb=1024),
                                 timing_cache=tmp_path / "t.cache")
    assert built["jetson"] == state
