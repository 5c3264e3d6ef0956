"""The pytest plugin (edgemm.pytest_plugin), run inside pytester sessions as a team's repository would
use it: record baselines, gate against them, read the failures."""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET
from importlib import metadata

import pytest

from tests.unit.test_baseline import build_gate_bundles

pytest_plugins = ["pytester"]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    return build_gate_bundles(tmp_path_factory.getbasetemp() / "edgemm-gate-bundles")


@pytest.fixture
def team_repo(pytester, bundles, monkeypatch):
    """A pytester folder with parity tests written against the plugin's fixtures. Autoload is off and the
    plugin is named with -p, so the test works whether or not the entry point is installed."""
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    relabelled = pytester.path / "fp16-bundle"
    shutil.copytree(bundles["original"], relabelled)
    manifest = json.loads((relabelled / "manifest.json").read_text())
    manifest["precision"]["mode"] = "fp16"
    (relabelled / "manifest.json").write_text(json.dumps(manifest))
    pytester.makepyfile(test_parity=f"""
        import numpy as np

        ORIGINAL, PERTURBED, FP16 = {str(bundles['original'])!r}, {str(bundles['perturbed'])!r}, {str(relabelled)!r}
        EVAL = {str(bundles['eval'])!r}

        def test_original(edgemm_gate):
            report = edgemm_gate.check(ORIGINAL, EVAL, name="tiny")
            assert report["passed"]

        def test_changed(edgemm_gate):
            edgemm_gate.check(PERTURBED, EVAL, name="tiny")

        def test_unrecorded(edgemm_gate):
            edgemm_gate.check(ORIGINAL, EVAL, name="never-recorded")

        def test_other_precision(edgemm_gate):
            edgemm_gate.check(FP16, EVAL, name="tiny")

        def test_fixtures(edgemm_load_bundle, edgemm_baseline, edgemm_baseline_dir, edgemm_update_baselines):
            bundle = edgemm_load_bundle(ORIGINAL)
            assert bundle is edgemm_load_bundle(ORIGINAL) and bundle.precision == "fp32"
            assert edgemm_baseline("never-recorded") is None and not edgemm_update_baselines
            baseline = edgemm_baseline("tiny")
            assert baseline.path == edgemm_baseline_dir / "tiny.json"
            assert baseline.golden()["logits"][0].dtype == np.float16
    """)
    return pytester


def run(pytester, *args):
    return pytester.runpytest("-p", "edgemm.pytest_plugin", "-p", "no:cacheprovider", *args)


def test_record_then_gate_then_fail_readably(team_repo):
    recorded = run(team_repo, "--edgemm-update-baselines", "-k", "test_original")
    recorded.assert_outcomes(passed=1)
    recorded.stdout.fnmatch_lines(["*edgemm: baselines in*(recording)*", "*edgemm baselines recorded*",
                                   "*baselines/tiny.json"])
    assert (team_repo.path / "baselines" / "tiny.json").is_file()
    assert (team_repo.path / "baselines" / "tiny.npz").is_file()

    run(team_repo, "-k", "test_original or test_fixtures").assert_outcomes(passed=2)

    failed = run(team_repo, "-k", "test_changed")
    failed.assert_outcomes(failed=1)
    failed.stdout.fnmatch_lines([
        "*GateFailure: edgemm gate failed for bundle*(fp32, onnxruntime, target cpu) against*tiny.json",
        "*- baseline: output logits: mean cosine vs golden 0.99* < 0.9999",
        "*- baseline: task top1: * vs baseline 100.00 (drop * > 0.5 points)",
        "*outputs vs golden:",
        "*logits *cosine 0.99*FAIL",
        "*re-record with: pytest --edgemm-update-baselines",
    ])
    assert "edgemm/parity/gate/" not in failed.stdout.str()  # the helper hides its own frames
    assert "During handling" not in failed.stdout.str()


def test_missing_baseline_and_wrong_context_fail_in_one_line(team_repo):
    result = run(team_repo, "-k", "test_unrecorded")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*no edgemm baseline at *never-recorded.json; record it with: "
                                 "pytest --edgemm-update-baselines"])
    run(team_repo, "--edgemm-update-baselines", "-k", "test_original").assert_outcomes(passed=1)
    result = run(team_repo, "-k", "test_other_precision")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*edgemm: *tiny.json: context.precision: baseline was recorded for precision "
                                 "'fp32', this bundle is 'fp16'*"])
    assert "Traceback" not in result.stdout.str() and "During handling" not in result.stdout.str()


def test_baseline_dir_option_ini_and_junit_properties(team_repo):
    run(team_repo, "--edgemm-update-baselines", "--edgemm-baseline-dir", "ci/golden",
        "-k", "test_original").assert_outcomes(passed=1)
    assert (team_repo.path / "ci" / "golden" / "tiny.json").is_file()
    assert not (team_repo.path / "baselines").exists()

    team_repo.makeini("[pytest]\nedgemm_baseline_dir = ci/golden\n")
    result = run(team_repo, "-k", "test_original", "--junitxml", "out.xml")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*edgemm: baselines in *ci/golden (gating)*"])
    props = {p.get("name"): p.get("value") for p in ET.parse(team_repo.path / "out.xml").iter("property")}
    assert float(props["edgemm.logits.cosine_vs_golden"]) == pytest.approx(1.0)
    assert 0.25 < float(props["edgemm.latency_change"]) < 4  # same bundle: a sane ratio, not a timing test


def test_assert_gate_passed_is_usable_on_its_own():
    from edgemm.pytest_plugin import GateFailure, assert_gate_passed, baseline_name

    assert_gate_passed({"passed": True})
    with pytest.raises(GateFailure, match=r"(?s)edgemm gate failed.*- output x: mean cosine 0\.5 < 0\.99"):
        assert_gate_passed({"passed": False, "failures": ["output x: mean cosine 0.5 < 0.99"],
                            "bundle": {"name": "m", "precision": "int8", "backend": "onnxruntime", "target": "cpu"}})
    assert baseline_name("test_gate[int8-jetson orin]") == "test_gate-int8-jetson-orin"


def test_entry_point_names_the_plugin_when_installed():
    eps = [ep for ep in metadata.entry_points(group="pytest11") if ep.value.startswith("edgemm")]
    if not eps:
        pytest.skip("the pytest11 entry point is not installed in this environment (pyproject not re-installed)")
    assert [(ep.name, ep.value) for ep in eps] == [("edgemm", "edgemm.pytest_plugin")]


def test_two_test_ids_mapping_to_one_baseline_file_fail_clearly(pytester, bundles, monkeypatch):
    """test_gate[a/b] and test_gate[a-b] both sanitize to test_gate-a-b.json: the second must not overwrite
    (or be gated against) the first's baseline; an explicit shared name= stays allowed."""
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    pytester.makepyfile(test_clash=f"""
        import pytest

        @pytest.mark.parametrize("variant", ["a/b", "a-b"])
        def test_gate(edgemm_gate, variant):
            edgemm_gate.check({str(bundles['original'])!r}, {str(bundles['eval'])!r}, iterations=0)
    """)
    result = run(pytester, "--edgemm-update-baselines")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*baseline file *test_gate-a-b.json is already used by *test_gate?a/b?*"
                                 "would overwrite it*"])
    assert sorted(p.name for p in (pytester.path / "baselines").glob("*.json")) == ["test_gate-a-b.json"]
