"""The atomic bundle writer's clean-up paths, which the kill tests only reach by chance."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from edgemm.bundle import STAGING_PREFIX, BundleWriter, sweep_stale_staging


def test_failed_write_removes_the_folders_it_made(tmp_path):
    dest = tmp_path / "made" / "by" / "writer" / "bundle"
    with pytest.raises(RuntimeError):
        with BundleWriter(dest) as writer:
            (writer.stage / "model.onnx").write_bytes(b"partial")
            raise RuntimeError("compile failed half-way")
    assert list(tmp_path.iterdir()) == []


def test_failed_write_keeps_folders_that_were_there(tmp_path):
    (tmp_path / "engines" / "other").mkdir(parents=True)
    with pytest.raises(RuntimeError):
        with BundleWriter(tmp_path / "engines" / "new"):
            raise RuntimeError("compile failed")
    assert sorted(p.name for p in (tmp_path / "engines").iterdir()) == ["other"]


def test_sweep_removes_leftovers_of_dead_processes_only(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    dead_pid = int(dead.stdout)
    leftovers = [f"{STAGING_PREFIX}{dead_pid}-abc123", f"{STAGING_PREFIX}{dead_pid}-old-my-bundle"]
    alive = f"{STAGING_PREFIX}{os.getpid()}-xyz789"
    for name in leftovers + [alive, "my-bundle"]:
        (tmp_path / name).mkdir()
    sweep_stale_staging(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive, "my-bundle"])
