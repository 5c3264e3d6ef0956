"""The gate run: verify a bundle, gate it against a baseline or record one, write the reports."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ...errors import InputError
from .anchor import Recorder, anchor_width, measure_gate_latency
from .compare import compare_to_baseline
from .context import bundle_context, check_context
from .golden import GOLDEN_MODES, Baseline, check_baseline_outputs, load_baseline, save_baseline
from .markdown import render_gate_markdown
from .tolerances import GateTolerances


@dataclass
class GateRun:
    report: dict                      # the verification report, with report["baseline"] when gated
    recorder: Recorder                # outputs and latency samples, for the HTML report
    iterations: int
    baseline: Baseline | None = None  # the baseline gated against, if any
    gate_latency_ms: dict = field(default_factory=dict)  # single-threaded bundle/anchor samples

    def latency_ms(self) -> dict[str, np.ndarray]:
        """Every timed call (ms) for plots: the run's (deployment threads) and the gate's (1 thread)."""
        out = self.recorder.latency_ms(self.iterations)
        out.update({f"{k} (gate, 1 thread)": v for k, v in self.gate_latency_ms.items()})
        return out


def run_gate(bundle, data, *, baseline=None, save: str | os.PathLike | None = None, reference: str | None = None,
             weights: str | None = None, trust_pickle: bool = False, metric: str | None = None,
             metric_outputs=None, batch_size: int | None = None, iterations: int = 50,
             overrides: dict | None = None, tolerances: dict | None = None, golden: str = "float16",
             write: bool = True, keep_reference: bool = False, trusted_keys=None,
             require_signature: bool | None = None) -> GateRun:
    """Verify ``bundle`` on ``data`` and, with ``baseline``, gate it against that baseline; with ``save``,
    record a new baseline from this run (only when the run passed). Raises InputError for a baseline
    from another context or other eval data; a failing gate is ``report["passed"] == False``."""
    from ...runtime.manifest import read_manifest
    from ...runtime.signing import REPORTS_KEPT_NOTE, is_signed
    from ..verify import verify_bundle

    if baseline is not None and save is not None:
        raise InputError("--baseline and --save-baseline exclude each other", field="--save-baseline",
                         fix="gate against the old baseline first, then record the new one in a separate run")
    manifest = read_manifest(bundle)
    loaded = load_baseline(baseline) if baseline is not None else None
    if save is not None:
        check_baseline_outputs(save, {"BUNDLE": bundle, "--data": data, "--reference": reference,
                                      "--weights": weights})
        if golden not in GOLDEN_MODES:
            raise InputError(f"unknown golden mode {golden!r}", field="--golden", fix=f"use {', '.join(GOLDEN_MODES)}")
    tol = GateTolerances.for_precision(manifest.precision.value, **(tolerances or {}))
    width = anchor_width(Path(bundle), manifest)
    if loaded is not None:
        check_context(loaded.context, bundle_context(manifest), loaded.path)  # refuse early, before the work
        if batch_size is not None and batch_size != loaded.batch_size:
            raise InputError(f"batch size {batch_size} differs from the baseline's {loaded.batch_size} (outputs "
                             "such as [B, B] similarity logits depend on it)", field="--batch-size",
                             fix=f"drop --batch-size or pass {loaded.batch_size}")
        batch_size = loaded.batch_size
        # The same anchor work as at recording time, whatever the bundle's size is now.
        width = int(((loaded.doc.get("latency") or {}).get("anchor") or {}).get("width") or width)
    if not batch_size:
        from ...iospec import TensorSpec, call_batch

        batch_size = call_batch([TensorSpec.from_dict(d) for d in manifest.inputs])
    recorder = Recorder(keep_reference=keep_reference)
    gated = loaded is not None or save is not None
    report = verify_bundle(bundle, data, reference=reference, weights=weights, trust_pickle=trust_pickle,
                           metric=metric, metric_outputs=metric_outputs, batch_size=batch_size,
                           iterations=iterations, write=False, overrides=overrides, instrument=recorder,
                           trusted_keys=trusted_keys, require_signature=require_signature)
    outputs = recorder.outputs["bundle"]
    latency, gate_samples = None, {}
    if gated and iterations and recorder.first_feeds is not None:
        latency, gate_samples = measure_gate_latency(bundle, manifest, recorder.first_feeds, width, iterations,
                                                     trusted_keys=trusted_keys, require_signature=require_signature)
    if loaded is not None:
        recorded_sha = loaded.doc["data"].get("sha256")
        if recorded_sha and recorded_sha != report["data"]["sha256"]:
            raise InputError(f"eval data differs from the baseline's ({loaded.doc['data'].get('path')}, sha256 "
                             f"{recorded_sha[:12]}...)", file=data, field="--data",
                             fix="gate on the same eval file the baseline was recorded with")
        gate = compare_to_baseline(loaded, report, manifest, outputs, tol, latency)
        report["baseline"] = gate
        report["failures"] = list(report["failures"]) + [f"baseline: {f}" for f in gate["failures"]]
        report["passed"] = not report["failures"]
    if save is not None:
        if report["passed"]:
            save_baseline(save, report, manifest, outputs, batch_size=batch_size, golden=golden, latency=latency)
            report["baseline_saved"] = str(save)
        else:
            report["baseline_saved"] = None
            report.setdefault("notes", []).append("baseline not saved: this run fails verification")
    if write and is_signed(bundle):
        report.setdefault("notes", []).append(REPORTS_KEPT_NOTE)
    elif write:
        write_gate_reports(Path(bundle), report)
    return GateRun(report, recorder, iterations, loaded, gate_samples)


def write_gate_reports(bundle_dir: Path, report: dict) -> None:
    """report.json and report.md in the bundle (both unhashed), with the gate's section."""
    from ..report import render_markdown, write_bundle_reports

    text = render_markdown(report)
    if report.get("baseline"):
        text += "\n" + render_gate_markdown(report)
    write_bundle_reports(bundle_dir, [("report.json", json.dumps(report, indent=2) + "\n"), ("report.md", text)])
