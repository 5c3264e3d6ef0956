"""Helpers shared by the robustness tests: running the CLI in a subprocess and checking what it left."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT


def edgemm_cmd(*args) -> list[str]:
    return [sys.executable, "-c", "from edgemm.cli.main import entry; entry()", *map(str, args)]


def cli_env(tmpdir: Path | None = None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    if tmpdir is not None:  # where edgemm's own temporary files go: checked empty afterwards
        env["TMPDIR"] = str(tmpdir)
    return env


def run_edgemm(args, *, cwd, tmpdir=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(edgemm_cmd(*args), cwd=cwd, env=cli_env(tmpdir), capture_output=True, text=True,
                          timeout=timeout)


def tree_snapshot(folder: Path) -> dict[str, str]:
    """Every entry under ``folder`` with its content hash (files), target (links) or kind (folders)."""
    snap = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = path.relative_to(folder).as_posix()
            if path.is_symlink():
                snap[rel] = "link:" + os.readlink(path)
            elif path.is_dir():
                snap[rel] = "dir"
            else:
                snap[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return snap


def single_error_line(proc) -> str:
    """The one error line of a refused command: non-zero exit, no traceback, nothing else on stderr."""
    everything = proc.stdout + proc.stderr
    assert proc.returncode != 0, everything
    assert "Traceback" not in everything
    lines = error_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr
    return lines[0]


def error_lines(stderr: str) -> list[str]:
    """stderr minus `edgemm compile`'s progress lines (indented by two spaces, printed before the
    failure); what remains must be the single error line."""
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith("  ")]


def manifest_body(name: str) -> dict:
    """The smallest manifest BundleWriter.write_manifest accepts (it validates as a reader will), for the
    tests of the writer's commit protocol: one model.onnx on ONNX Runtime."""
    spec = {"name": "x", "dtype": "float32", "shape": [1]}
    return {"name": name, "inputs": [spec], "outputs": [dict(spec, name="y")], "precision": {"mode": "fp32"},
            "target": {"name": "cpu"}, "backend": {"name": "onnxruntime", "model": "model.onnx"}}
