"""Every case of the hostile-input corpus, through the real CLI in a subprocess: non-zero exit, one
`error:` line naming the file (and the field), no traceback, no output, nothing changed in the case's
folder, no temporary files left, and no code run from the input."""

from __future__ import annotations

import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.robustness.helpers import cli_env, error_lines, run_edgemm, single_error_line, tree_snapshot
from tests.robustness.make_corpus import SPECS, build_case, evil_pickle, member, rewrite_zip

WORKERS = 3   # the cases are mostly interpreter start-up; overlap them


@pytest.fixture(scope="session")
def corpus_results(good, tmp_path_factory):
    """Build every case, run them all (concurrently), and record what each left behind."""
    root = tmp_path_factory.mktemp("corpus")
    cases = [build_case(spec, good, root / "cases") for spec in SPECS]
    # Libraries may keep files of their own in TMPDIR (onnxruntime writes a session id at import); start
    # every case's TMPDIR with those, so what remains to check is what edgemm itself leaves.
    warm = root / "tmp-warm"
    warm.mkdir()
    subprocess.run([sys.executable, "-c", "import onnxruntime, onnx, torch"], env=cli_env(warm), check=True)

    def run(case):
        tmpdir = root / "tmp" / case.name
        shutil.copytree(warm, tmpdir)
        before, tmp_before = tree_snapshot(case.workdir), tree_snapshot(tmpdir)
        proc = run_edgemm(case.argv, cwd=case.workdir, tmpdir=tmpdir)
        return case, {"proc": proc, "before": before, "after": tree_snapshot(case.workdir),
                      "tmp_before": tmp_before, "tmp_after": tree_snapshot(tmpdir)}

    with ThreadPoolExecutor(WORKERS) as pool:
        return {case.name: (case, result) for case, result in pool.map(run, cases)}


def test_corpus_is_large_enough():
    kinds = {s.kind for s in SPECS}
    assert len(SPECS) >= 25 and kinds >= {"model", "calib", "bundle", "run-data", "outputs"}


@pytest.mark.parametrize("name", [s.name for s in SPECS])
def test_hostile_input_is_refused_cleanly(corpus_results, name):
    case, r = corpus_results[name]
    proc = r["proc"]
    line = single_error_line(proc)
    assert line.startswith("error: "), line          # an edgemm error, not "internal error:"
    where = f"error: {case.file}: " + (case.field or "")
    assert line.startswith(where), f"expected {where!r}\n got {line!r}"
    if case.output is not None:
        assert not case.output.exists(), "partial output left behind"
    assert r["after"] == r["before"], "the command changed files outside its output"
    assert r["tmp_after"] == r["tmp_before"], "temporary files left behind"
    if case.sentinel is not None:
        assert not case.sentinel.exists(), "the input's payload ran"


def test_verbose_shows_the_traceback(good, tmp_path):
    """Tracebacks are hidden by default, not lost: --verbose prints them."""
    bundle = tmp_path / "bundle"
    shutil.copytree(good.bundle, bundle)
    (bundle / "extra.bin").write_bytes(b"x")
    proc = run_edgemm(["--verbose", "run", bundle, "--data", good.calib, "-o", tmp_path / "o.npz"], cwd=tmp_path)
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and proc.stderr.rstrip().splitlines()[-1].startswith("error: ")


@pytest.mark.parametrize("kind", ["raw-pickle", "pt2-sample-inputs"])
def test_payloads_do_run_when_trusted(good, tmp_path, kind):
    """Control for the sentinel checks above: the same payloads do run once the user passes
    --trust-pickle, so a missing sentinel really means the code did not run."""
    sentinel = tmp_path / "PWNED"
    if kind == "raw-pickle":
        model = tmp_path / "model.pt"
        model.write_bytes(evil_pickle(sentinel))
    else:
        model = tmp_path / "model.pt2"
        rewrite_zip(good.pt2, model, lambda m: m.__setitem__(member(m, "sample_inputs/model.pt"),
                                                             evil_pickle(sentinel)))
    out = tmp_path / "out" / "bundle"
    proc = run_edgemm(["compile", model, "-o", out, "--trust-pickle"], cwd=tmp_path)
    assert sentinel.exists(), proc.stderr
    assert proc.returncode != 0 and not out.exists()   # what it unpickled is not a model
    assert len(error_lines(proc.stderr)) == 1 and "Traceback" not in proc.stderr


def test_legitimate_pt2_still_loads_with_the_guard(good):
    """The .pt2 guard (weights-only unpickling, operator and expression checks) accepts real exports."""
    from edgemm.frontends import load_model

    loaded = load_model(str(good.pt2))
    assert [s.name for s in loaded.input_specs] == ["image", "input_ids"]

