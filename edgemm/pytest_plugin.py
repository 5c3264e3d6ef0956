"""pytest plugin: parity tests for edgemm bundles in a team's own repository.

Registered through the ``pytest11`` entry point, so installing edgemm makes it available::

    def test_model_gate(edgemm_gate):
        edgemm_gate.check("engines/my-model", "data/eval.npz")      # baseline: baselines/test_model_gate.json

    def test_custom(edgemm_load_bundle, edgemm_baseline):
        bundle = edgemm_load_bundle("engines/my-model")             # edgemm.runtime.Bundle
        baseline = edgemm_baseline("my-model")                      # Baseline or None

Options: ``--edgemm-baseline-dir DIR`` (default: ini ``edgemm_baseline_dir``, else ``baselines`` under the
rootdir) and ``--edgemm-update-baselines`` (record the baselines instead of comparing against them).

This module is imported by every pytest session of an environment with edgemm installed: it imports
nothing heavy at import time.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping

import pytest

UPDATE_HINT = "if the change is intended, re-record with: pytest --edgemm-update-baselines"


class GateFailure(AssertionError):
    """A bundle drifted from its baseline (or its reference). The message lists every failed check."""


def pytest_addoption(parser):
    group = parser.getgroup("edgemm", "edgemm accuracy and latency gate")
    group.addoption("--edgemm-baseline-dir", default=None, metavar="DIR",
                    help="Folder of edgemm baselines (default: ini edgemm_baseline_dir, else <rootdir>/baselines).")
    group.addoption("--edgemm-update-baselines", action="store_true", default=False,
                    help="Record edgemm baselines from this run instead of gating against them.")
    parser.addini("edgemm_baseline_dir", "Folder of edgemm baselines, relative to the rootdir.", default="baselines")


def pytest_report_header(config):
    if not _plugin_in_use(config):
        return None
    mode = "recording" if config.getoption("edgemm_update_baselines") else "gating"
    return f"edgemm: baselines in {_baseline_dir(config)} ({mode})"


def _plugin_in_use(config) -> bool:
    return bool(config.getoption("edgemm_baseline_dir") or config.getoption("edgemm_update_baselines")
                or config.getini("edgemm_baseline_dir") != "baselines")


def _baseline_dir(config) -> Path:
    value = config.getoption("edgemm_baseline_dir") or config.getini("edgemm_baseline_dir")
    path = Path(value)
    return path if path.is_absolute() else Path(config.rootpath) / path


def baseline_name(nodeid_name: str) -> str:
    """A file-name-safe baseline name from a test name: test_gate[int8-cpu] -> test_gate-int8-cpu."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", nodeid_name).strip("-.")
    return name or "baseline"


def format_failure(report: Mapping) -> str:
    """A readable multi-line account of a failed verification, for an assertion message."""
    from .parity.metrics import top1_cell

    meta = report.get("bundle") or {}
    gate = report.get("baseline") or {}
    lines = [f"edgemm gate failed for bundle {meta.get('path', meta.get('name'))} "
             f"({meta.get('precision')}, {meta.get('backend')}, target {meta.get('target')})"
             + (f" against {gate['file']}" if gate else "")]
    lines += [f"  - {f}" for f in report.get("failures", [])]
    if gate.get("outputs"):
        lines.append("  outputs vs golden:")
        width = max(len(n) for n in gate["outputs"])
        for name, o in gate["outputs"].items():
            if o.get("identical"):
                detail = "identical"
            elif o.get("missing"):
                detail = "missing"
            else:
                bits = []
                if o.get("mean_cosine") is not None:
                    bits.append(f"cosine {o['mean_cosine']:.6f}")
                if "max_abs_limit" in o:
                    bits.append(f"max|err| {o['max_abs_error']:.4g} (limit {o['max_abs_limit']:.3g})")
                if o.get("exact_match") is not None:
                    bits.append(f"exact {o['exact_match']:.4f}")
                elif top1_cell(o) is not None:
                    bits.append(f"top-1 {top1_cell(o)}")
                detail = ", ".join(bits) or "changed"
            lines.append(f"    {name:<{width}}  {detail}  {'ok' if o.get('passed') else 'FAIL'}")
    lat = gate.get("latency") or {}
    if "change" in lat:
        lines.append(f"  latency: {lat['change']:.2f}x the baseline's bundle/anchor ratio "
                     f"(tolerance {lat['tolerance']}x) {'ok' if lat['passed'] else 'FAIL'}")
    elif lat.get("skipped"):
        lines.append(f"  latency: not gated ({lat['skipped']})")
    for change in gate.get("changes") or []:
        lines.append(f"  changed since the baseline: {change}")
    if gate:
        lines.append(f"  {UPDATE_HINT}")
    return "\n".join(lines)


def assert_gate_passed(report: Mapping) -> None:
    """Raise GateFailure with a readable message unless the verification report passed."""
    __tracebackhide__ = True
    if not report.get("passed"):
        raise GateFailure(format_failure(report))


_BASELINE_OWNERS = pytest.StashKey[dict]()


class Gate:
    """The ``edgemm_gate`` fixture: verify a bundle against the test's baseline (or record it)."""

    def __init__(self, node, baseline_dir: Path, update: bool):
        self._node = node
        self.baseline_dir = baseline_dir
        self.update = update
        self.recorded: list[Path] = []

    def baseline_path(self, name: str | None = None) -> Path:
        return self.baseline_dir / f"{baseline_name(name or self._node.name)}.json"

    def check(self, bundle, data, *, name: str | None = None, reference: str | None = None,
              iterations: int = 50, batch_size: int | None = None, metric: str | None = None,
              metric_outputs=None, golden: str = "float16", **tolerances) -> dict:
        """Gate ``bundle`` on ``data`` against baseline ``name`` (default: the test's name). Tolerances:
        min_cosine, min_top1_agreement, max_abs_rel, max_metric_drop, latency_ratio, latency_any_host.
        Returns the report; fails the test with every failed check listed."""
        __tracebackhide__ = True
        from .errors import EdgemmError
        from .parity.gate import run_gate

        path = self.baseline_path(name)
        self._claim(path, name)
        common = dict(reference=reference, iterations=iterations, batch_size=batch_size, metric=metric,
                      metric_outputs=metric_outputs, tolerances=tolerances, write=False)
        if not self.update and not path.is_file():
            pytest.fail(f"no edgemm baseline at {path}; record it with: pytest --edgemm-update-baselines",
                        pytrace=False)
        try:
            if self.update:
                report = run_gate(bundle, data, save=path, golden=golden, **common).report
            else:
                report = run_gate(bundle, data, baseline=path, **common).report
        except EdgemmError as exc:  # bad input (wrong baseline, other eval data): its one line says it all
            problem = f"edgemm: {exc}"
        else:
            problem = None
        if problem:  # failed outside the except block, so no chained traceback is shown
            pytest.fail(problem, pytrace=False)
        if report.get("baseline_saved"):
            self.recorded.append(path)
        self._record_properties(report)
        assert_gate_passed(report)
        return report

    def _claim(self, path: Path, name: str | None) -> None:
        """Two tests must not share a baseline file by accident: test_gate[a/b] and test_gate[a-b] both
        sanitize to test_gate-a-b, and tests of one name in two modules map to one file. An explicit
        ``name=`` shared on purpose is allowed; anything else fails the second test, naming both."""
        __tracebackhide__ = True
        owners = self._node.config.stash.setdefault(_BASELINE_OWNERS, {})
        key = f"name={name}" if name else self._node.nodeid
        owner = owners.setdefault(path.resolve(), key)
        if owner != key:
            pytest.fail(f"edgemm: baseline file {path} is already used by {owner}; this test ({key}) would "
                        f"{'overwrite' if self.update else 'be gated against'} it (fix: pass a distinct "
                        f"name=... to edgemm_gate.check)", pytrace=False)

    def _record_properties(self, report: Mapping) -> None:
        """Key numbers as user properties, so pytest's own --junitxml carries them."""
        gate = report.get("baseline") or {}
        for name, o in gate.get("outputs", {}).items():
            if o.get("mean_cosine") is not None:
                self._node.user_properties.append((f"edgemm.{name}.cosine_vs_golden", round(o["mean_cosine"], 8)))
        lat = gate.get("latency") or {}
        if "change" in lat:
            self._node.user_properties.append(("edgemm.latency_change", round(lat["change"], 4)))


@pytest.fixture(scope="session")
def edgemm_baseline_dir(pytestconfig) -> Path:
    """The folder baselines are read from and recorded into."""
    return _baseline_dir(pytestconfig)


@pytest.fixture(scope="session")
def edgemm_update_baselines(pytestconfig) -> bool:
    """True when the session records baselines (--edgemm-update-baselines)."""
    return bool(pytestconfig.getoption("edgemm_update_baselines"))


@pytest.fixture(scope="session")
def edgemm_load_bundle():
    """Factory: path -> edgemm.runtime.Bundle (hash-verified), loaded once per session."""
    from . import runtime

    cache: dict[Path, object] = {}

    def load(path):
        key = Path(path).resolve()
        if key not in cache:
            cache[key] = runtime.load(key)
        return cache[key]
    return load


@pytest.fixture
def edgemm_baseline(edgemm_baseline_dir):
    """Factory: name -> edgemm.parity.gate.Baseline, or None when not recorded yet."""
    from .parity.gate import load_baseline

    def load(name: str):
        path = edgemm_baseline_dir / f"{baseline_name(name)}.json"
        return load_baseline(path) if path.is_file() else None
    return load


@pytest.fixture
def edgemm_gate(request, edgemm_baseline_dir, edgemm_update_baselines) -> Gate:
    """``edgemm_gate.check(bundle, data, ...)`` gates a bundle against the test's baseline."""
    gate = Gate(request.node, edgemm_baseline_dir, edgemm_update_baselines)
    yield gate
    request.config.stash.setdefault(_RECORDED, []).extend(gate.recorded)


_RECORDED = pytest.StashKey[list]()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    recorded = config.stash.get(_RECORDED, [])
    if recorded:
        terminalreporter.write_sep("-", "edgemm baselines recorded")
        for path in recorded:
            terminalreporter.write_line(str(path))
