"""The atomic bundle writer's clean-up paths, which the kill tests only reach by chance."""

from __future__ import annotations

import os
import subprocess
import sys

from pathlib import Path

import pytest

from edgemm.bundle import STAGING_PREFIX, BundleWriter, sweep_stale_staging
from tests.robustness.helpers import manifest_body


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


def _hold_lock_in_child(lock: Path):
    """Another process (as a compile in another container would) holding an flock on ``lock``."""
    child = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(lock)!r}, os.O_RDWR | os.O_CREAT, 0o600)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "print('locked', flush=True)\n"
        "sys.stdin.read()\n")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "locked"
    return child


def test_sweep_removes_what_no_live_compile_holds(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    dead_pid = int(dead.stdout)
    killed = f"{STAGING_PREFIX}{dead_pid}-0badc0de"          # lock file left, nobody holds it
    no_lock = f"{STAGING_PREFIX}{dead_pid}-0000beef"         # its lock file is gone (or an older edgemm made it)
    for name in (killed, killed + "-work", killed + "-old-my-bundle", no_lock, "my-bundle"):
        (tmp_path / name).mkdir()
    (tmp_path / (killed + ".lock")).write_bytes(b"")
    (tmp_path / f"{STAGING_PREFIX}{dead_pid}-feedface.lock").write_bytes(b"")  # a lock whose folders are gone
    sweep_stale_staging(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my-bundle"]


def test_sweep_spares_a_live_compile_in_another_pid_namespace(tmp_path):
    """PID liveness is not ownership: a compile in another container may carry a pid that is dead here
    (or alive here as some unrelated process). Only its lock counts."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    for pid in (int(dead.stdout), os.getpid()):  # a pid that is dead here, and one alive here
        live = f"{STAGING_PREFIX}{pid}-{pid % 65536:04x}abcd"
        for name in (live, live + "-work"):
            (tmp_path / name).mkdir()
            (tmp_path / name / "model.onnx").write_bytes(b"being written")
        child = _hold_lock_in_child(tmp_path / (live + ".lock"))
        try:
            sweep_stale_staging(tmp_path)
            assert (tmp_path / live / "model.onnx").read_bytes() == b"being written"
            assert (tmp_path / (live + "-work") / "model.onnx").is_file()
        finally:
            child.communicate("")
        sweep_stale_staging(tmp_path)  # its compile is gone now: swept
        assert list(tmp_path.iterdir()) == []


def test_two_concurrent_writers_keep_their_staging_and_both_commit(tmp_path):
    """Two BundleWriters in one parent (two processes' compiles): neither sweeps the other's staging."""
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from edgemm.bundle import BundleWriter\n"
        "from tests.robustness.helpers import manifest_body\n"
        "with BundleWriter(Path(sys.argv[1])) as w:\n"
        "    (w.stage / 'model.onnx').write_bytes(b'x')\n"
        "    print(w.stage.name, flush=True)\n"
        "    sys.stdin.read()\n"
        "    w.write_manifest(manifest_body('a'))\n"
        "    w.commit()\n")
    from tests.robustness.helpers import cli_env
    first = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "a")], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, env=cli_env())
    stage = first.stdout.readline().strip()
    try:
        with BundleWriter(tmp_path / "b") as writer:  # its __enter__ sweeps the parent
            assert (tmp_path / stage / "model.onnx").is_file()
            (writer.stage / "model.onnx").write_bytes(b"y")
            writer.write_manifest(manifest_body("b"))
            writer.commit()
    finally:
        first.communicate("")
    assert first.returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


def test_killed_writer_is_swept_by_the_next(tmp_path):
    script = ("import os, sys\nfrom pathlib import Path\nfrom edgemm.bundle import BundleWriter\n"
              "w = BundleWriter(Path(sys.argv[1])).__enter__()\n"
              "(w.sibling('work') / 'scratch').write_bytes(b's')\n"
              "os.kill(os.getpid(), 9)\n")
    from tests.robustness.helpers import cli_env
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "a")], env=cli_env())
    assert any(p.name.startswith(STAGING_PREFIX) for p in tmp_path.iterdir())
    with BundleWriter(tmp_path / "b") as writer:
        (writer.stage / "model.onnx").write_bytes(b"y")
        writer.write_manifest(manifest_body("b"))
        writer.commit()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]
