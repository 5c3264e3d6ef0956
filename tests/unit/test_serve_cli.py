"""`edgemm serve` when the server fails: the one-line error names a server log that still exists (the
command removes its temporary folder, which held the log it named)."""

from __future__ import annotations

import os
import stat

from tests.conftest import run_cli

FAILING_SERVER = """#!/bin/sh
echo 'E1208 model_lifecycle.cc:642] "failed to load model: Internal: stand-in failure"'
echo 'error: creating server: Internal - failed to load all models'
exit 1
"""


def test_a_failed_server_start_names_a_log_that_exists(tiny_bundle, tmp_path):
    # A stand-in tritonserver (laid out as in Triton's container: bin/ beside backends/python/<stub>).
    binary = tmp_path / "triton" / "bin" / "tritonserver"
    binary.parent.mkdir(parents=True)
    binary.write_text(FAILING_SERVER)
    binary.chmod(binary.stat().st_mode | stat.S_IEXEC)
    stub = tmp_path / "triton" / "backends" / "python" / "triton_python_backend_stub"
    stub.parent.mkdir(parents=True)
    stub.write_text("")
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {"EDGEMM_TRITONSERVER": str(binary), "TMPDIR": str(temp)}
    res = run_cli("serve", tiny_bundle, "--timeout", "30", env=env)
    assert res.returncode != 0
    line = res.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and "failed to load all models" in line, res.stderr
    log = line[len("error: "):].split(": ")[0]
    assert os.path.isfile(log), f"the error names {log}, which is gone"
    assert "stand-in failure" in open(log).read()
    assert [p.name for p in temp.iterdir()] == [os.path.basename(log)]   # the repository copy is gone
