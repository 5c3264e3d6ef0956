import os
import subprocess
import sys
from pathlib import Path

import pytest

import tests.hypothesis_profiles  # noqa: F401 - loads the hypothesis profile before any test module

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """The tiny fused model in every input format, with calibration and eval data."""
    from tests.fixtures.tiny_models import save_all

    return save_all(tmp_path_factory.mktemp("tiny"))


def run_cli(*args, cwd=None, env=None, timeout=600):
    """Run the `edgemm` CLI in a subprocess; returns CompletedProcess (text)."""
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = str(ROOT) + os.pathsep + full_env.get("PYTHONPATH", "")
    full_env.update(env or {})
    cmd = [sys.executable, "-c", "from edgemm.cli.main import entry; entry()", *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture(scope="session")
def tiny_bundle(tiny, tmp_path_factory):
    """An FP32 CPU bundle of the tiny model, compiled once per session (copy it before tampering)."""
    from edgemm.pipeline import compile_model
    from edgemm.config import CompileConfig

    out = tmp_path_factory.mktemp("bundles") / "tiny-fp32"
    compile_model(CompileConfig(model=str(tiny["torchscript"]), output=str(out), calib=str(tiny["calib"])),
                  say=lambda m: None)
    return out
