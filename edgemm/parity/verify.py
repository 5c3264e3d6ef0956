"""Bundle vs reference on evaluation data: per-output accuracy, task metric, latency, pass/fail."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

import numpy as np

from ..data import Dataset
from ..errors import InputError
from ..task import resolve as task_of
from .latency import measure_interleaved
from .metrics import ParityAccumulator, cosine_failures, cosine_text, top1_text
from .thresholds import Thresholds

if TYPE_CHECKING:
    from ..runtime.manifest import Manifest

Runner = Callable[[Mapping[str, np.ndarray]], Mapping[str, np.ndarray]]


def bundle_heads(bundle) -> dict[str, bool] | None:
    """The manifest's output_heads; for bundles compiled before it was recorded, read from their ONNX."""
    heads = bundle.manifest.output_heads
    if isinstance(heads, dict):
        return {str(k): bool(v) for k, v in heads.items()}
    rel = bundle.manifest.backend.model_file
    if not isinstance(rel, str) or not rel.endswith(".onnx") or not (Path(bundle.path) / rel).is_file():
        return None
    import onnx

    from .output_kinds import graph_score_outputs

    try:
        return graph_score_outputs(onnx.load(str(Path(bundle.path) / rel), load_external_data=False))
    except Exception:  # hash-checked already; an unreadable graph only loses the graph's verdict
        return None


def evaluate(bundle_run: Runner, reference_run: Runner | None, data: Dataset, thresholds: Thresholds, *,
             output_names: Sequence[str], batch_size: int = 16, task: tuple[str, list[str]] | None = None,
             latency: dict[str, Callable[[], object]] | None = None, latency_iterations: int = 50,
             warmup: int = 5, progress: Callable[[int, int], None] | None = None,
             heads: Mapping[str, bool] | None = None) -> dict:
    if batch_size < 1:
        raise InputError("must be >= 1", field="--batch-size", fix="e.g. --batch-size 16")
    acc = ParityAccumulator(heads, score_noise=thresholds.score_noise)
    collected: dict[str, dict[str, list[np.ndarray]]] = {"bundle": {}, "reference": {}}
    task_outputs = task[1] if task and data.labels is not None else []
    for name in task_outputs:
        if name not in output_names:
            raise InputError(f"task metric reads output {name!r}, which the bundle does not have",
                             field="--metric", fix=f"outputs are {', '.join(output_names)}")
    done = 0
    for batch in data.batches(batch_size):
        got = bundle_run(batch)
        ref = reference_run(batch) if reference_run else None
        if ref is not None:
            missing = [n for n in output_names if n not in ref]
            if missing:
                raise InputError(f"reference has no output {missing[0]!r} (it has {', '.join(ref)})",
                                 field="--reference", fix="pass the model this bundle was compiled from")
            acc.add({n: ref[n] for n in output_names}, got)
        for name in task_outputs:
            collected["bundle"].setdefault(name, []).append(np.asarray(got[name]))
            if ref is not None:
                collected["reference"].setdefault(name, []).append(np.asarray(ref[name]))
        done += next(iter(batch.values())).shape[0]
        if progress:
            progress(done, data.num_samples)

    report: dict = {"samples": data.num_samples, "thresholds": thresholds.to_dict(), "outputs": {},
                    "failures": []}
    for name, p in acc.result().items():
        entry = p.to_dict()
        checks = []
        checks.extend(cosine_failures(name, entry, thresholds.min_cosine))
        if p.top1_agreement is not None and p.top1_agreement < thresholds.min_top1_agreement:
            checks.append(f"output {name}: top-1 agreement {top1_text(p.to_dict())} < "
                          f"{thresholds.min_top1_agreement}")
        if p.exact_match is not None and p.exact_match < thresholds.min_exact_match:
            checks.append(f"output {name}: exact match {p.exact_match:.4f} < {thresholds.min_exact_match}")
        entry["kind"] = "scores" if acc.kinds.get(name) else ("integer" if p.exact_match is not None else "features")
        entry["passed"] = not checks
        report["outputs"][name] = entry
        report["failures"].extend(checks)

    if task_outputs:
        from ..task import compute

        metric = task[0]
        res = {"metric": metric, "outputs": task_outputs}
        for who in ("reference", "bundle"):
            if collected[who]:
                outs = {n: np.concatenate(v) for n, v in collected[who].items()}
                res[who] = compute(metric, outs, data.labels, task_outputs)
        if "reference" in res:
            res["drop"] = res["reference"] - res["bundle"]
            if res["drop"] > thresholds.max_metric_drop:
                report["failures"].append(f"task {metric}: {res['bundle']:.2f} vs reference {res['reference']:.2f} "
                                          f"(drop {res['drop']:.2f} > {thresholds.max_metric_drop} points)")
        report["task"] = res
    elif data.labels is not None:
        report["notes"] = [f"the data's labels were not used: no task metric for outputs "
                           f"{', '.join(output_names)} (pass --metric top1|recall@1 and --metric-outputs)"]
    if latency:
        stats = measure_interleaved(latency, warmup=warmup, iterations=latency_iterations)
        report["latency"] = {k: v.to_dict() for k, v in stats.items()}
        report["latency"]["batch"] = 1
        if "bundle" in stats and "reference" in stats:
            report["latency"]["p50_ratio"] = stats["bundle"].p50_ms / max(stats["reference"].p50_ms, 1e-9)
    report["passed"] = not report["failures"]
    return report


def first_sample(data: Dataset) -> dict[str, np.ndarray]:
    return {k: np.ascontiguousarray(v[:1]) for k, v in data.arrays.items()}


def write_reports(bundle_dir: Path, report: dict) -> tuple[Path, Path]:
    """report.json and report.md in the bundle (atomic; refuses a folder in their place)."""
    import json

    from .report import render_markdown, write_bundle_reports

    json_path, md_path = write_bundle_reports(bundle_dir, [("report.json", json.dumps(report, indent=2) + "\n"),
                                                           ("report.md", render_markdown(report))])
    return json_path, md_path


def add_compile_sections(report: dict, manifest: Manifest) -> dict:
    """Sections of a bundle's report that come from its compile, not from this run: a later `edgemm
    verify` rewrites report.json/.md and must not lose them."""
    comparison = (manifest.prune or {}).get("comparison")
    if comparison:
        report["prune"] = comparison
    recipe = manifest.precision.recipe
    engines = recipe.get("engines") if isinstance(recipe, dict) else None
    if isinstance(engines, dict):   # the CPU engine search (quant/cpu_engines.py)
        report["cpu_engines"] = {"batches": engines.get("batches"), "table": engines.get("table"),
                                 "variants": [v.get("name") for v in manifest.sections.get("variants") or []]}
    return report


def vs_original_lines(section: dict | None) -> list[str]:
    """A pruned bundle against the unpruned model (the compile report's ``vs_original``), for the log."""
    if not section:
        return []
    lines = [f"pruned bundle vs the unpruned model ({section['samples']} samples; pruning + precision):"]
    for name, o in section["outputs"].items():
        fig = cosine_text(o) if o.get("mean_cosine") is not None else \
            f"exact {o.get('exact_match')}"
        if o.get("top1_decisive") is not None or o.get("top1_agreement") is not None:
            fig += f", top-1 agreement {top1_text(o)}" if o.get("top1_agreement") is not None else f", {top1_text(o)}"
        lines.append(f"  {name}: {fig}")
    task = section.get("task")
    if task and "reference" in task:
        lines.append(f"  task {task['metric']}: unpruned {task['reference']:.2f}, bundle {task['bundle']:.2f} "
                     f"({-task['drop']:+.2f} points)")
    return lines


def pruned_reference_note(manifest: Manifest) -> str | None:
    """For a pruned bundle: its reference is the unpruned source, so outputs differ by what pruning changed."""
    prune = manifest.prune or {}
    if not prune.get("structured") and not prune.get("sparsity"):
        return None
    task = (prune.get("comparison") or {}).get("task")
    drop = f" (the compile measured {task['metric']} {task['before']:.2f} -> {task['after']:.2f})" if task else ""
    return ("this bundle was pruned: --reference (the unpruned source) differs from it by what pruning "
            f"changed{drop}; gate it against a --baseline saved from the bundle, or relax the thresholds "
            "(--max-metric-drop, --min-cosine, --min-top1)")


def verify_bundle(bundle_path, data_path, *, reference: str | None = None, weights: str | None = None,
                  trust_pickle: bool = False, metric: str | None = None, metric_outputs=None,
                  batch_size: int | None = None, iterations: int = 50, write: bool = True,
                  overrides: dict | None = None,
                  progress=None, instrument: Callable[[str, Callable], Callable] | None = None,
                  trusted_keys=None, require_signature: bool | None = None) -> dict:
    """The library behind `edgemm verify`: load the bundle (hash-checked) and the reference, evaluate.

    ``instrument(role, fn)`` may wrap every callable handed to the evaluation (roles ``bundle`` and
    ``reference`` run the data, ``<name>.latency`` are the timed calls), so that the baseline gate can
    keep outputs and latency samples without a second pass. ``trusted_keys``/``require_signature``: as
    for ``edgemm.runtime.load``; a signed bundle's reports are not rewritten (that would void the signature).
    """
    from .. import runtime
    from ..data import check_token_ids, load_dataset
    from ..iospec import call_batch
    from .thresholds import defaults_for, with_overrides

    from ..runtime.signing import REPORTS_KEPT_NOTE, is_signed

    bundle = runtime.load(bundle_path, trusted_keys=trusted_keys, require_signature=require_signature)
    kept_signed = write and is_signed(bundle_path)
    write = write and not kept_signed
    if write:
        from .report import check_report_places

        check_report_places(bundle_path)  # fail now, not after the evaluation
    data = load_dataset(data_path, specs=bundle.inputs, allow_labels=True, role="--data")
    check_token_ids(data, bundle.token_vocab)  # naming the file, before any call
    output_names = [o.name for o in bundle.outputs]
    batch_size = batch_size or call_batch(bundle.inputs)   # 16, or less where the bundle's range ends
    thresholds = with_overrides(defaults_for(bundle.precision), **(overrides or {}))
    heads = bundle_heads(bundle)
    task = task_of(output_names, metric=metric, metric_outputs=metric_outputs, known=bundle.manifest.task,
                   heads=heads)
    wrap = instrument or (lambda role, fn: fn)
    threads = _bundle_threads(bundle)
    ref_run, ref_plain, torch_ref = None, None, False
    latency = {"bundle": _bundle_call(bundle, first_sample(data))}
    if reference:
        from ..frontends import LoadOptions, load_model
        from ..reference import Reference

        loaded = load_model(reference, LoadOptions(weights=weights, trust_pickle=trust_pickle))
        ref = Reference(loaded, [s.name for s in bundle.inputs],
                        None if loaded.onnx_path else [o.name for o in bundle.outputs], names_from="--reference")
        ref_run, ref_plain = wrap("reference", ref.run), ref.run
        # Timed on the bundle's own thread count: a ratio of 1 thread vs all cores measures the settings.
        latency["reference"] = ref.callable_for(first_sample(data), threads=threads)
        torch_ref = loaded.is_torch
    latency = {name: wrap(f"{name}.latency", fn) for name, fn in latency.items()}
    if data.labels is None:
        task = None
    from ..reference import torch_threads

    with torch_threads(threads if torch_ref else None):
        report = evaluate(wrap("bundle", bundle.run), ref_run, data, thresholds, output_names=output_names,
                          batch_size=batch_size,
                          task=task, latency=latency if iterations else None, latency_iterations=iterations,
                          progress=progress, heads=heads)
        if isinstance(bundle, runtime.PipelineBundle):
            _check_split_parts(report, bundle, data, ref_plain, thresholds, batch_size)
    report["output_heads"] = heads
    if "latency" in report:
        report["latency"]["intra_op_threads"] = threads or "default (both)"
    report["bundle"] = {"name": bundle.manifest.name, "path": str(bundle_path),
                        "precision": bundle.precision, "backend": bundle.backend,
                        "target": bundle.manifest.target.name}
    report["data"] = {"path": str(data_path), "sha256": data.sha256, "samples": data.num_samples}
    report["reference"] = reference
    add_compile_sections(report, bundle.manifest)
    note = pruned_reference_note(bundle.manifest) if reference else None
    if note:
        report.setdefault("notes", []).append(note)
        report["reference_is_unpruned"] = True
    if kept_signed:
        report.setdefault("notes", []).append(REPORTS_KEPT_NOTE)
    if write:
        write_reports(Path(bundle_path), report)
    return report


def _check_split_parts(report: dict, bundle, data, reference_run, thresholds, batch_size: int) -> None:
    """A split bundle: each part on its own as well (edgemm.parity.split_parts)."""
    from .split_parts import check_parts

    parts = check_parts(bundle, data, reference_run=reference_run, min_cosine=thresholds.min_cosine,
                        batch_size=batch_size, score_noise=thresholds.score_noise)
    report["split_parts"] = parts["parts"]
    if parts["failures"]:
        report["failures"] = list(report.get("failures", [])) + parts["failures"]
        report["passed"] = False


def _bundle_threads(bundle) -> int | None:
    """The intra-op thread count an ONNX Runtime bundle runs with (recorded by compile), None for ORT's
    default or another backend."""
    from ..backends import registry

    section = bundle.manifest.backend.section
    return registry.get(bundle.manifest.backend.name).runtime_threads(section)


def _bundle_call(bundle, feeds):
    checked = bundle.check_feeds(feeds)
    return lambda: bundle.run(checked)


