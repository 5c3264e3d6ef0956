"""Outputs never destroy inputs and leave nothing behind (issue 14, class 4): the temp files of killed
writers are swept by the next write into their folder, a live writer's are not (its lock says so), and
the Python API refuses an output that is an input as the CLI does."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgemm.errors import InputError
from edgemm.runtime.atomic import TEMP_NAME, atomic_open, sweep_abandoned_temps, write_bytes_atomic
from tests.robustness.helpers import cli_env, error_lines, run_edgemm, tree_snapshot
from tests.robustness.make_corpus import good_feeds, save_npz

_KILLED_MID_WRITE = (
    "import os, sys\n"
    "from edgemm.runtime.atomic import atomic_open\n"
    "with atomic_open(sys.argv[1]) as f:\n"
    "    f.write(b'half an npz')\n"
    "    os.kill(os.getpid(), 9)\n")

_WRITING = (
    "import sys\n"
    "from edgemm.runtime.atomic import atomic_open\n"
    "with atomic_open(sys.argv[1]) as f:\n"
    "    f.write(b'slow writer')\n"
    "    print('writing', flush=True)\n"
    "    sys.stdin.read()\n")


def _temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if TEMP_NAME.match(p.name))


def test_a_killed_run_output_is_swept_by_the_next_run(good, tmp_path):
    data = save_npz(tmp_path / "data.npz", good_feeds(good))
    out = tmp_path / "out.npz"
    killed = subprocess.run([sys.executable, "-c", _KILLED_MID_WRITE, str(out)], env=cli_env())
    assert killed.returncode == -signal.SIGKILL
    assert len(_temps(tmp_path)) == 1 and not out.exists()  # what a SIGKILLed `run -o` leaves
    data_before = data.read_bytes()
    proc = run_edgemm(["run", good.bundle, "--data", data, "-o", out], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert _temps(tmp_path) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["data.npz", "out.npz"]
    assert data.read_bytes() == data_before
    with np.load(out) as npz:
        assert npz.files


def test_a_live_writers_temp_file_is_not_swept(tmp_path):
    """Ownership by lock, not by pid: a writer in another process (or container) keeps its temp file."""
    child = subprocess.Popen([sys.executable, "-c", _WRITING, str(tmp_path / "slow.bin")], env=cli_env(),
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "writing"
        live = _temps(tmp_path)
        assert len(live) == 1
        write_bytes_atomic(tmp_path / "other.bin", b"x")   # sweeps the folder first
        assert sweep_abandoned_temps(tmp_path) == []
        assert _temps(tmp_path) == live
    finally:
        child.communicate("")
    assert child.returncode == 0
    assert (tmp_path / "slow.bin").read_bytes() == b"slow writer" and _temps(tmp_path) == []


def test_sweep_leaves_files_that_are_not_edgemm_temps(tmp_path):
    keep = [".notes.tmp", ".x.12-zzzzzzzz.tmp", "data.1234-abcdef01.tmp"]  # not ".<name>.<pid>-<8 hex>.tmp"
    for name in keep:
        (tmp_path / name).write_text("user file")
    (tmp_path / ".link.1-0000abcd.tmp").symlink_to(tmp_path / ".notes.tmp")
    (tmp_path / ".dir.1-0000abcd.tmp").mkdir()
    assert sweep_abandoned_temps(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep + [".link.1-0000abcd.tmp",
                                                                        ".dir.1-0000abcd.tmp"])


def test_a_failed_write_removes_its_temp_file(tmp_path):
    target = tmp_path / "t.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_open(target) as f:
            f.write(b"new, half")
            raise RuntimeError("disk gone")
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["t.bin"]


def test_sigterm_during_run_leaves_no_output(good, tmp_path):
    """SIGTERM becomes SystemExit in the CLI: a run stopped mid-way leaves no -o file and no temp file."""
    data = save_npz(tmp_path / "data.npz", {k: np.repeat(v, 512, axis=0) for k, v in good_feeds(good).items()})
    before = tree_snapshot(tmp_path)
    from tests.robustness.helpers import edgemm_cmd
    proc = subprocess.Popen(edgemm_cmd("run", good.bundle, "--data", data, "-o", tmp_path / "out.npz",
                                       "--batch-size", "1"), cwd=tmp_path, env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        proc.wait(timeout=4)  # usually still running; if it finished, the output is whole
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    after = tree_snapshot(tmp_path)
    if proc.returncode == 0:
        assert set(after) - set(before) == {"out.npz"}
    else:
        assert after == before


def test_python_api_refuses_a_baseline_over_the_eval_data(good, tmp_path):
    from edgemm.parity.gate import run_gate

    data = save_npz(tmp_path / "eval.npz", good_feeds(good))
    before = data.read_bytes()
    with pytest.raises(InputError, match="--save-baseline: is the --data input"):
        run_gate(good.bundle, data, save=tmp_path / "eval.json")  # its golden outputs would be eval.npz
    assert data.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["eval.npz"]


def test_unwritable_output_is_one_line(good, tmp_path):
    """A --junit that can never be written (a file where its folder should be) is refused before any
    work, in one line naming the flag; nothing is written (no baseline either)."""
    data = save_npz(tmp_path / "data.npz", good_feeds(good))
    blocker = tmp_path / "reports"
    blocker.write_text("a file where the reports folder should be")
    proc = run_edgemm(["verify", good.bundle, "--data", data, "--save-baseline", tmp_path / "b.json",
                       "--junit", blocker / "x" / "edgemm.xml", "--iterations", "0"], cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and lines[0].startswith(f"error: {blocker / 'x' / 'edgemm.xml'}: --junit: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.npz", "reports"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder_is_one_line_after_the_run(good, tmp_path):
    data = save_npz(tmp_path / "data.npz", good_feeds(good))
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        proc = run_edgemm(["run", good.bundle, "--data", data, "-o", ro / "out.npz"], cwd=tmp_path)
    finally:
        ro.chmod(0o700)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert error_lines(proc.stderr)[0].startswith(f"error: {ro / 'out.npz'}: -o: cannot be written")
    assert list(ro.iterdir()) == []
    shutil.rmtree(ro)
