"""The gate's verdict: this run's outputs against the golden ones (or their statistics), the task metric
against the baseline's, and the latency ratio against the baseline's ratio."""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

import numpy as np

from ...precision import parse as parse_precision
from ..metrics import cosine_failures, top1_text
from .anchor import ANCHOR_NAME
from .context import bundle_context, check_context
from .golden import Baseline, _digest, _stats
from .tolerances import GateTolerances

if TYPE_CHECKING:
    from ...runtime.manifest import Manifest


def compare_to_baseline(baseline: Baseline, report: Mapping, manifest: "Manifest",
                        outputs: list[dict[str, np.ndarray]], tolerances: GateTolerances,
                        latency: Mapping | None = None) -> dict:
    """The gate's verdict: accuracy (outputs vs golden, task metric) and latency (``measure_gate_latency`` of
    this run, ratio vs the baseline's ratio)."""
    from ..metrics import ParityAccumulator

    changes, same_host = check_context(baseline.context, bundle_context(manifest), baseline.path)
    doc = baseline.doc
    result: dict = {"file": str(baseline.path), "created": doc.get("created"), "tolerances": tolerances.to_dict(),
                    "changes": changes, "notes": [], "outputs": {}, "failures": []}
    fail = result["failures"]
    golden = baseline.golden()
    noise = parse_precision(manifest.precision.value).spec.score_noise
    for name, entry in doc["outputs"].items():
        now_batches = [b[name] for b in outputs if name in b]
        if len(now_batches) != len(outputs) or not now_batches:
            fail.append(f"output {name}: missing from the bundle (the baseline has it)")
            result["outputs"][name] = {"passed": False, "missing": True}
            continue
        shapes = [list(b.shape) for b in now_batches]
        if shapes != entry["batch_shapes"]:
            fail.append(f"output {name}: shape {shapes[0]} vs baseline {entry['batch_shapes'][0]}")
            result["outputs"][name] = {"passed": False, "shape": shapes[0]}
            continue
        identical = _digest(now_batches) == entry["sha256"]
        res: dict = {"identical": identical}
        if golden is not None and name in golden:
            # the verdict verify used (output_kinds); near-ties as the bundle's precision makes them
            acc = ParityAccumulator(report.get("output_heads"), score_noise=noise)
            # Identical bytes: compare with themselves, so float16 storage rounding is not shown as error.
            for g, b in zip(now_batches if identical else golden[name], now_batches):
                acc.add({name: g.astype(b.dtype) if g.dtype.kind == "f" else g}, {name: b})
            res.update({k: v for k, v in acc.result()[name].to_dict().items() if k not in ("name", "samples")})
            fail_before = len(fail)
            _check_output(name, res, entry, tolerances, fail)
            res["passed"] = len(fail) == fail_before
        else:
            res.update(_compare_stats(name, entry, now_batches, identical, tolerances, fail))
        result["outputs"][name] = res
    extra = [name for name in manifest.output_names if name not in doc["outputs"]]
    if extra:
        result["notes"].append(f"outputs not in the baseline (not gated): {', '.join(extra)}")
    result["task"] = _compare_task(doc.get("task"), report.get("task"), tolerances, fail, result["notes"])
    result["latency"] = _compare_latency(doc.get("latency"), latency, same_host, tolerances, fail,
                                         result["notes"])
    result["passed"] = not fail
    return result


def _check_output(name: str, res: dict, entry: Mapping, tol: GateTolerances, fail: list[str]) -> None:
    if res.get("exact_match") is not None:
        if res["exact_match"] < tol.min_exact_match:
            fail.append(f"output {name}: exact match vs golden {res['exact_match']:.4f} < {tol.min_exact_match}")
        return
    fail.extend(cosine_failures(name, res, tol.min_cosine, " vs golden"))
    if res.get("top1_agreement") is not None and res["top1_agreement"] < tol.min_top1_agreement:
        fail.append(f"output {name}: top-1 agreement vs golden {top1_text(res)} < "
                    f"{tol.min_top1_agreement}")
    scale = entry["stats"].get("abs_max", 0.0)
    limit = tol.max_abs_rel * scale + entry.get("golden_error", 0.0)
    res["max_abs_limit"] = limit
    if res.get("max_abs_error", 0.0) > limit:
        fail.append(f"output {name}: max abs error vs golden {res['max_abs_error']:.4g} > {limit:.4g} "
                    f"({tol.max_abs_rel:g} x max |golden| {scale:.4g})")


def _compare_stats(name: str, entry: Mapping, batches: list[np.ndarray], identical: bool, tol: GateTolerances,
                   fail: list[str]) -> dict:
    """Digest-only baselines: identical bytes pass; otherwise mean and spread must stay within
    max_abs_rel of the baseline's max |value| (a coarse check, said so in the report)."""
    now, base = _stats(batches), entry["stats"]
    res = {"stats": now, "golden": False}
    if identical or "mean" not in base:
        res["passed"] = identical or "mean" not in now
        if not res["passed"]:
            fail.append(f"output {name}: no finite values in the baseline to compare with")
        return res
    if "mean" not in now:
        fail.append(f"output {name}: no finite values (baseline mean {base['mean']:.4g})")
        res["passed"] = False
        return res
    limit = tol.max_abs_rel * max(base["abs_max"], 1e-12)
    bad = [f"{k} {now[k]:.4g} vs baseline {base[k]:.4g}" for k in ("mean", "std")
           if abs(now[k] - base[k]) > limit]
    if bad:
        fail.append(f"output {name}: statistics differ beyond {limit:.3g} ({'; '.join(bad)}); no golden arrays "
                    "were stored, record with --golden float16 for a sample-wise check")
    res["passed"] = not bad
    return res


def _compare_task(recorded: Mapping | None, now: Mapping | None, tol: GateTolerances, fail: list[str],
                  notes: list[str]) -> dict | None:
    if not recorded:
        return None
    if not now or "bundle" not in now:
        notes.append(f"task {recorded['metric']}: not measured in this run (labels or metric missing)")
        return None
    if now["metric"] != recorded["metric"] or list(now["outputs"]) != list(recorded["outputs"]):
        notes.append(f"task metric {now['metric']} differs from the baseline's {recorded['metric']}: not gated")
        return None
    drop = recorded["value"] - now["bundle"]
    res = {"metric": now["metric"], "baseline": recorded["value"], "now": now["bundle"], "drop": drop,
           "passed": drop <= tol.max_metric_drop}
    if not res["passed"]:
        fail.append(f"task {now['metric']}: {now['bundle']:.2f} vs baseline {recorded['value']:.2f} "
                    f"(drop {drop:.2f} > {tol.max_metric_drop} points)")
    return res


def _compare_latency(recorded: Mapping | None, now: Mapping | None, same_host: bool, tol: GateTolerances,
                     fail: list[str], notes: list[str]) -> dict | None:
    def skip(reason):
        notes.append(f"latency not gated: {reason}")
        return {"skipped": reason}

    if not recorded:
        return skip("the baseline has no latency (recorded with --iterations 0)")
    if not now:
        return skip("not measured in this run (--iterations 0)")
    if recorded.get("anchor", {}).get("name") != ANCHOR_NAME:
        return skip(f"the baseline's anchor {recorded.get('anchor')!r} is not this edgemm's {ANCHOR_NAME!r}")
    if not same_host and not tol.latency_any_host:
        return skip("the baseline was recorded on other hardware (pass --latency-any-host to gate anyway)")
    pct = recorded["percentile"]
    change = now["ratio"] / max(recorded["ratio"], 1e-12)
    res = {"statistic": f"p{pct}", "ratio": now["ratio"], "baseline_ratio": recorded["ratio"], "change": change,
           "tolerance": tol.latency_ratio, "bundle_ms": now[f"bundle_p{pct}_ms"],
           "baseline_bundle_ms": recorded[f"bundle_p{pct}_ms"], "passed": change <= tol.latency_ratio}
    if not res["passed"]:
        fail.append(f"latency: bundle/anchor p{pct} ratio {now['ratio']:.3g} vs baseline {recorded['ratio']:.3g} "
                    f"({change:.2f}x slower > {tol.latency_ratio}x tolerance)")
    elif change < 1 / tol.latency_ratio:
        notes.append(f"latency: {1 / change:.2f}x faster than the baseline; consider re-recording it")
    return res
