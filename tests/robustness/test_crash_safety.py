"""Killing `edgemm compile` at random moments never leaves a bundle that loads half-made: the output
folder either does not exist or holds a complete bundle (it loads and gives the model's outputs), and
compiling again into the same place succeeds and cleans up what the killed runs left."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from edgemm import runtime
from tests.fixtures.tiny_models import make_data
from tests.robustness.helpers import cli_env, edgemm_cmd

SIGNALS = (signal.SIGKILL, signal.SIGKILL, signal.SIGTERM, signal.SIGINT)   # mostly no chance to clean up


def _compile_cmd(model, calib, dest, force=True):
    return edgemm_cmd("compile", model, "--calib", calib, "-o", dest, *(["--force"] if force else []))


def _entries(parent) -> dict[str, int]:
    try:
        return {p.name: p.stat().st_mtime_ns for p in parent.iterdir()}
    except FileNotFoundError:
        return {}


def _wait_for_writing(proc, parent, before: dict[str, int], limit: float) -> None:
    """Until the compile starts writing next to its destination (a folder appears or changes there, e.g.
    its staging folder) or exits. Nothing here assumes how edgemm stages a bundle."""
    deadline = time.monotonic() + limit
    while proc.poll() is None and time.monotonic() < deadline:
        now = _entries(parent)
        if any(before.get(name) != mtime for name, mtime in now.items()):
            return
        time.sleep(0.002)


def _check_folder(dest, reference: dict) -> str:
    """The invariant after any interruption. Returns what was found."""
    if not dest.exists():
        return "absent"
    bundle = runtime.load(dest)     # raises on anything incomplete or inconsistent
    feeds = make_data(3, seed=9)
    got = bundle.run(feeds)
    for name, want in reference.items():
        np.testing.assert_allclose(got[name], want, rtol=1e-4, atol=1e-5)
    return "complete"


def _kill_trials(model, good, tmp_path, plans, seed_note=""):
    """``plans``: (trigger, delay, signal); trigger "start" counts the delay from launch, "writing" from
    the moment the compile starts writing next to its destination."""
    reference = runtime.load(good.bundle).run(make_data(3, seed=9))
    parent = tmp_path / "engines"
    dest = parent / "tiny"
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir(exist_ok=True)
    # onnxruntime keeps a file of its own in TMPDIR; create it first so only edgemm's files are counted.
    subprocess.run([sys.executable, "-c", "import onnxruntime"], env=cli_env(tmpdir), check=True)
    seen = []
    for i, (trigger, delay, sig) in enumerate(plans):
        # Even trials compile afresh (no bundle there yet), odd ones replace the bundle with --force.
        fresh = i % 2 == 0
        if fresh and dest.exists():
            shutil.rmtree(dest)
        before, tmp_before = _entries(parent), _entries(tmpdir).keys()
        proc = subprocess.Popen(_compile_cmd(model, good.calib, dest, force=not fresh), cwd=tmp_path,
                                env=cli_env(tmpdir),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        if trigger == "writing":
            _wait_for_writing(proc, parent, before, limit=120)
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, sig)   # the process group this test started
            proc.wait(timeout=60)
        stderr = proc.stderr.read().decode(errors="replace")
        proc.stderr.close()
        note = f"trial {i}{seed_note} ({'fresh' if fresh else '--force'}): {sig.name} {delay:.3f}s after {trigger}"
        # Ctrl-C while Python is still importing edgemm shows Python's own KeyboardInterrupt traceback.
        interrupted_early = sig == signal.SIGINT and stderr.rstrip().endswith("KeyboardInterrupt")
        assert "Traceback" not in stderr or interrupted_early, f"{note}: {stderr}"
        if sig != signal.SIGKILL:  # SIGTERM and SIGINT unwind: the compile's temporary files go too
            assert _entries(tmpdir).keys() == tmp_before, f"{note}: temporary files left in TMPDIR"
        try:
            seen.append(_check_folder(dest, reference))
        except Exception as exc:
            left = sorted(p.name for p in dest.iterdir()) if dest.is_dir() else dest
            raise AssertionError(f"{note} left {left}: {exc}") from exc
    # Compiling again succeeds, and leaves only the bundle (staging folders of killed runs are swept).
    done = subprocess.run(_compile_cmd(model, good.calib, dest), cwd=tmp_path, env=cli_env(tmpdir),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert _check_folder(dest, reference) == "complete"
    assert sorted(p.name for p in parent.iterdir()) == ["tiny"]
    return seen


def _timings(model, good, tmp_path) -> tuple[float, float]:
    """Seconds of a full compile, and from its first write next to the destination to its end."""
    parent = tmp_path / "timing"
    launched = time.monotonic()
    before = _entries(parent)
    proc = subprocess.Popen(_compile_cmd(model, good.calib, parent / "tiny"), cwd=tmp_path, env=cli_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _wait_for_writing(proc, parent, before, limit=120)
    start = time.monotonic()
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    return time.monotonic() - launched, time.monotonic() - start


def test_killed_compiles_leave_no_half_bundle(good, tmp_path):
    """Kills while the bundle is being written, and around its commit (ONNX input: no export, fast;
    the staging and commit are the same for every input format). The slow test below runs 50 kills at
    random moments of full TorchScript compiles."""
    _, window = _timings(good.onnx, good, tmp_path)
    plans = [("writing", 0.0, signal.SIGKILL), ("writing", window * 0.5, signal.SIGKILL),
             ("writing", window * 0.9, signal.SIGTERM), ("writing", window * 0.99, signal.SIGKILL),
             ("writing", window * 0.3, signal.SIGINT)]
    seen = _kill_trials(good.onnx, good, tmp_path, plans)
    assert len(seen) == len(plans) and "absent" in seen


@pytest.mark.slow
def test_fifty_random_kills(good, tmp_path):
    model = good.torchscript
    total, window = _timings(model, good, tmp_path)
    seed = int(os.environ.get("EDGEMM_KILL_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    # Half from launch (any moment: imports, export, writing), half inside the writing window.
    plans = [("start", rng.uniform(0.0, total * 1.05), rng.choice(SIGNALS)) if i % 2 else
             ("writing", rng.uniform(0.0, window * 1.05), rng.choice(SIGNALS)) for i in range(50)]
    seen = _kill_trials(model, good, tmp_path, plans, seed_note=f" (EDGEMM_KILL_SEED={seed})")
    assert len(seen) == 50


def test_a_signal_during_pythons_exit_prints_no_traceback():
    """A SIGTERM landing after the command finished, while Python runs its atexit callbacks (torch's
    library finalizers), raised SystemExit inside the callback: 'Exception ignored in atexit callback ...
    Traceback' on stderr (a random-kill trial found it). The exit finishes instead."""
    script = ("import atexit, os, signal, sys\n"
              "from edgemm.cli.main import entry\n"
              "atexit.register(lambda: os.kill(os.getpid(), signal.SIGTERM))\n"
              "sys.argv = ['edgemm', '--version']\n"
              "entry()\n")
    proc = subprocess.run([sys.executable, "-c", script], env=cli_env(None), capture_output=True, text=True,
                          timeout=120)
    assert "Traceback" not in proc.stderr and proc.returncode == 0, (proc.returncode, proc.stderr)
